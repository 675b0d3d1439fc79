#!/usr/bin/env bash
# Renders a run report page as a person sees it: headless Chromium (Debian's `chromium`, installed
# here with apt-get when missing) screenshots REPORT.html into a PNG.
# Usage: tools/report_screenshot.sh REPORT.html OUT.png [WIDTHxHEIGHT]
# docs/report-demo.png is the demo's page: `make run`, then
#   tools/report_screenshot.sh build/demo-run/report.html docs/report-demo.png
set -euo pipefail
page=$(readlink -f "${1:?usage: report_screenshot.sh REPORT.html OUT.png [WxH]}")
out=${2:?usage: report_screenshot.sh REPORT.html OUT.png [WxH]}
size=${3:-1600x4200}
if ! command -v chromium >/dev/null; then
  sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get install -y --no-install-recommends chromium
fi
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="${size/x/,}" \
  --screenshot="$out" "file://$page" 2>/dev/null
echo "report_screenshot: $out"
