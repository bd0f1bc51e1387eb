#!/usr/bin/env python3
"""What one GPU reads per second, to set `dejavu bench`'s floor beside the rates a plain read and cuBLAS reach.

`dejavu bench` divides a step's weight bytes by the device-to-device copy rate (bytes read + written), as
../shared/docs/PERF.md does. This script measures, on the same GPU and in one process (torch only, random data):
  * copy: `dst.copy_(src)` over 1 GiB, one copy between two events, counted as bytes read + written (what
    bench's floor uses; captured in a CUDA graph the same copy measured 2,444 GB/s on an H100 where bench's
    uncaptured copy gives ~3,000);
  * read: `torch.sum(x, dtype=float32)` over f16 buffers of the decode step's matrix sizes (a streaming read that
    writes almost nothing);
  * gemv: `torch.mv(W, x)` (cuBLAS) at the matrix shapes of one decode step of the given model shape, batch 1,
    f16: the rate a library GEMV reaches on each matrix, to compare with `bench --kernels`;
  * whole step: `torch.sum` over one f16 buffer of all the step's layer matrices' bytes (one streaming read of
    everything a decode step reads but the head, timed uncaptured): what a kernel that did nothing but read the step's
    weights would score against the floor (copy rate / this rate).
The read and gemv figures are medians over `--reps` replays of a CUDA graph of 16 calls (CUDA events); their
buffers rotate over copies totalling at least `--rotate-mb`, so that no call finds its operand in the L2 cache
(50-60 MB on an H100/H200). Run once on an H100 (kernels/NOTES.md, twentieth session); the uncaptured copy since.

  python3 scripts/read_rate.py --shape llama2-7b llama2-13b
"""
import argparse, statistics

import torch

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _stream_read(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        pid = tl.program_id(0)
        base = pid.to(tl.int64) * BLOCK * ITERS
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(ITERS):
            offs = base + i * BLOCK + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.store(out_ptr + pid, tl.sum(acc, axis=0))
except ImportError:  # the figure is left out without Triton
    triton = None

# (elements a tile, tiles a program, warps)
TRITON_TILES = [(4096, 8, 4), (8192, 8, 8), (8192, 16, 8), (16384, 4, 16)]

# name: (hidden, ffn, heads, kv heads, head dim, swiglu, layers)
SHAPES = {
    "llama2-7b": (4096, 11008, 32, 32, 128, True, 32),
    "llama2-13b": (5120, 13824, 40, 40, 128, True, 40),
    "opt-6.7b": (4096, 16384, 32, 32, 128, False, 32),
    "opt-13b": (5120, 20480, 40, 40, 128, False, 40),
}


def events_ms(run, reps):
    """Median ms of `run()` between two CUDA events, over `reps` runs after 3 untimed ones."""
    ts = []
    for i in range(reps + 3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        run()
        e.record()
        e.synchronize()
        if i >= 3:
            ts.append(s.elapsed_time(e))
    return statistics.median(ts)


def timed(fn, reps, inner=16):
    """Median ms of one `fn(j)`: `inner` calls captured in one CUDA graph (no launch gaps), replayed `reps` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for j in range(3):
            fn(j)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(inner):
            fn(j)
    return events_ms(graph.replay, reps) / inner


def copies(shape, dtype, rotate_bytes):
    one = torch.Size(shape).numel() * torch.finfo(dtype).bits // 8
    n = max(2, -(-rotate_bytes // one))
    return [torch.randn(shape, device="cuda", dtype=dtype) for _ in range(n)], one


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", default=["llama2-7b"], choices=sorted(SHAPES))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rotate-mb", type=int, default=512)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("read_rate.py: no CUDA GPU visible to torch")
    rot = a.rotate_mb << 20
    print(f"device: {torch.cuda.get_device_name()}")
    g = 1 << 30
    src, dst = torch.ones(g // 2, device="cuda", dtype=torch.float16), torch.empty(g // 2, device="cuda", dtype=torch.float16)
    ms = events_ms(lambda: dst.copy_(src), a.reps)  # one copy per pair of events, as `bench` times its floor
    copy = 2 * g / (ms * 1e-3)
    print(f"copy 1 GiB: {ms:.3f} ms, {copy / 1e9:.1f} GB/s (bytes read + written)")
    del src, dst
    rows, wholes = [], []
    for name in a.shape:
        h, f, nh, kvh, hd, glu, layers = SHAPES[name]
        mats = [("q/k/v", ((nh + 2 * kvh) * hd, h)), ("out", (h, nh * hd)),
                ("gate+up" if glu else "fc1", ((2 if glu else 1) * f, h)), ("down" if glu else "fc2", (h, f))]
        for what, (n, k) in mats:
            ws, one = copies((n, k), torch.float16, rot)
            x = torch.randn(k, device="cuda", dtype=torch.float16)
            ms_r = timed(lambda i: torch.sum(ws[i % len(ws)], dtype=torch.float32), a.reps)
            ms_g = timed(lambda i: torch.mv(ws[i % len(ws)], x), a.reps)
            rows.append((name, what, n, k, one, ms_r, ms_g))
            del ws
            torch.cuda.empty_cache()
        total = layers * sum(n * k for _, (n, k) in mats)
        big = torch.ones(total, device="cuda", dtype=torch.float16)
        ms_w = events_ms(lambda: torch.sum(big, dtype=torch.float32), max(5, a.reps // 3))
        ms_t = float("nan")
        if triton is not None:
            for blk, it, nw in TRITON_TILES:
                progs = -(-total // (blk * it))
                part = torch.empty(progs, device="cuda", dtype=torch.float32)
                run = lambda: _stream_read[(progs,)](big, part, total, BLOCK=blk, ITERS=it, num_warps=nw)
                ms = events_ms(run, max(5, a.reps // 3))
                if abs(part.sum().item() - total) > 1e-3 * total:
                    raise SystemExit(f"read_rate.py: the Triton read summed {part.sum().item()} over {total} ones")
                ms_t = ms if ms_t != ms_t else min(ms_t, ms)
                del part
        wholes.append((name, total * 2, ms_w, ms_t))
        del big
        torch.cuda.empty_cache()
    print()
    print("| shape | matrix | rows x cols | MB | floor at copy, us | sum, us (GB/s) | cuBLAS mv, us (GB/s) |")
    print("|---|---|---|---|---|---|---|")
    for name, what, n, k, one, ms_r, ms_g in rows:
        fl = one / copy * 1e6
        print(f"| {name} | {what} | {n} x {k} | {one / 1e6:.1f} | {fl:.1f} | {ms_r * 1e3:.1f} ({one / ms_r / 1e6:.0f}) | "
              f"{ms_g * 1e3:.1f} ({one / ms_g / 1e6:.0f}) |")
    print()
    print("| shape | step's layer weights, GB | floor at copy, ms | torch.sum, ms (GB/s, x floor) | Triton read, ms (GB/s, x floor) |")
    print("|---|---|---|---|---|")
    for name, b, ms_w, ms_t in wholes:
        fl = b / copy * 1e3
        print(f"| {name} | {b / 1e9:.2f} | {fl:.3f} | {ms_w:.3f} ({b / ms_w / 1e6:.0f}, {ms_w / fl:.3f}x) | "
              f"{ms_t:.3f} ({b / ms_t / 1e6:.0f}, {ms_t / fl:.3f}x) |")


if __name__ == "__main__":
    main()
