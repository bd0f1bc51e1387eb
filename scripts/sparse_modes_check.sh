#!/usr/bin/env bash
# Sparse modes on generate / ppl / eval for one model, and `ppl` in a mode against `eval --ppl` in the same mode on
# the same tokens (they share one implementation above the Decoder, so the two perplexities must be equal).
#
#   scripts/sparse_modes_check.sh MODEL [RUN_DIR]
#
# Builds a small run directory first: CATS thresholds at 0.5 (calibrate) and Deja Vu predictors (collect +
# train-predictors on COLLECT_TOKENS tokens). Sizes are small so it runs on a 2-core CPU in minutes; set
# TOKENS (ppl tokens), CAL_TOKENS, COLLECT_TOKENS, DEVICE to change them.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: scripts/sparse_modes_check.sh MODEL [RUN_DIR]}
run=${2:-$(mktemp -d)/run}
shared=${DEJAVU_SHARED:-$(cd .. && pwd)/shared}
bin=${DEJAVU_BIN:-${CARGO_TARGET_DIR:-target}/release/dejavu}
device=${DEVICE:-cpu}
tokens=${TOKENS:-2048}
text="$shared/data/text/wikitext2-test.raw.txt"
cal_text="$shared/data/text/wikitext2-valid.tokenized.txt"
mkdir -p "$run"
echo "== run directory $run" >&2
[ -f "$run/thresholds.json" ] || "$bin" calibrate --model "$model" --device "$device" --text "$cal_text" --sparsity 0.5 \
  --tokens "${CAL_TOKENS:-8192}" --out "$run/thresholds.json" >&2
[ -f "$run/predictors/manifest.json" ] || {
  "$bin" collect --model "$model" --device "$device" --text "$cal_text" --tokens "${COLLECT_TOKENS:-8192}" --out "$run" >&2
  "$bin" train-predictors --run "$run" --model "$model" --device "$device" >&2
}
echo "== generate --mode oracle@0.5"
"$bin" generate --model "$model" --device "$device" --prompt "Once upon a time" -n 24 --mode oracle@0.5
tasks=$(mktemp -d)
head -n 5 "$shared/data/tasks/copa.jsonl" > "$tasks/copa.jsonl"
printf '\n| mode | ppl (dejavu ppl) | ppl (dejavu eval --ppl) | MLP sparsity | equal |\n|---|---|---|---|---|\n'
for mode in dense oracle@0.5 cats@0.5 dejavu@0.5; do
  a=$("$bin" ppl --model "$model" --device "$device" --text "$text" --max-tokens "$tokens" --mode "$mode" \
      --thresholds "$run/thresholds.json" --predictors "$run/predictors" | tail -n 1)
  b=$("$bin" eval --model "$model" --device "$device" --tasks-dir "$tasks" --tasks copa --mode "$mode" --ppl "$text" \
      --ppl-tokens "$tokens" --thresholds "$run/thresholds.json" --predictors "$run/predictors" --out "$run/eval-$mode" \
      | grep "| ppl (")
  pa=$(echo "$a" | awk -F'|' '{gsub(/ /,"",$9); print $9}')
  sa=$(echo "$a" | awk -F'|' '{gsub(/ /,"",$10); print $10}')
  pb=$(echo "$b" | awk -F'|' '{gsub(/ /,"",$5); print $5}')
  echo "| $mode | $pa | $pb | $sa | $([ "$pa" = "$pb" ] && echo yes || echo NO) |"
done
