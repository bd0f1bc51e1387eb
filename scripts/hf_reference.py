#!/usr/bin/env python3
"""Compute Hugging Face transformers reference logits for the committed fixture models.

Run once on a machine with torch + transformers (the GPU box has both; CPU is used so results are
deterministic):  python3 scripts/hf_reference.py tests/fixtures
For every fixture directory (config.json + model.safetensors) it writes reference.safetensors holding
`input_ids` (int64 [2, 12]) and `logits` (float32 [2, 12, vocab]) from transformers in float32 with eager
attention, plus `logits_f64` from the same weights in float64 as a precision yardstick.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def load(d, dtype):
    try:
        m = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="eager")
    except TypeError:
        m = AutoModelForCausalLM.from_pretrained(d, torch_dtype=dtype, attn_implementation="eager")
    return m.eval()


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
    rows = []
    for d in sorted(p for p in root.iterdir() if (p / "config.json").exists()):
        cfg = json.loads((d / "config.json").read_text())
        rng = np.random.default_rng(1234)
        ids = torch.tensor(rng.integers(0, cfg["vocab_size"], size=(2, 12)), dtype=torch.int64)
        with torch.no_grad():
            m32 = load(d, torch.float32)
            l32 = m32(input_ids=ids).logits.float()
            m64 = load(d, torch.float64)
            l64 = m64(input_ids=ids).logits
        diff = (l32.double() - l64).abs().max().item()
        save_file(
            {"input_ids": ids.contiguous(), "logits": l32.contiguous(), "logits_f64": l64.contiguous()},
            str(d / "reference.safetensors"),
            metadata={"transformers": transformers.__version__, "torch": torch.__version__},
        )
        rows.append((d.name, tuple(l32.shape), float(l32.abs().max()), diff))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print("| fixture | logits shape | max |logit| | max |f32 - f64| |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.2e} |")


if __name__ == "__main__":
    main()
