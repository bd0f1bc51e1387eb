#!/usr/bin/env python3
"""Per-kernel table of one or more `ncu --csv` logs (metrics gpu__time_duration.sum and dram__bytes_read.sum),
side by side: count, median and mean us a call, GB/s, MB a call. Kernels are grouped by name, grid and block size,
so the same kernel at two shapes (e.g. the head and the neuron top-k) gets two rows.

    python3 scripts/ncu_table.py prev=ncu_prev.csv new=ncu_new.csv

ncu writes time in `ns`/`us`/`ms` (older versions: `nsecond`, ...) and bytes in `byte`/`Kbyte`/`Mbyte`/`Gbyte`."""
import collections
import csv
import io
import statistics
import sys

TIME = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
BYTES = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def load(path):
    txt = open(path).read()
    if '"ID"' not in txt:
        sys.exit(f"{path}: no ncu CSV table in it (did the profiled process run?)")
    times, nbytes = collections.defaultdict(list), collections.defaultdict(float)
    for r in csv.DictReader(io.StringIO(txt[txt.index('"ID"'):])):
        key = (r["Kernel Name"].split("(")[0], r.get("Grid Size", ""), r.get("Block Size", ""))
        v = float(r["Metric Value"].replace(",", ""))
        unit = r["Metric Unit"]
        if r["Metric Name"] == "gpu__time_duration.sum":
            if unit not in TIME:
                sys.exit(f"{path}: unknown time unit {unit!r}")
            times[key].append(v * TIME[unit])
        elif r["Metric Name"] == "dram__bytes_read.sum":
            if unit not in BYTES:
                sys.exit(f"{path}: unknown byte unit {unit!r}")
            nbytes[key] += v * BYTES[unit]
    return times, nbytes


def main(args):
    if not args:
        sys.exit(__doc__)
    runs = []
    for a in args:
        name, _, path = a.rpartition("=")
        runs.append((name or path, *load(path)))
    keys = sorted({k for _, t, _ in runs for k in t}, key=lambda k: -max(sum(t.get(k, [])) for _, t, _ in runs))
    print("| kernel | grid | block | " + " | ".join(f"{n}: calls, median us, mean us, GB/s, MB a call" for n, _, _ in runs) + " |")
    print("|---|---|---|" + "---|" * len(runs))
    for k in keys:
        cells = []
        for _, t, b in runs:
            v = t.get(k, [])
            if not v:
                cells.append("")
                continue
            tot = sum(v)
            cells.append(f"{len(v)}, {statistics.median(v):.2f}, {tot / len(v):.2f}, {b[k] / tot / 1e3:.0f}, {b[k] / len(v) / 1e6:.1f}")
        print(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    for n, t, _ in runs:
        print(f"{n}: {sum(sum(v) for v in t.values()):.1f} us over {sum(len(v) for v in t.values())} kernels")


if __name__ == "__main__":
    main(sys.argv[1:])
