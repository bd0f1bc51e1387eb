#!/usr/bin/env python3
"""How well can a *linear* score of the MLP input rank a Llama layer's neurons? An independent check (transformers,
not dejavu) of what the Deja Vu neuron predictor's form can reach on SmolLM2.

For every layer, over the first --tokens tokens of the text (windows of --seq-len), with x the MLP's normalised
input, g = gate_proj(x), u = up_proj(x): the labels are each token's top `density` neurons by |SiLU(g)·u| (the
rule `dejavu train-predictors` uses), and each score below keeps each token's top-k neurons:
  gate      g itself (the exact gate pre-activation: the best a full-rank linear predictor could copy)
  gate_rR   g through the best rank-R approximation of gate_proj (truncated SVD), R = --rank
  silu_gate |SiLU(g)| (exact; not linear)
Printed per score and label density: recall at k = ffn/2, and the density k/ffn needed for 0.99 recall.

usage: python3 neuron_ceiling.py MODEL_DIR GGUF_NAME TEXT [--tokens 8192] [--rank 128]
"""
import argparse

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer


def hits_by_k(scores, labels):
    """hits[k] = labelled units among each row's top-k scores, summed over rows, k = 0..n."""
    order = scores.argsort(dim=1, descending=True)
    lab = labels.gather(1, order).double().sum(0)
    return torch.cat([torch.zeros(1, dtype=lab.dtype, device=lab.device), lab.cumsum(0)])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("gguf")
    ap.add_argument("text")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--densities", default="0.5,0.25")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(a.model_dir, gguf_file=a.gguf)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, gguf_file=a.gguf, dtype=torch.float32).to(dev).eval()
    text = open(a.text, encoding="utf-8").read()[: a.tokens * 8]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    seq = a.seq_len - 1
    n_win = max(1, min(len(ids) // seq, a.tokens // seq))
    bos = tok.bos_token_id if tok.bos_token_id is not None else 1
    batch = torch.tensor([[bos] + ids[i * seq:(i + 1) * seq] for i in range(n_win)], device=dev)
    layers = model.model.layers
    inputs = {}
    hooks = [l.mlp.register_forward_hook(lambda m, inp, out, i=i: inputs.setdefault(i, []).append(inp[0].detach()))
             for i, l in enumerate(layers)]
    with torch.no_grad():
        for row in batch:
            model(input_ids=row[None])
    for h in hooks:
        h.remove()
    dens = [float(d) for d in a.densities.split(",")]
    rows = {}
    with torch.no_grad():
        for i, l in enumerate(layers):
            x = torch.cat(inputs[i], dim=1)[0, :]  # [T, d], BOS rows included as dejavu collects them
            wg = l.mlp.gate_proj.weight.float()
            g = x @ wg.T
            u = l.mlp.up_proj(x)
            target = (F.silu(g) * u).abs()
            uu, ss, vv = torch.linalg.svd(wg, full_matrices=False)
            r = a.rank
            scores = {"gate": g, f"gate_r{r}": (x @ vv[:r].T) @ (uu[:, :r] * ss[:r]).T, "silu_gate": F.silu(g).abs()}
            n = g.shape[1]
            for d in dens:
                k = max(1, round(d * n))
                thr = target.topk(k, dim=1).values[:, -1:]
                labels = target >= thr
                for name, s in scores.items():
                    h = hits_by_k(s, labels)
                    p = h[-1].item()
                    need = next(kk for kk in range(n + 1) if h[kk].item() >= 0.99 * p - 1e-9)
                    rows.setdefault((name, d), []).append((h[n // 2].item() / p, need / n))
    print(f"SmolLM2 neuron ranking by linear scores of the MLP input: {batch.numel()} tokens, {len(layers)} layers")
    print("| score | label density | mean recall at k = ffn/2 | min over layers | mean density for 0.99 recall |")
    print("|---|---|---|---|---|")
    for (name, d), v in rows.items():
        rec = [x for x, _ in v]
        den = [y for _, y in v]
        print(f"| {name} | {d} | {sum(rec) / len(rec):.4f} | {min(rec):.4f} | {sum(den) / len(den):.3f} |")


if __name__ == "__main__":
    main()
