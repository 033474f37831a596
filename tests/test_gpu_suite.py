"""The GPU suite cannot rot: its tiny CPU run takes every code path and writes both files; a budget cut-off or a
kill leaves valid, partial results; its figures go into benchmarks/README.md by one command."""

import json
import sys
import time

import pytest
import torch

from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_suite  # noqa: E402


def read(output):
    return json.loads((output / "results.json").read_text()), (output / "results.md").read_text()


def test_the_tiny_cpu_run_takes_every_code_path_and_writes_both_files(tmp_path):
    try:
        assert gpu_suite.main(["--device", "cpu", "--tiny", "--output", str(tmp_path)]) == 0
    finally:
        torch.set_float32_matmul_precision("highest")  # the suite switches TF32 as its rows ask
    results, markdown = read(tmp_path)
    assert results["status"].startswith("finished") and not results["skipped"]
    rows = results["measurements"]
    assert {row["kind"] for row in rows} == {"train", "validate", "infer", "video", "loader"}
    assert all("error" not in row for row in rows)
    train = [row for row in rows if row["kind"] == "train"]
    assert all(row["images_per_s"] > 0 and row["estimate_gb"] > 0 for row in train)
    assert results["machine"]["torch"] == torch.__version__ and results["machine"]["date"]
    assert markdown.startswith("# GPU suite: MEASURED on CPU")
    for group in ("baseline recipe", "training grid", "validation", "inference", "video", "loader"):
        assert f"\n## {group}\n" in markdown


def fast_plan(monkeypatch, seconds_each=0.05, fail_at=None):
    """Every measurement replaced by a sleep, so that budgets are exact; fail_at: a kind whose measurement is killed."""

    def measured(kind):
        def measure(spec, device, tiny):
            if kind == fail_at:
                raise KeyboardInterrupt
            time.sleep(seconds_each)
            return {"images_per_s": 1.0} if kind == "train" else {"frames_per_s": 2.0}

        return measure

    monkeypatch.setattr(gpu_suite, "MEASURE", {kind: measured(kind) for kind in gpu_suite.MEASURE})


def test_a_budget_cut_off_leaves_what_was_measured_and_names_the_rest(tmp_path, monkeypatch):
    fast_plan(monkeypatch)
    assert gpu_suite.main(["--device", "cpu", "--tiny", "--budget-s", "0.12", "--output", str(tmp_path)]) == 0
    results, markdown = read(tmp_path)
    measured, planned = len(results["measurements"]), len(gpu_suite.plan(tiny=True))
    assert 1 <= measured < planned and measured + len(results["skipped"]) == planned
    assert results["measurements"][0]["group"] == "baseline recipe"  # the most valuable first
    assert "cut off by --budget-s 0.12" in results["status"]
    assert "Not measured (the budget ran out): " in markdown


def test_a_killed_run_leaves_valid_results_of_every_measurement_before(tmp_path, monkeypatch):
    fast_plan(monkeypatch, fail_at="validate")
    with pytest.raises(KeyboardInterrupt):
        gpu_suite.main(["--device", "cpu", "--tiny", "--output", str(tmp_path)])
    results, markdown = read(tmp_path)
    assert results["status"] == "running" and {row["kind"] for row in results["measurements"]} == {"train"}
    assert "## training grid" in markdown


def test_the_figures_go_into_the_benchmarks_readme_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\n{gpu_figures_markers('old figures')}\n\n## bench_extraction.py\n")
    results = tmp_path / "results.md"
    results.write_text("# GPU suite: MEASURED on NVIDIA H200\n\n## baseline recipe\n\n| settings | images/s |\n")
    run_script(ROOT / "scripts" / "gpu_figures.py", results, "--readme", readme)
    text = readme.read_text()
    assert "### GPU suite: MEASURED on NVIDIA H200" in text and "#### baseline recipe" in text
    assert "old figures" not in text and text.endswith("## bench_extraction.py\n")
    assert "<!-- gpu-suite:begin -->" in (ROOT / "benchmarks" / "README.md").read_text()  # the real one has them
    refused = run_script(ROOT / "scripts" / "gpu_figures.py", readme, "--readme", readme, check=False)
    assert refused.returncode == 2 and "is not a results.md of benchmarks/gpu_suite.py" in refused.stderr


def gpu_figures_markers(inside: str) -> str:
    return f"<!-- gpu-suite:begin -->\n{inside}\n<!-- gpu-suite:end -->"


def test_a_measurement_without_its_package_is_a_row_that_says_so(tmp_path, monkeypatch):
    fast_plan(monkeypatch)
    monkeypatch.setitem(gpu_suite.MEASURE, "video", gpu_suite.measure_video)
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as on a GPU image without it
    monkeypatch.delitem(sys.modules, "video", raising=False)
    monkeypatch.delitem(sys.modules, "bench_video", raising=False)
    assert gpu_suite.main(["--device", "cpu", "--tiny", "--output", str(tmp_path)]) == 0
    results, markdown = read(tmp_path)
    (row,) = [row for row in results["measurements"] if row["kind"] == "video"]
    assert row["error"] == "not measured: imageio_ffmpeg is not installed here"
    assert "| note |" in markdown and "imageio_ffmpeg is not installed here |" in markdown
