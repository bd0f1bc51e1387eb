#!/usr/bin/env bash
# Issue 4 on the GPU box: (a) `ppl` vs `collect` forward throughput on the same model and device, (b) collect
# 100k tokens, (c) train predictors on the GPU with the defaults, (d) an independent
# transformers check of what a linear neuron score can reach (scripts/neuron_ceiling.py), (f) two training
# variants that share the activations, (e) the tables and wall times. Builds nothing.
#
# Direct use (from the repo root, anywhere with a CUDA build of dejavu):
#   scripts/h100_issue4.sh all BIN MODEL.gguf TEXT OUTDIR
#     BIN     the dejavu binary built with --features cuda
#     MODEL   e.g. SmolLM2-135M-Instruct.Q4_1.gguf
#     TEXT    e.g. wikitext2-valid.tokenized.txt
#     OUTDIR  everything is written under it (about 26 GB for 100k SmolLM2 tokens)
#
# On the device tool's box (no Rust, no ../shared, each call at most 10 minutes, ignored files kept while the
# machine is held), from .carry/ (git-ignored): a/ = GGUF part 1 + gguf wheel + sha256, b/ = GGUF part 2 +
# dejavu.xz, d/ = the text file.
#   stash   copy .carry/a and .carry/d to /root/stash (call 1)
#   prep    reassemble the GGUF, check it, unpack the binary, install gguf (call 2, carrying b)
#   start   run `all` detached (setsid), so it outlives the call, then wait like `wait`
#   throughput BIN MODEL TEXT DIR: step (a) alone, anywhere (DEV=cpu for a CPU; WARM=0 skips the warm-up runs)
#   tput    (foreground) step (a) alone: steady forward throughput of ppl vs collect (batch 1 and 4)
#   wait    follow the log for up to $WAIT_S seconds; when `all` has finished, copy the results to $OUT
set -euo pipefail
R=/root/run
S=/root/stash
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.1f}')"; }

# Acceptance 5: plain `ppl` vs `collect` (batch 1 and 4) forward throughput on the same model, device and text,
# each warmed up first in its own process (cubecl keeps autotune results on disk). "steady" leaves out each run's
# first forward, which carries the per-process kernel compilation, and includes everything after it (the write
# of the last shard too). Sizes keep every forward the same shape: $TPUT_SEQS (default 128) windows of 512 for
# ppl, as many sequences of 1 BOS + 511 tokens for collect. Beside collect: its forward-only rate (what it would
# reach if recording were free) and the rate it wrote to disk, next to dd's one-stream write rate (4 GiB, fsync),
# since writing 254 KB per token is what bounds it on the GPU. Writes
# DIR/{ppl,collect_b1,collect_b4}.json, DIR/disk.txt and DIR/tput.md (the table, also printed).
throughput() {
  local BIN=$1 M=$2 T=$3 D=$4 N=${TPUT_SEQS:-128} DEV=${DEV:-cuda} WARM=${WARM:-1}
  mkdir -p "$D"
  c() { rm -rf "$D/c"; "$BIN" collect --device "$DEV" -m "$M" --text "$T" --seq-len 512 --out "$D/c" "$@"; }
  dd if=/dev/zero of="$D/dd" bs=64M count=64 conv=fsync 2>&1 | tail -1 | tee "$D/disk.txt"; rm -f "$D/dd"
  [[ $WARM == 1 ]] && "$BIN" ppl --device "$DEV" -m "$M" --text "$T" --ctx 512 --stride 512 --max-tokens 4096 > /dev/null
  "$BIN" ppl --device "$DEV" -m "$M" --text "$T" --ctx 512 --stride 512 --max-tokens $((N * 512)) --json "$D/ppl.json" > /dev/null
  for b in 1 4; do
    [[ $WARM == 1 ]] && c --tokens 4088 --batch $b > /dev/null
    c --tokens $((N * 511)) --batch $b --json "$D/collect_b$b.json" > /dev/null
  done
  rm -rf "$D/c"
  python3 - "$D" <<'PY' | tee "$D/tput.md"
import json, re, sys
d = sys.argv[1]
m = re.search(r"([\d.]+) ([GM])B/s", open(f"{d}/disk.txt").read())
disk = float(m.group(1)) * (1e9 if m.group(2) == "G" else 1e6) if m else float("nan")
print(f"disk write (dd 4 GiB, fsync): {disk / 1e9:.2f} GB/s")
p = json.load(open(f"{d}/ppl.json"))
base, base_all = p["steady_tokens_per_s"], p["forward_tokens_per_s"]
print("| run | forward tokens | seconds | tokens/s (all) | steady tokens/s | steady vs ppl | forward-only tokens/s | disk write GB/s | forward s | record s | write wait s | handoff wait s | GB written |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
print(f"| ppl ctx 512 | {p['result']['forward_tokens']} | {p['seconds']:.1f} | {base_all:.0f} | {base:.0f} | 1.000 | | | | | | | |")
for b in (1, 4):
    j = json.load(open(f"{d}/collect_b{b}.json"))
    st = j["steady_tokens_per_s"]
    # steady part: everything after the first forward
    tok = j["forward_tokens_now"] - j["first_forward_tokens"]
    fwd = j["forward_seconds"] - j["first_forward_seconds"]
    wrate = j["bytes"] * tok / j["forward_tokens_now"] / (j["seconds"] - j["first_forward_seconds"])
    print(f"| collect --batch {b} | {j['forward_tokens_now']} | {j['seconds']:.1f} | {j['forward_tokens_now'] / j['seconds']:.0f} | {st:.0f} | {st / base:.3f} | {tok / fwd:.0f} | {wrate / 1e9:.2f} | {j['forward_seconds']:.1f} | {j['record_seconds']:.1f} | {j['write_wait_seconds']:.1f} | {j.get('handoff_wait_seconds', 0):.1f} | {j['bytes'] / 1e9:.1f} |")
print(f"first window/forward (compilation): ppl {p['result']['first_window_seconds']:.1f}s; " + "; ".join(
    f"collect b{b} {json.load(open(f'{d}/collect_b{b}.json'))['first_forward_seconds']:.1f}s" for b in (1, 4)))
PY
}

all() {
  BIN=$(readlink -f "$1"); MODEL=$2; TEXT=$3; OUTD=$4
  N=${N:-100000}            # tokens for the full collection
  SEQ=${SEQ:-512}
  BATCH=${BATCH:-4}         # sequences per forward for the full collection
  VARIANTS=${VARIANTS:-"r576:--rank_576 d25:--neuron-density_0.25"}  # name:flags, "_" for spaces
  STEPS=${STEPS:-"tput collect train ceiling variants"}  # which of the steps below to run
  has() { [[ " $STEPS " == *" $1 "* ]]; }
  mkdir -p "$OUTD"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUTD/gpu.txt" || true

  if has tput; then
    echo "== (a) throughput: ppl vs collect"
    throughput "$BIN" "$MODEL" "$TEXT" "$OUTD/tput"
  fi

  echo "== (b) collect $N tokens (batch $BATCH)"
  t0=$(now)
  has collect && "$BIN" collect --device cuda -m "$MODEL" --text "$TEXT" --tokens "$N" --seq-len "$SEQ" --batch "$BATCH" --out "$OUTD/run" --json "$OUTD/collect_run.json" > /dev/null
  t1=$(now)
  echo "collect wall: $(secs "$t0" "$t1") s" | tee "$OUTD/walls.txt"

  echo "== (c) train predictors on the GPU (defaults)"
  has train && "$BIN" train-predictors --device cuda --run "$OUTD/run" -m "$MODEL" > "$OUTD/train_default.md"
  t2=$(now)
  echo "train-predictors (defaults) wall: $(secs "$t1" "$t2") s" | tee -a "$OUTD/walls.txt"
  du -sh "$OUTD/run/acts" "$OUTD/run/predictors" | tee "$OUTD/sizes.txt" || true
  if has ceiling; then
    echo "== (d) linear-score ceiling, transformers on the same GGUF"
    python3 "$(dirname "$0")/neuron_ceiling.py" "$(dirname "$MODEL")" "$(basename "$MODEL")" "$TEXT" --tokens 8192 > "$OUTD/ceiling.md" 2> "$OUTD/ceiling.err" || echo "ceiling check failed: see $OUTD/ceiling.err"
  fi

  has variants || VARIANTS=""
  for v in $VARIANTS; do
    name=${v%%:*}; args=${v#*:}; args=${args//_/ }
    mkdir -p "$OUTD/v_$name"; ln -sfn "$OUTD/run/acts" "$OUTD/v_$name/acts"
    echo "== (f) train-predictors $args"
    t3=$(now)
    # shellcheck disable=SC2086
    "$BIN" train-predictors --device cuda --run "$OUTD/v_$name" -m "$MODEL" $args > "$OUTD/train_$name.md"
    echo "train-predictors ($args) wall: $(secs "$t3" "$(now)") s" | tee -a "$OUTD/walls.txt"
  done

  echo
  echo "== (e) results"
  python3 - "$OUTD" <<'PY' | tee "$OUTD/summary.txt"
import json, sys
out = sys.argv[1]
r = json.load(open(f"{out}/collect_run.json"))
print(f"full collection: {r['tokens']} tokens in {r['seconds']:.1f}s ({r['recorded_now']/r['seconds']:.1f} tokens/s), {r['bytes']/1e9:.1f} GB, {r['shards']} shards")
PY
  cat "$OUTD/tput/tput.md" "$OUTD/walls.txt" "$OUTD/ceiling.md" 2>/dev/null || true
  for f in "$OUTD"/train_*.md; do echo "-- $f"; grep -E "^\| mean|^trained" "$f" || true; done
  echo ALL-DONE
}

case "${1:-}" in
all) shift; all "$@" ;;
# step (a) alone anywhere, e.g. on a CPU: DEV=cpu WARM=0 TPUT_SEQS=8 scripts/h100_issue4.sh throughput BIN MODEL TEXT DIR
throughput) shift; throughput "$@" ;;
stash)
  mkdir -p $S && cp -r .carry/a .carry/d $S/ && ls -la $S/a $S/d && nvidia-smi --query-gpu=name,memory.used --format=csv ;;
prep)
  mkdir -p $R
  cat $S/a/gguf_part_aa .carry/b/gguf_part_ab > $R/SmolLM2-135M-Instruct.Q4_1.gguf
  (cd $R && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf) | diff - <(sed 's#models/smollm2/##' $S/a/gguf.sha256)
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" .carry/b/dejavu.xz $R/dejavu
  chmod +x $R/dejavu
  python3 -m pip install -q --no-index --no-deps --target /tmp/site $S/a/*.whl
  cp scripts/h100_issue4.sh scripts/neuron_ceiling.py $R/   # the detached job must not read the tree the next call replaces
  echo prep ok ;;
tput)
  throughput $R/dejavu $R/SmolLM2-135M-Instruct.Q4_1.gguf $S/d/wikitext2-valid.tokenized.txt $R/tput
  cp $R/tput/*.json "$OUT/" ;;
start)
  export PYTHONPATH=/tmp/site
  setsid nohup bash $R/h100_issue4.sh all $R/dejavu $R/SmolLM2-135M-Instruct.Q4_1.gguf $S/d/wikitext2-valid.tokenized.txt $R/out > $R/log 2>&1 < /dev/null &
  sleep 5; "$0" wait ;;
wait)
  end=$(( $(date +%s) + ${WAIT_S:-540} ))
  while (( $(date +%s) < end )); do
    grep -q ALL-DONE $R/log 2>/dev/null && break
    sleep 15
  done
  tail -c 3000 $R/log
  cd $R/out
  tar czf "$OUT/results.tgz" ./*.err ./*.md tput/tput.md ./*.txt ./*.json run/predictors/manifest.json run/predictors/metrics.csv run/predictors/*.svg run/acts/manifest.json v_*/predictors/metrics.csv ../log 2>/dev/null || true
  if grep -q ALL-DONE $R/log; then
    # PRED: which predictor sets to bring back (one set is ~35 MB compressed; a call returns at most 64 MiB)
    # shellcheck disable=SC2086,SC2046
    tar cf - $(ls -d ${PRED:-run/predictors v_*/predictors} 2>/dev/null) | xz -T8 -1 > /tmp/pred.tar.xz && split -b 15M /tmp/pred.tar.xz "$OUT/pred.tar.xz."
    ls -la "$OUT"
  fi ;;
*) echo "usage: $0 all BIN MODEL TEXT OUTDIR | stash | prep | start | wait" >&2; exit 2 ;;
esac
