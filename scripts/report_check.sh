#!/usr/bin/env bash
# Build a small real run on stories260k (CATS thresholds, Deja Vu predictors, eval of four modes with perplexity),
# write its report, and render the page in headless Chromium to a PNG to look at.
#
#   scripts/report_check.sh [RUN_DIR] [PNG]
#
# Needs Debian's chromium (`apt-get install chromium`). Sizes are small (minutes on 2 cores): set LIMIT (examples
# per task), TOKENS (ppl tokens), COLLECT_TOKENS to change them. An existing RUN_DIR keeps its finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-$(mktemp -d)/run}
png=${2:-$run/report/screenshot.png}
shared=${DEJAVU_SHARED:-$(cd .. && pwd)/shared}
bin=${DEJAVU_BIN:-${CARGO_TARGET_DIR:-target}/release/dejavu}
model="$shared/models/stories260k"
cal_text="$shared/data/text/wikitext2-valid.tokenized.txt"
mkdir -p "$run"
[ -f "$run/thresholds.json" ] || "$bin" calibrate --model "$model" --text "$cal_text" --sparsity 0.5 --tokens 8192 --out "$run/thresholds.json"
[ -f "$run/predictors/manifest.json" ] || {
  "$bin" collect --model "$model" --text "$cal_text" --tokens "${COLLECT_TOKENS:-8192}" --out "$run"
  "$bin" train-predictors --run "$run" --model "$model"
}
[ -f "$run/eval/results.csv" ] || "$bin" eval --model "$model" --run "$run" --tasks-dir "$shared/data/tasks" \
  --limit "${LIMIT:-40}" --compare dense,oracle@0.5,cats@0.5,dejavu@0.5 \
  --ppl "$shared/data/text/wikitext2-test.raw.txt" --ppl-tokens "${TOKENS:-2048}"
"$bin" report "$run"
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --hide-scrollbars \
  --window-size=1100,3200 --screenshot="$png" "file://$(cd "$run/report" && pwd)/index.html" 2>/dev/null
echo "screenshot: $png"
