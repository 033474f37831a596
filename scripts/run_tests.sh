#!/usr/bin/env bash
# Set up .venv (scripts/setup_env.sh), check the code with ruff (lint and format, configured in pyproject.toml), then
# run the test suite offline on the CPU, its files spread over one process per core (pytest-xdist; pass -n 0 to run
# in one process). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
HF_HUB_OFFLINE=1 exec .venv/bin/python -m pytest -q -n auto --dist loadfile "$@"
