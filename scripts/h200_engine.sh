#!/usr/bin/env bash
# The CUDA engine's checks and timings on the GPU box, in stages (one device call can run several):
#   check     kernels vs f32/f64 CPU references; stories260k and the four fixtures vs the burn forward
#   smollm2   SmolLM2 (GGUF) vs the burn forward; WikiText-2 perplexity and eval, CPU path vs engine
#   bench     dense decode at real shapes vs the weight-read floor, f16 and bf16, with HF eager beside it
#   batch     batch 1/4/16 at Llama-2-7B; prefill of 2048 tokens
#   startup   process start to first token, cold (empty kernel cache) and warm
#   mlp       one MLP block, sparse (kept neurons only) at 100/50/25/10% kept beside our dense block, every PERF.md
#             shape, f16 and bf16 (bench --mlp-block: graph replay, L2 flushed)
#   topk      the top-k rules on the GPU: engine-check (kernels; SmolLM2 kept sets and greedy agreement under
#             exactdown@0.5, qscore@0.5 and, with $CARRY/predictors, dejavu@0.5 and 3 of 9 heads dropped, vs the CPU
#             reference), then the blocks with their selection (and predictor or score pass) timed inside
#             (bench --mlp-block --rule exactdown|qscore|dejavu); makes $CARRY/qscore.safetensors if missing
#   real      SmolLM2 real weights (issue 14 lines 1 and 5): WikiText-2 16k and eval 8x200 on the engine for dense,
#             cats@0.5, qscore@0.5+greedy and (with $CARRY/predictors) dejavu@0.5 + 3 of 9 heads, beside the CPU path's
#             numbers (README; data/swiglu-rules-notes.md), and decode tokens/s of each (generate --timings)
#   e2e       sparse decode end to end on random weights (bench --mode, predictors and score passes included in the
#             time), beside dense at the same batch, batch 1/4/16: OPT-6.7B/13B dejavu@0.9 + half the heads,
#             Llama-2-7B/13B qscore@0.5 + 30% of heads dropped; then HF eager at the same shapes (hf stage)
#   rules     issue 12's task sweep through the reference path on the GPU (`--device burn-cuda`: every mode, the ones
#             the engine refuses too): eval 8 x 200 per mode in $RULE_MODES, with $CARRY/th/smollm2-th.json,
#             $CARRY/qscore.safetensors, $CARRY/rules.json (KL budgets), $CARRY/rules-exact.json and $CARRY/predictors
#   ncu       where one decode step goes, kernel by kernel (ncu, kernels serialised, no PDL overlap): sparse OPT-13B
#             dejavu@0.9 + half the heads (rank 256) and dense Llama-2-7B, a window of ~one step each; the table by
#             scripts/ncu_table.py (BIN2=another binary adds its columns beside)
#   variants  decode at four shapes under each GEMV / launch setting (env knobs, see src/cuda/launcher.rs and
#             gpu.rs: DEJAVU_PDL, DEJAVU_GEMV_ASYNC, DEJAVU_GEMV_THREADS, DEJAVU_GEMV_STAGE), side by side; table last
# Inputs: BIN (the dejavu binary), CARRY (folder with stories260k/, data/, smollm2.gguf), OUT (results folder).
set -uo pipefail
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/dejavu}
CARRY=${CARRY:-.carry}
OUT=${OUT:-out}
mkdir -p "$OUT"
export DEJAVU_CACHE=${DEJAVU_CACHE:-/tmp/dejavu-cache}
FIX=tests/fixtures
for stage in "$@"; do
  echo "== $stage"
  case $stage in
    check)
      $BIN engine-check --models "$CARRY/stories260k" $FIX/tiny-llama $FIX/tiny-llama-tied $FIX/tiny-opt $FIX/tiny-opt-proj \
        --prompts "$CARRY/data/prompts.txt" --n 50 --steps 64 --json "$OUT/check.json" ;;
    smollm2)
      M="$CARRY/smollm2.gguf"
      $BIN engine-check --no-kernels --models "$M" --prompts "$CARRY/data/prompts.txt" --n 50 --steps 64 --json "$OUT/check_smollm2.json"
      for dev in cpu cuda; do
        $BIN ppl -m "$M" --device $dev --text "$CARRY/data/wikitext2-test.raw.txt" --max-tokens 16384 --ctx 512 --json "$OUT/ppl_$dev.json"
      done
      for dev in cpu cuda; do
        $BIN eval -m "$M" --device $dev --tasks-dir "$CARRY/tasks" --limit 200 --out "$OUT/eval_$dev" 2>&1 | tail -14
      done ;;
    bench)
      for dt in f16 bf16; do
        $BIN bench --shape smollm2-135m opt-125m opt-1.3b opt-6.7b opt-13b llama2-7b llama2-13b mistral-7b --dtype $dt \
          --json "$OUT/bench_$dt.json" --csv "$OUT/bench_$dt.csv"
      done
      $BIN bench --shape llama2-7b smollm2-135m --breakdown --tokens 32 ;;
    hf)
      PYTHONUNBUFFERED=1 python3 scripts/hf_decode.py --shape smollm2-135m opt-1.3b opt-6.7b llama2-7b llama2-13b --json "$OUT/hf.json" ;;
    batch)
      $BIN bench --shape llama2-7b --batch 1 4 16 --json "$OUT/batch.json"
      $BIN bench --shape llama2-7b --prompt 2048 --tokens 8 --dtype bf16 --json "$OUT/prefill.json" ;;
    variants)
      for v in "DEJAVU_PDL=0" "DEJAVU_PDL=1" "DEJAVU_GEMV_THREADS=256" "DEJAVU_PDL=1 DEJAVU_GEMV_ASYNC=1" \
               "DEJAVU_PDL=1 DEJAVU_GEMV_ASYNC=1 DEJAVU_GEMV_THREADS=256" "DEJAVU_PDL=1 DEJAVU_GEMV_ASYNC=1 DEJAVU_GEMV_STAGE=0"; do
        tag=$(echo "$v" | tr ' =' '_-')
        env $v $BIN bench --shape ${VARIANT_SHAPES:-smollm2-135m llama2-7b opt-6.7b llama2-13b} --dtype ${VARIANT_DTYPE:-f16} \
          --csv "$OUT/var_$tag.csv" > "$OUT/var_$tag.txt" 2>&1 || { echo "variant $v failed:"; tail -3 "$OUT/var_$tag.txt"; }
      done
      python3 - "$OUT" <<'PY'
import csv, glob, os, sys
rows = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "var_*.csv"))):
    tag = os.path.basename(f)[4:-4]
    for r in csv.DictReader(open(f)):
        rows.setdefault(r["model"], []).append((tag, float(r["median_ms"]), float(r["ratio_to_floor"]), float(r["achieved_gbps"])))
for m, vs in rows.items():
    for tag, ms, x, gb in vs:
        print(f"{m:<14} {tag:<44} {ms:8.3f} ms  x{x:5.2f}  {gb:6.0f} GB/s")
PY
      ;;
    mlp)
      for dt in f16 bf16; do
        $BIN bench --mlp-block --shape ${MLP_SHAPES:-smollm2-135m opt-1.3b opt-6.7b opt-13b opt-66b opt-175b llama2-7b llama2-13b llama2-70b} \
          --keep 1 0.5 0.25 0.1 --dtype $dt --json "$OUT/mlp_$dt.json" --csv "$OUT/mlp_$dt.csv" 2>/dev/null
      done ;;
    topk)
      M="$CARRY/smollm2.gguf"
      # The copies are a deterministic function of the weights: made here when not carried (60 MB).
      [ -f "$CARRY/qscore.safetensors" ] || { $BIN calibrate --rule qscore -m "$M" --text "$CARRY/data/wikitext2-test.raw.txt" \
        --tokens 512 --run /tmp/qrun > /dev/null 2>&1 && cp /tmp/qrun/qscore.safetensors "$CARRY/qscore.safetensors"; }
      $BIN engine-check --json "$OUT/check_kernels.json" > "$OUT/check_kernels.txt" 2>&1; grep -E "topk|qscore|exactdown|NO" "$OUT/check_kernels.txt" | tail -40
      # Predictors (RUN/predictors of SmolLM2, 41 MB) when carried: dejavu@0.5's MLP and 3 of 9 heads dropped.
      PRED=(); [ -d "$CARRY/predictors" ] && PRED=(--predictors "$CARRY/predictors" --head-sparsity 0.3333)
      # The same heads with the key/value heads of dropped heads skipped (kept sets and greedy agreement).
      [ -d "$CARRY/predictors" ] && DEJAVU_REFERENCE_ROUND=f16 $BIN engine-check --no-kernels --models "$M" --prompts "$CARRY/data/prompts.txt" \
        --n 50 --steps 64 --predictors "$CARRY/predictors" --head-sparsity 0.3333 --head-kv kept > "$OUT/check_heads_kept.txt" 2>&1
      tail -4 "$OUT/check_heads_kept.txt" 2>/dev/null
      DEJAVU_REFERENCE_ROUND=f16 $BIN engine-check --no-kernels --models "$M" --prompts "$CARRY/data/prompts.txt" --n 50 --steps 64 \
        --topk-sparsity 0.5 --qscore "$CARRY/qscore.safetensors" "${PRED[@]}" --json "$OUT/check_topk.json" > "$OUT/check_topk.txt" 2>&1; tail -12 "$OUT/check_topk.txt"
      for rule in exactdown qscore; do
        $BIN bench --mlp-block --rule $rule --shape ${TOPK_SHAPES:-llama2-7b llama2-13b llama2-70b} --keep 0.5 0.25 0.1 --dtype f16 \
          --json "$OUT/mlp_$rule.json" --csv "$OUT/mlp_$rule.csv" 2>/dev/null
      done
      $BIN bench --mlp-block --rule dejavu --shape ${DEJAVU_SHAPES:-opt-6.7b opt-13b opt-66b opt-175b llama2-7b} --keep 0.5 0.25 0.1 \
        --dtype f16 --json "$OUT/mlp_dejavu.json" --csv "$OUT/mlp_dejavu.csv" 2>/dev/null ;;
    real)
      M="$CARRY/smollm2.gguf"
      ART=(--thresholds "$CARRY/th/smollm2-th.json" --qscore "$CARRY/qscore.safetensors" --rules "$CARRY/rules.json")
      MODES="dense cats@0.5 qscore@0.5+greedy"
      [ -d "$CARRY/predictors" ] && ART+=(--predictors "$CARRY/predictors") && MODES="$MODES dejavu@0.5"
      for m in $MODES; do
        H=(); [ "$m" = dejavu@0.5 ] && H=(--head-sparsity 0.3333)
        $BIN ppl -m "$M" --device cuda --text "$CARRY/data/wikitext2-test.raw.txt" --max-tokens 16384 --ctx 512 --mode $m "${ART[@]}" "${H[@]}" \
          --json "$OUT/real_ppl_$m.json" 2>/dev/null | tail -1
        $BIN eval -m "$M" --device cuda --tasks-dir "$CARRY/tasks" --limit 200 --mode $m "${ART[@]}" "${H[@]}" --out "$OUT/real_eval_$m" 2>/dev/null | tail -9
        $BIN generate -m "$M" --device cuda --prompt "Once upon a time" -n 256 --ignore-eos --timings --mode $m "${ART[@]}" "${H[@]}" 2>&1 | tail -2
      done ;;
    e2e)
      for sh in opt-6.7b opt-13b; do
        $BIN bench --shape $sh --batch 1 4 16 --csv "$OUT/e2e_dense_$sh.csv" 2>/dev/null
        $BIN bench --shape $sh --batch 1 4 16 --mode dejavu@0.9 --head-sparsity 0.5 --csv "$OUT/e2e_sparse_$sh.csv" 2>/dev/null
        $BIN bench --shape $sh --batch 1 --mode dejavu@0.9 --head-sparsity 0.5 --rank 256 --csv "$OUT/e2e_sparse_r256_$sh.csv" 2>/dev/null
        $BIN bench --shape $sh --batch 1 --mode dejavu@0.9 --head-sparsity 0.5 --rank 256 --head-kv kept --csv "$OUT/e2e_sparse_r256_kept_$sh.csv" 2>/dev/null
      done
      for sh in llama2-7b llama2-13b; do
        $BIN bench --shape $sh --batch 1 4 16 --csv "$OUT/e2e_dense_$sh.csv" 2>/dev/null
        $BIN bench --shape $sh --batch 1 4 16 --mode qscore@0.5 --head-sparsity 0.3 --csv "$OUT/e2e_sparse_$sh.csv" 2>/dev/null
      done
      # Where the sparse step's time goes (per kernel class), batch 1 and 4, beside dense (short runs; the sparse
      # prefill runs through the selecting path too, so long prompts at batch 16 take minutes).
      $BIN bench --shape opt-13b llama2-7b --batch 1 4 --tokens 32 --prompt 32 --breakdown 2>/dev/null
      $BIN bench --shape opt-13b --batch 1 4 --mode dejavu@0.9 --head-sparsity 0.5 --tokens 32 --prompt 32 --breakdown 2>/dev/null
      $BIN bench --shape llama2-7b --batch 1 4 --mode qscore@0.5 --head-sparsity 0.3 --tokens 32 --prompt 32 --breakdown 2>/dev/null ;;
    rules)
      M="$CARRY/smollm2.gguf"
      for m in ${RULE_MODES:-oracle@0.5 dejavu@0.5 wina@0.5 teal@0.5 qscore@0.5 exactdown@0.7 qscore@0.7 qscore@0.7+greedy cascade@0.7 oracle@0.7 cats@0.7 teal@0.7 wina@0.7 dejavu@0.7}; do
        R="$CARRY/rules.json"; case $m in teal*|wina*|exactdown*|cascade*) R="$CARRY/rules-exact.json" ;; esac
        $BIN eval -m "$M" --device burn-cuda --tasks-dir "$CARRY/tasks" --limit 200 --mode $m --thresholds "$CARRY/th/smollm2-th.json" \
          --qscore "$CARRY/qscore.safetensors" --rules "$R" --predictors "$CARRY/predictors" --out "$OUT/rules_$m" 2>/dev/null | tail -9
      done ;;
    ncu)
      NCU="ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv --launch-skip 1200 --launch-count 700"
      for b in BIN ${BIN2:+BIN2}; do
        $NCU --log-file "$OUT/ncu_sparse_$b.csv" ${!b} bench --shape opt-13b --prompt 4 --tokens 3 --warmup 0 \
          --mode dejavu@0.9 --head-sparsity 0.5 --rank 256 > /dev/null
        $NCU --log-file "$OUT/ncu_dense_$b.csv" ${!b} bench --shape llama2-7b --prompt 4 --tokens 3 --warmup 0 > /dev/null
      done
      for k in sparse dense; do
        python3 scripts/ncu_table.py "BIN=$OUT/ncu_${k}_BIN.csv" ${BIN2:+"BIN2=$OUT/ncu_${k}_BIN2.csv"}
      done ;;
    startup)
      rm -rf "$DEJAVU_CACHE"
      for run in cold warm; do
        s=$(date +%s.%N)
        $BIN generate -m "${STARTUP_MODEL:-$CARRY/stories260k}" --device cuda --prompt "Once upon a time" -n 1 --ignore-eos > /dev/null
        e=$(date +%s.%N)
        echo "startup $run: $(python3 -c "print(round($e - $s, 3))") s (process start to first token, incl. weight upload)"
      done ;;
  esac
done
