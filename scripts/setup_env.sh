#!/usr/bin/env bash
# Create or update the virtual environment .venv with everything the project needs.
# Idempotent: a second run only checks. Without an NVIDIA GPU it installs the CPU build of
# torch (about 200 MB) instead of the default CUDA build (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" install "torch>=2.4"
  else
    echo "no NVIDIA GPU found: installing the CPU build of torch" >&2
    "${pip[@]}" install --retries 0 "torch==${TORCH_CPU_VERSION:-2.13.*}" \
      --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" install -r requirements-dev.txt
