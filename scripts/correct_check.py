#!/usr/bin/env python3
"""Sirius invariant on a real model through the CLI: for each prompt line, dense greedy decoding and corrected
sparse decoding with --accept argmax (periods 1, 4, 16) must give the same tokens; uncorrected sparse decoding is
printed beside them to show the plan changes tokens. Usage: correct_check.py BIN MODEL PROMPTS [N_PROMPTS] [TOKENS] [MODE]
"""
import json, subprocess, sys, tempfile, os

bin_, model, prompts = sys.argv[1:4]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 50
tokens = sys.argv[5] if len(sys.argv) > 5 else "64"
mode = sys.argv[6] if len(sys.argv) > 6 else "oracle@0.5"
lines = [l.strip() for l in open(prompts, encoding="utf-8") if len(l.strip()) > 8][:n]
tmp = tempfile.mkdtemp()

def run(extra):
    out = os.path.join(tmp, "g.json")
    cmd = [bin_, "generate", "-m", model, "--prompt", line, "-n", tokens, "--ignore-eos", "--json", out] + extra
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.load(open(out))

same = {1: 0, 4: 0, 16: 0}
sparse_differs = 0
for i, line in enumerate(lines):
    dense = run([])["new_ids"]
    raw = run(["--mode", mode])["new_ids"]
    sparse_differs += raw != dense
    row = []
    for k in (1, 4, 16):
        c = run(["--mode", mode, "--correct", "--accept", "argmax", "--period", str(k)])
        same[k] += c["new_ids"] == dense
        row.append(f"K={k}: {'same' if c['new_ids'] == dense else 'DIFFERENT'} (sparse fraction {c['sparse_fraction']:.2f})")
    print(f"{i + 1:3d} uncorrected {'differs' if raw != dense else 'same   '} | " + " | ".join(row), flush=True)
print(f"\n{model} {mode}, {len(lines)} prompts x {tokens} tokens: uncorrected differs from dense on {sparse_differs}; "
      + ", ".join(f"K={k}: {v}/{len(lines)} identical to dense greedy" for k, v in same.items()))
