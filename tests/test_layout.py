"""The codebase stays readable in one sitting: the limits of docs/architecture.md and README.md, checked."""

import ast
import re

from conftest import ROOT

READING_PATH = ("dataset.py", "model.py", "losses.py", "run_training.py", "metrics.py")
MODULES = sorted(ROOT.glob("*.py"))


def functions(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node, node.end_lineno - node.lineno + 1


def called(node) -> str | None:
    """The name of the function a call calls (its attribute for a method), None for anything but a call."""
    if not isinstance(node, ast.Call):
        return None
    return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)


def is_flat_parser(node) -> bool:
    """A function made only of argument declarations: a parser and its groups made, add_argument calls, return."""
    for statement in node.body[1 if ast.get_docstring(node) else 0 :]:
        declares = isinstance(statement, ast.Expr) and called(statement.value) == "add_argument"
        makes = isinstance(statement, ast.Assign) and called(statement.value) in (
            "OneLineErrorParser",
            "ArgumentParser",
            "add_argument_group",
        )
        if not (declares or makes or isinstance(statement, ast.Return) and isinstance(statement.value, ast.Name)):
            return False
    return True


def test_the_reading_path_from_data_to_metric_is_at_most_1600_lines():
    lines = sum(len((ROOT / name).read_text().splitlines()) for name in READING_PATH)
    assert lines <= 1600, f"{' -> '.join(READING_PATH)} is {lines} lines"


def test_train_is_at_most_80_lines_and_every_other_function_at_most_60():
    too_long = []
    for path in MODULES:
        for node, lines in functions(path):
            limit = 80 if (path.name, node.name) == ("run_training.py", "train") else 60
            if lines > limit and not is_flat_parser(node):
                too_long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long
    train = next(lines for node, lines in functions(ROOT / "run_training.py") if node.name == "train")
    assert train <= 80


def test_the_flag_declarations_are_the_only_long_functions_and_hold_nothing_else():
    parsers = [node for path in MODULES for node, lines in functions(path) if lines > 60]
    assert parsers and all(node.name.endswith("_parser") and is_flat_parser(node) for node in parsers)


def test_modules_are_imported_by_their_own_names():
    aliases = [
        f"{path.name}: import {alias.name} as {alias.asname}"
        for path in [*MODULES, *ROOT.glob("tests/*.py"), *ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.py")]
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.asname and (ROOT / f"{alias.name}.py").exists()
    ]
    assert not [a for a in aliases if not a.endswith(" as model_module")], aliases


def test_readme_is_a_map_of_at_most_15_kb_whose_links_all_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 15 * 1024
    assert (ROOT / "docs" / "architecture.md").is_file()
    for page in [ROOT / "README.md", *ROOT.glob("docs/*.md"), ROOT / "benchmarks" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
