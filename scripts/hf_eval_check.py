#!/usr/bin/env python3
"""Cross-check `dejavu eval --dump` against Hugging Face transformers, independently of dejavu's forward.

transformers loads the same GGUF (dequantizing it with the `gguf` package and undoing llama.cpp's q/k
permutation itself), scores every dumped request from the very token ids dejavu scored (so tokenization is not
what is compared: it was checked separately against llama.cpp, see README-tokenizer-check.md), and recomputes
each task's accuracy from its own log-likelihoods with the harness rules.

usage: python3 hf_eval_check.py MODEL_DIR GGUF_NAME DUMP.jsonl [--device cuda]
"""
import argparse
import json
import math
from collections import defaultdict

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("gguf")
    ap.add_argument("dump")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, gguf_file=a.gguf, dtype=torch.float32)
    model = model.to(a.device).eval()
    stats = defaultdict(lambda: {"n": 0, "ours": 0, "hf": 0, "ours_norm": 0, "hf_norm": 0, "max_dll": 0.0, "greedy_agree": 0, "reqs": 0})
    with open(a.dump) as f, torch.no_grad():
        for line in f:
            ex = json.loads(line)
            reqs = ex["requests"]
            hf_ll, hf_greedy = [], []
            for r in reqs:
                ids = torch.tensor([r["tokens"]], device=a.device)
                logp = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)[0]
                n = r["n_cont"]
                tgt = ids[0, -n:]
                rows = logp[-n - 1:-1]
                hf_ll.append(rows.gather(1, tgt[:, None]).sum().item())
                hf_greedy.append(bool((rows.argmax(-1) == tgt).all().item()))
            s = stats[(ex["mode"], ex["task"])]
            s["n"] += 1
            ours = [r["loglik"] for r in reqs]
            for r, l, g in zip(reqs, hf_ll, hf_greedy):
                s["max_dll"] = max(s["max_dll"], abs(r["loglik"] - l))
                s["greedy_agree"] += int(r["greedy"] == g)
                s["reqs"] += 1
            if ex["task"] == "lambada_openai":
                s["ours"] += int(reqs[0]["greedy"])
                s["hf"] += int(hf_greedy[0])
            else:
                argmax = lambda xs: max(range(len(xs)), key=lambda i: xs[i])
                s["ours"] += int(argmax(ours) == ex["gold"])
                s["hf"] += int(argmax(hf_ll) == ex["gold"])
                nb = ex["choice_bytes"]
                s["ours_norm"] += int(argmax([x / max(b, 1) for x, b in zip(ours, nb)]) == ex["gold"])
                s["hf_norm"] += int(argmax([x / max(b, 1) for x, b in zip(hf_ll, nb)]) == ex["gold"])
    print("| mode | task | n | acc dejavu | acc transformers | acc_norm dejavu | acc_norm transformers | max abs Δ loglik | greedy agree |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (mode, task), s in sorted(stats.items()):
        n = s["n"]
        print(f"| {mode} | {task} | {n} | {s['ours']/n:.4f} | {s['hf']/n:.4f} | {s['ours_norm']/n:.4f} | {s['hf_norm']/n:.4f} | "
              f"{s['max_dll']:.2e} | {s['greedy_agree']}/{s['reqs']} |")


if __name__ == "__main__":
    main()
