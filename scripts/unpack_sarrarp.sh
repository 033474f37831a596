#!/usr/bin/env bash
# Unpack the SAR-RARP50 release: scripts/unpack_sarrarp.sh ARCHIVE_OR_DIR... [--output sarrarp]
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/unpack_sarrarp.py" "$@"
