#!/usr/bin/env bash
# CPU speed of the reference forward (issue 3, acceptance 4): scoring 512-token sequences and greedy decoding
# with the KV cache, per-token cost at ~128 vs ~1024 positions. Usage: scripts/cpu_speed.sh MODEL [OUTDIR]
set -euo pipefail
model=${1:?model path}
out=${2:-out/cpu_speed}
shared=${DEJAVU_SHARED:-../shared}
bin=${DEJAVU_BIN:-${CARGO_TARGET_DIR:-target}/release/dejavu}
mkdir -p "$out"
"$bin" ppl --model "$model" --text "$shared/data/text/wikitext2-test.raw.txt" --max-tokens 4096 --ctx 512 --stride 512 \
  --json "$out/score.json" > "$out/score.md"
"$bin" generate --model "$model" --prompt "Once upon a time" -n 1030 --ignore-eos --json "$out/decode.json" > /dev/null
python3 - "$out" <<'PY'
import json, statistics, sys
out = sys.argv[1]
s = json.load(open(f"{out}/score.json"))
d = json.load(open(f"{out}/decode.json"))
p = len(d["prompt_ids"])
steps = d["step_ms"]  # step i feeds the token at position p + i
def window(lo, hi):
    xs = [t for i, t in enumerate(steps) if lo <= p + i < hi]
    return statistics.median(xs), len(xs)
m128, n128 = window(96, 160)
m1024, n1024 = window(992, 1056)
print("| measure | value |")
print("|---|---|")
print(f"| scoring, 512-token windows (4096 tokens) | {s['forward_tokens_per_s']:.1f} tokens/s |")
print(f"| decode, median ms/token at positions 96-159 ({n128} steps) | {m128:.1f} ms ({1000/m128:.1f} tokens/s) |")
print(f"| decode, median ms/token at positions 992-1055 ({n1024} steps) | {m1024:.1f} ms ({1000/m1024:.1f} tokens/s) |")
print(f"| ratio 1024/128 | {m1024/m128:.2f} |")
PY
