#!/usr/bin/env bash
# Opens the main job's HTML report in headless Chromium and saves a full-width screenshot,
# so the report is checked the way a person sees it.
#
#   cargo run --release --example synthetic_load -- --quick
#   bash benches/report_screenshot.sh [REPORT] [PNG]
#
# REPORT defaults to target/synthetic_load/report.html, PNG to the same name with .png.
# Installs Debian's chromium when it is missing (as root).
set -euo pipefail

report=${1:-target/synthetic_load/report.html}
png=${2:-${report%.html}.png}

if [ ! -f "$report" ]; then
  echo "no report at $report: run cargo run --release --example synthetic_load first" >&2
  exit 1
fi

browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "chromium is not installed (apt-get install chromium, as root)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  browser=$(command -v chromium)
fi

# Tall enough for every table and plot of a full run.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --window-size=1100,5200 --screenshot="$png" "file://$(realpath "$report")" 2>/dev/null
echo "screenshot: $(realpath "$png")"
