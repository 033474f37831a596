"""Put the GPU suite's figures into benchmarks/README.md: the section between its gpu-suite markers becomes
results.md (benchmarks/gpu_suite.py's), its headings moved under the README's, so that the measured figures, and what
they were measured on, replace the ones there.

    python scripts/gpu_figures.py gpu-results/results.md [--readme benchmarks/README.md]
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import files  # noqa: E402

BEGIN, END = "<!-- gpu-suite:begin -->", "<!-- gpu-suite:end -->"


def section(results_markdown: str) -> str:
    """results.md with every heading two levels deeper (the README's section holds it)."""
    lines = [f"##{line}" if line.startswith("#") else line for line in results_markdown.strip().splitlines()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="results.md of a benchmarks/gpu_suite.py run")
    parser.add_argument("--readme", type=Path, default=ROOT / "benchmarks" / "README.md")
    args = parser.parse_args(argv)
    try:
        results, readme = args.results.read_text(), args.readme.read_text()
    except OSError as error:
        parser.error(f"cannot read {error.filename}: {error.strerror}")
    if not results.startswith("# GPU suite: MEASURED on "):
        parser.error(f"{args.results} is not a results.md of benchmarks/gpu_suite.py")
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        parser.error(f"{args.readme} needs one {BEGIN} line and one {END} line after it")
    before, rest = readme.split(BEGIN)
    after = rest.split(END)[1]
    files.write_bytes_atomically(args.readme, f"{before}{BEGIN}\n{section(results)}\n{END}{after}".encode())
    print(f"{args.readme}: the GPU suite's section is now {args.results}'s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
