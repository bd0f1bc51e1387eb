#!/usr/bin/env bash
# The real pipeline on SmolLM2-135M-Instruct (Q4_1 GGUF), on the CPU reference path by default:
# fetch the model, generate, perplexity on WikiText-2, CATS calibration, then dense vs sparse zero-shot eval.
# Environment: LIMIT (examples per task, default 50), DEVICE (cpu|cuda|wgpu, default cpu), OUT (default out/smollm2),
# DEJAVU_SHARED (default ../shared), DEJAVU_BIN (default: build ${CARGO_TARGET_DIR:-target}/release/dejavu).
set -euo pipefail
cd "$(dirname "$0")/.."
limit=${LIMIT:-50}
device=${DEVICE:-cpu}
out=${OUT:-out/smollm2}
shared=${DEJAVU_SHARED:-../shared}
if [[ -z "${DEJAVU_BIN:-}" ]]; then
  cargo build --release
  bin=${CARGO_TARGET_DIR:-target}/release/dejavu
else
  bin=$DEJAVU_BIN
fi
model=$(scripts/fetch_smollm2.sh)
mkdir -p "$out"

echo "== generate"
"$bin" generate --model "$model" --device "$device" --prompt "The capital of France is" -n 3 --timings
echo "== perplexity, WikiText-2 test, first 16k tokens"
"$bin" ppl --model "$model" --device "$device" --text "$shared/data/text/wikitext2-test.raw.txt" --max-tokens 16384 \
  --ctx 512 --stride 512 --json "$out/ppl.json"
echo "== CATS calibration on WikiText-2 valid (64k tokens)"
"$bin" calibrate --model "$model" --device "$device" --text "$shared/data/text/wikitext2-valid.tokenized.txt" \
  --sparsity 0.5,0.7 --tokens 65536 --out "$out/thresholds.json"
echo "== zero-shot eval, $limit examples per task: dense vs CATS vs oracle"
"$bin" eval --model "$model" --device "$device" --tasks-dir "$shared/data/tasks" --limit "$limit" \
  --compare dense,cats@0.5,cats@0.7,oracle@0.5,oracle@0.7 --thresholds "$out/thresholds.json" \
  --ppl "$shared/data/text/wikitext2-test.raw.txt" --ppl-tokens 16384 --out "$out/eval"
