#!/usr/bin/env bash
# Issue 4 on the GPU box: (a) `ppl` vs `collect` forward throughput on the same model and device, (b) collect
# 100k tokens, (c) train predictors on the GPU, (d) print the per-layer table and wall times last.
# Builds nothing. Usage (from the repo root):
#   scripts/h100_issue4.sh BIN MODEL.gguf TEXT OUTDIR
#     BIN     the dejavu binary built with --features cuda
#     MODEL   e.g. SmolLM2-135M-Instruct.Q4_1.gguf
#     TEXT    e.g. wikitext2-valid.tokenized.txt
#     OUTDIR  everything is written under it (about 26 GB for 100k SmolLM2 tokens)
set -euo pipefail
if [ $# -ne 4 ]; then
  echo "usage: $0 BIN MODEL.gguf TEXT OUTDIR" >&2
  exit 2
fi
BIN=$(readlink -f "$1"); MODEL=$2; TEXT=$3; OUT=$4
N=${N:-100000}            # tokens for the full collection
TPUT_N=${TPUT_N:-16384}   # tokens for the throughput comparison
SEQ=${SEQ:-512}
BATCH=${BATCH:-4}         # sequences per forward for the full collection
TRAIN_ARGS=${TRAIN_ARGS:-}  # extra train-predictors flags, e.g. "--neuron-density 0.25 --rank 192"
mkdir -p "$OUT"
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.1f}')"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt" || true

echo "== warm-up (cubecl autotune/NVRTC cache; not timed)"
"$BIN" ppl --device cuda -m "$MODEL" --text "$TEXT" --ctx "$SEQ" --max-tokens 2048 > "$OUT/warmup_ppl.txt"
rm -rf "$OUT/warm"; "$BIN" collect --device cuda -m "$MODEL" --text "$TEXT" --tokens 2048 --seq-len "$SEQ" --out "$OUT/warm" --json > /dev/null
rm -rf "$OUT/warm"

echo "== (a) throughput: ppl vs collect, batch 1, ctx/seq-len $SEQ, $TPUT_N tokens"
"$BIN" ppl --device cuda -m "$MODEL" --text "$TEXT" --ctx "$SEQ" --stride "$SEQ" --max-tokens "$TPUT_N" --json "$OUT/ppl_tput.json" | tee "$OUT/ppl_tput.txt"
rm -rf "$OUT/tput"
"$BIN" collect --device cuda -m "$MODEL" --text "$TEXT" --tokens "$TPUT_N" --seq-len "$SEQ" --batch 1 --out "$OUT/tput" --json > "$OUT/collect_tput.json"
rm -rf "$OUT/tput"

echo "== (b) collect $N tokens (batch $BATCH)"
t0=$(now)
"$BIN" collect --device cuda -m "$MODEL" --text "$TEXT" --tokens "$N" --seq-len "$SEQ" --batch "$BATCH" --out "$OUT/run" --json > "$OUT/collect_run.json"
t1=$(now)

echo "== (c) train predictors on the GPU"
# shellcheck disable=SC2086
"$BIN" train-predictors --device cuda --run "$OUT/run" -m "$MODEL" $TRAIN_ARGS > "$OUT/train_table.md"
t2=$(now)
du -sh "$OUT/run/acts" "$OUT/run/predictors" | tee "$OUT/sizes.txt"

echo
echo "== (d) results"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
p = json.load(open(f"{out}/ppl_tput.json"))
c = json.load(open(f"{out}/collect_tput.json"))
ppl_tps = p["forward_tokens_per_s"]
col_tps = c["forward_tokens_now"] / c["seconds"]
rec_tps = c["recorded_now"] / c["seconds"]
print(f"ppl forward tokens/s (incl. lm_head + log_softmax): {ppl_tps:.1f}")
print(f"collect forward tokens/s (recording all taps, incl. shard writes): {col_tps:.1f}  (recorded tokens/s {rec_tps:.1f})")
print(f"collect / ppl: {col_tps / ppl_tps:.3f}   (split: forward {c['forward_seconds']:.2f}s, record {c['record_seconds']:.2f}s, write wait {c['write_wait_seconds']:.2f}s)")
r = json.load(open(f"{out}/collect_run.json"))
print(f"full collection: {r['tokens']} tokens in {r['seconds']:.1f}s ({r['recorded_now']/r['seconds']:.1f} tokens/s), {r['bytes']/1e9:.1f} GB, {r['shards']} shards")
PY
echo "collect wall: $(secs "$t0" "$t1") s; train-predictors wall: $(secs "$t1" "$t2") s"
echo
cat "$OUT/train_table.md"
