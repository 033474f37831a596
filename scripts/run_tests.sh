#!/usr/bin/env bash
# Set up .venv (scripts/setup_env.sh) and run the test suite offline on the CPU, its files spread over one process
# per core (pytest-xdist; pass -n 0 to run in one process). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
HF_HUB_OFFLINE=1 exec .venv/bin/python -m pytest -q -n auto --dist loadfile "$@"
