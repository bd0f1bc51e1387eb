#!/usr/bin/env bash
# GPU-box session for the SmolLM2 evaluation (issue 5), run from the repo root on the box, which has no Rust and no
# ../shared: the binary (built here with --features cuda), the GGUF in parts and trimmed data travel in .carry/.
#   stash  : keep .carry/a and .carry/c (GGUF part 1, gguf wheel, tasks, text) in /root/stash across calls
#   prep   : reassemble the GGUF from the stash + .carry/b, check its sha256, unpack the binary, install gguf
#   dense  : generate + ppl on cuda, then dense eval per task (500 examples) with --dump, until $BUDGET_S seconds
#   hfcheck: transformers on the same GGUF re-scores the dumped requests (scripts/hf_eval_check.py)
#   sparse : calibrate CATS on cuda, then eval --compare dense,cats@0.5,cats@0.7,oracle@0.5,oracle@0.7
# Results go to $OUT (set by the device tool).
set -euo pipefail
R=/root/run
S=/root/stash
BIN=$R/dejavu
M=$R/SmolLM2-135M-Instruct.Q4_1.gguf
case "$1" in
stash)
  mkdir -p $S && cp -r .carry/a .carry/c $S/ && ls -la $S/a $S/c && nvidia-smi --query-gpu=name,memory.used --format=csv ;;
prep)
  mkdir -p $R
  cat $S/a/gguf_part_aa .carry/b/gguf_part_ab > $M
  (cd $R && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf) | diff - <(sed 's#models/smollm2/##' $S/a/gguf.sha256)
  [ -f .carry/b/dejavu.xz ] && python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" .carry/b/dejavu.xz $BIN && chmod +x $BIN
  python3 -m pip install -q --no-index --no-deps --target /tmp/site $S/a/*.whl
  echo prep ok ;;
dense)
  start=$(date +%s); budget=${BUDGET_S:-420}
  $BIN generate --model $M --device cuda --prompt "The capital of France is" -n 3 --timings 2>&1 | tee $OUT/generate.txt
  $BIN ppl --model $M --device cuda --text $S/c/text/wikitext2-test.raw.txt --max-tokens 16384 --json $OUT/ppl_cuda.json 2>&1 | tail -3
  for t in copa arc_easy boolq hellaswag lambada_openai openbook_qa piqa winogrande; do
    if (( $(date +%s) - start > budget )); then echo "budget reached before $t"; break; fi
    $BIN eval --model $M --device cuda --tasks-dir $S/c/tasks --tasks $t --limit 500 --out $R/dense_$t --dump $R/dump_$t.jsonl 2>&1 | grep "| dense" || true
  done
  cat $R/dump_*.jsonl > $R/dump_dense.jsonl; head -c 0 $R/dump_dense.jsonl
  python3 - $R $OUT <<'PY'
import csv, glob, sys
rows = []
for f in sorted(glob.glob(sys.argv[1] + "/dense_*/results.csv")):
    rows += list(csv.DictReader(open(f)))
with open(sys.argv[2] + "/dense_results.csv", "w") as o:
    w = csv.DictWriter(o, fieldnames=rows[0].keys()); w.writeheader(); w.writerows(rows)
PY
  ;;
hfcheck)
  export PYTHONPATH=/tmp/site
  dump=${DUMP:-$R/dump_dense.jsonl}
  python3 scripts/hf_eval_check.py $R SmolLM2-135M-Instruct.Q4_1.gguf $dump 2>&1 | grep -v Warning | tee $OUT/hf_check.md ;;
sparse)
  $BIN calibrate --model $M --device cuda --text $S/c/text/wikitext2-valid.tokenized.txt --sparsity 0.5,0.7 --tokens 65536 \
    --out $OUT/thresholds.json 2>&1 | tail -4
  $BIN eval --model $M --device cuda --tasks-dir $S/c/tasks --limit ${LIMIT:-500} --thresholds $OUT/thresholds.json \
    --compare ${MODES:-dense,cats@0.5,cats@0.7,oracle@0.5,oracle@0.7} --ppl $S/c/text/wikitext2-test.raw.txt --ppl-tokens 16384 \
    --out $R/sparse 2>&1 | grep "^|"
  cp $R/sparse/results.csv $R/sparse/layers.csv $R/sparse/results.json $OUT/ ;;
esac
