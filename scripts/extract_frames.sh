#!/usr/bin/env bash
# Extract frame-accurate frames: scripts/extract_frames.sh [DATA_DIR=sarrarp] [--rate labelled|1|10|all] [--jobs N]
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/extract_frames.py" "$@"
