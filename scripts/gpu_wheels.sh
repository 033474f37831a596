#!/usr/bin/env bash
# The Python packages a lent GPU machine's image lacks (or holds in other versions), as wheels in .whl/ (~25 MB),
# at this checkout's versions: the device tool carries .whl/ and installs them there (benchmarks/README.md,
# "Measured on a GPU"). imageio-ffmpeg is left out: its 68 MB wheel is over the 64 MiB a call carries, so
# gpu_suite.py's video row says it was not measured.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="albumentations albucore pydantic pydantic_core annotated-types typing-inspection stringzilla simsimd
  transformers huggingface_hub httpx2 httpcore2 truststore typing_extensions click tokenizers safetensors"
pinned=$(.venv/bin/python - $PACKAGES <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PY
)
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pinned
du -sh .whl
