#!/usr/bin/env bash
# Render an error-analysis report (or any page) in headless Chromium and save a PNG screenshot: a real browser's
# check that report.html displays, and the picture README shows.
#   bash scripts/screenshot_report.sh REPORT.html OUT.png [WIDTH,HEIGHT (default 1400,2400)]
# Chromium: Debian's package (apt-get install chromium); CHROMIUM=path picks another binary.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 REPORT.html OUT.png [WIDTH,HEIGHT]" >&2; exit 2; }
report=$1 out=$2 size=${3:-1400,2400}
[ -f "$report" ] || { echo "error: $report does not exist" >&2; exit 1; }
browser=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
[ -n "$browser" ] || { echo "error: no Chromium found: apt-get install chromium (or set CHROMIUM)" >&2; exit 1; }
page="file://$(realpath "$report")"
rm -f "$out"
# --no-sandbox: Chromium refuses to start as root with its sandbox (containers, CI)
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="$size" \
  --screenshot="$(realpath -m "$out")" "$page" >/dev/null 2>&1
[ -s "$out" ] || { echo "error: Chromium wrote no screenshot of $report" >&2; exit 1; }
echo "screenshot: $out ($size)"
