#!/usr/bin/env python3
"""Hugging Face transformers decode latency with RANDOM weights at named real model shapes.

Meant to be printed beside `dejavu bench` at the same shapes (needs torch + transformers 5.x and one CUDA GPU;
no network, no checkpoints). Each model is built straight on the GPU in f16/bf16 from a config, its matrices are
filled with normal(0, 0.02), then, per shape:
  * prefill a random prompt [batch, prompt] with use_cache=True, then `tokens` greedy steps, each
    model(input_ids=next[:, None], cache, use_cache=True) followed by an argmax over the last logits;
  * `warmup` full prefill+decode runs come first, so the timed run covers KV lengths already seen (HF eager pays
    extra on the first pass over each new KV length);
  * the timed run brackets the prefill and every decode step with torch.cuda.Event pairs and synchronises once at
    the end; we report the median and p90 step time, tokens/s = batch * 1000 / median, and achieved GB/s =
    weight bytes (a tied embedding counted once) / median step time.
Engine "hf-eager" is the default dynamic cache without compilation; with --static-compile also "hf-compile":
StaticCache + torch.compile(mode="reduce-overhead") on the decode step only (prefill stays eager, as in
generate()); it passes a fixed-length attention mask and explicit position_ids, else OPT graph-breaks every step.

  python3 scripts/hf_decode.py --shape llama2-7b opt-6.7b --batch 1 --prompt 128 --tokens 128 --json hf.json
"""
import argparse, gc, inspect, json, math, statistics, sys

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, StaticCache

# name: (hidden, ffn, layers, heads, kv heads, vocab, family, extra LlamaConfig kwargs)
SHAPES = {
    "opt-125m": (768, 3072, 12, 12, 12, 50272, "opt", {}),
    "opt-1.3b": (2048, 8192, 24, 32, 32, 50272, "opt", {}),
    "opt-2.7b": (2560, 10240, 32, 32, 32, 50272, "opt", {}),
    "opt-6.7b": (4096, 16384, 32, 32, 32, 50272, "opt", {}),
    "opt-13b": (5120, 20480, 40, 40, 40, 50272, "opt", {}),
    "opt-30b": (7168, 28672, 48, 56, 56, 50272, "opt", {}),
    "opt-66b": (9216, 36864, 64, 72, 72, 50272, "opt", {}),
    "opt-175b": (12288, 49152, 96, 96, 96, 50272, "opt", {}),
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000, "llama", {}),
    "llama2-13b": (5120, 13824, 40, 40, 40, 32000, "llama", {}),
    "llama2-70b": (8192, 28672, 80, 64, 8, 32000, "llama", {}),
    "mistral-7b": (4096, 14336, 32, 32, 8, 32000, "llama", {"rope_theta": 1e6}),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152, "llama",
                     {"tie_word_embeddings": True, "rope_theta": 1e5, "head_dim": 64}),
}
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}


def make_config(name):
    d, ffn, n, h, kv, vocab, fam, extra = SHAPES[name]
    if fam == "opt":
        return OPTConfig(hidden_size=d, ffn_dim=ffn, num_hidden_layers=n, num_attention_heads=h, vocab_size=vocab,
                         max_position_embeddings=2048, word_embed_proj_dim=d, do_layer_norm_before=True)
    kw = {"tie_word_embeddings": False, "rope_theta": 10000.0, **extra}
    return LlamaConfig(hidden_size=d, intermediate_size=ffn, num_hidden_layers=n, num_attention_heads=h,
                       num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, rms_norm_eps=1e-5, **kw)


def estimate_params(name):
    d, ffn, n, h, kv, vocab, fam, extra = SHAPES[name]
    if fam == "opt":  # tied head; learned positions (2048 + offset 2); biases; two LayerNorms per layer + final
        return vocab * d + 2050 * d + n * (4 * d * d + 4 * d + 2 * d * ffn + ffn + d + 4 * d) + 2 * d
    kvd = kv * (d // h)
    head = 0 if extra.get("tie_word_embeddings") else vocab * d
    return vocab * d + head + n * (2 * d * d + 2 * d * kvd + 3 * d * ffn + 2 * d) + d


def build(name, dtype, attn):
    cfg = make_config(name)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):  # parameters are allocated on the GPU in `dtype`, never on the host
            try:
                model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
            except TypeError:  # transformers that only know `torch_dtype`
                model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation=attn)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for p in model.parameters():  # shared (tied) parameters are yielded once
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            elif not torch.isfinite(p).all():
                p.fill_(1.0)
    if any(p.device.type != "cuda" or p.dtype != dtype for p in model.parameters()):
        raise RuntimeError(f"some parameters are not cuda/{dtype}")
    return model.eval()


def oneline(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def run_once(model, ids, tokens, cache=None, step=None, mask_len=0):
    """One prefill + `tokens` greedy steps; returns (prefill ms, [ms per decode step]).
    With a StaticCache (mask_len > 0) every call also gets a fixed-size attention mask and explicit position_ids,
    so the compiled decode step sees the same shapes each time and never reads the cache length back to the host."""
    params = inspect.signature(model.forward).parameters
    ckw = "cache" if "cache" in params else "past_key_values"  # renamed in later transformers 5.x
    B, P = ids.shape
    pos = torch.arange(P + tokens, device=ids.device)
    mask = torch.ones(B, mask_len, dtype=torch.long, device=ids.device) if mask_len else None

    def inputs(lo, hi):
        kw = {"attention_mask": mask, "position_ids": pos[None, lo:hi]} if mask_len else {}
        if "cache_position" in params:  # older 5.x releases take it
            kw["cache_position"] = pos[lo:hi]
        return kw

    ev = lambda: torch.cuda.Event(enable_timing=True)
    p0, p1 = ev(), ev()
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # prefill needs the last logits only
    p0.record()
    out = model(input_ids=ids, use_cache=True, **({ckw: cache} if cache is not None else {}), **inputs(0, P), **extra)
    nxt = out.logits[:, -1].argmax(-1)
    p1.record()
    if cache is None:
        cache = getattr(out, "cache", None)
        cache = out.past_key_values if cache is None else cache
    del out
    step = step or model
    marks = []
    for i in range(P, P + tokens):
        kw = inputs(i, i + 1)
        if step is not model:
            torch.compiler.cudagraph_mark_step_begin()
        s, e = ev(), ev()
        s.record()
        logits = step(input_ids=nxt[:, None], use_cache=True, **{ckw: cache}, **kw).logits
        nxt = logits[:, -1].argmax(-1)
        e.record()
        marks.append((s, e))
    torch.cuda.synchronize()
    return p0.elapsed_time(p1), [s.elapsed_time(e) for s, e in marks]


def measure(name, engine, model, args, wbytes):
    ids = torch.randint(0, SHAPES[name][5], (args.batch, args.prompt), device="cuda")
    cache = step = None
    warm, L = args.warmup, 0
    if engine == "hf-compile":
        L = args.prompt + args.tokens
        cache = StaticCache(config=model.config, max_cache_len=L)  # allocated on first use, reset per run
        step = torch.compile(model.__call__, mode="reduce-overhead", fullgraph=False)
        warm = max(warm, 1)  # compilation and CUDA-graph capture must not land in the timed run
    ctx = torch.no_grad() if engine == "hf-compile" else torch.inference_mode()
    with ctx:
        for i in range(warm + 1):
            if cache is not None:
                cache.reset()
            prefill, steps = run_once(model, ids, args.tokens, cache, step, L)
            if i < warm:
                print(f"  {engine} {name}: warm-up {i + 1}/{warm} done, median {statistics.median(steps):.3f} ms",
                      file=sys.stderr, flush=True)
    med = statistics.median(steps)
    p90 = sorted(steps)[max(0, math.ceil(0.9 * len(steps)) - 1)]
    return dict(engine=engine, shape=name, dtype=args.dtype, batch=args.batch, prompt=args.prompt,
                tokens=args.tokens, prefill_ms=round(prefill, 3), median_ms=round(med, 4), p90_ms=round(p90, 4),
                tok_s=round(args.batch * 1000.0 / med, 2), weight_bytes=wbytes,
                gb_s=round(wbytes / (med * 1e-3) / 1e9, 1), attn=args.attn,
                gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__)


def bench_shape(name, args, rows):
    dtype = DTYPES[args.dtype]
    d, ffn, n, h, kv, vocab, fam, extra = SHAPES[name]
    max_pos = 2048 if fam == "opt" else 4096
    if args.prompt + args.tokens > max_pos:
        print(f"SKIP {name}: prompt+tokens {args.prompt + args.tokens} > max positions {max_pos}", flush=True)
        return
    hd = extra.get("head_dim", d // h)
    kv_bytes = 2 * n * args.batch * kv * hd * (args.prompt + args.tokens + 1) * 2
    need = estimate_params(name) * 2 + kv_bytes + (1 << 30)  # weights + KV cache + 1 GiB working room
    free = torch.cuda.mem_get_info()[0]
    if need > free:
        print(f"SKIP {name}: needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free", flush=True)
        return
    print(f"building {name} ({args.dtype}) ...", file=sys.stderr, flush=True)
    model = build(name, dtype, args.attn)
    wbytes = sum({p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}.values())
    engines = ["hf-eager"] + (["hf-compile"] if args.static_compile else [])
    for engine in engines:
        try:
            rows.append(measure(name, engine, model, args, wbytes))
            print(f"  {engine} {name}: {rows[-1]['median_ms']:.3f} ms/token", file=sys.stderr, flush=True)
        except Exception as e:  # one engine failing must not stop the others
            print(f"{'SKIP' if engine == 'hf-compile' else 'FAIL'} {engine} {name}: {oneline(e)}", flush=True)
        finally:
            if engine == "hf-compile":
                torch._dynamo.reset()
            gc.collect()
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", nargs="+", required=True, choices=list(SHAPES) + ["all"])
    ap.add_argument("--dtype", choices=list(DTYPES), default="f16")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--static-compile", action="store_true", help="also time StaticCache + torch.compile")
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="HF attention kernel (default sdpa)")
    args = ap.parse_args()
    if args.tokens < 1 or args.prompt < 1 or args.batch < 1:
        ap.error("--batch, --prompt and --tokens must be >= 1")
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    names = list(SHAPES) if "all" in args.shape else list(dict.fromkeys(args.shape))
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}",
          file=sys.stderr, flush=True)
    rows = []
    for name in names:
        try:
            bench_shape(name, args, rows)
        except Exception as e:
            print(f"FAIL {name}: {oneline(e)}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    cols = [("engine", 10, ""), ("shape", 13, ""), ("dtype", 5, ""), ("batch", 5, ""), ("prompt", 6, ""),
            ("tokens", 6, ""), ("prefill_ms", 10, ".2f"), ("median_ms", 9, ".3f"), ("p90_ms", 8, ".3f"),
            ("tok_s", 9, ".1f"), ("weight_gb", 9, ".2f"), ("gb_s", 7, ".1f")]
    print(" ".join(f"{c:>{w}}" for c, w, _ in cols))
    for r in rows:
        r2 = dict(r, weight_gb=r["weight_bytes"] / 1e9)
        print(" ".join(f"{r2[c]:>{w}{f}}" for c, w, f in cols))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
