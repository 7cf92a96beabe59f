#!/usr/bin/env python3
"""Per-cell medians of repeated `attn-bench speed` runs, with the issue-5 ratios.

    python3 tools/grid-medians.py --overhead-ms 0.47 --medians OUT.csv --runs OUT_runs.csv \
        1.5='/tmp/grid_std1.5_*/speed.csv' 0.444='/tmp/grid_std0.444_*/speed.csv'

Each STD=GLOB names the runs made at one `--score-std`. Per cell (score std, seq, method and
requested density, normaliser, dtype): the median time and GFLOP/s over the runs, the ratio to
the dense cell, that ratio over ρ, entmax-1.5 ÷ softmax, f16 ÷ f32, and for ρ <= 0.25 whether
the cell meets the block-sparse bound `time <= 1.5·ρ·dense + overhead` (the fixed cost per call,
measured separately, e.g. at seq 32). Prints the summary the closing notes quote.
"""
import argparse, csv, glob, statistics
from collections import defaultdict

ap = argparse.ArgumentParser()
ap.add_argument("--overhead-ms", type=float, required=True)
ap.add_argument("--medians", required=True)
ap.add_argument("--runs", required=True)
ap.add_argument("sets", nargs="+", help="STD=GLOB")
a = ap.parse_args()

runs = defaultdict(list)
allrows = []
for spec in a.sets:
    std, pattern = spec.split("=", 1)
    for ri, f in enumerate(sorted(glob.glob(pattern))):
        for r in csv.DictReader(open(f)):
            if r["status"] != "ok":
                continue
            key = (std, int(r["seq"]), r["method"] + "@" + r["requested_density"], r["normalizer"], r["dtype"])
            runs[key].append(r)
            allrows.append(dict(score_std=std, run=ri, **r))

med = {}
for k, v in runs.items():
    med[k] = dict(ms=statistics.median(float(x["attention_ms"]) for x in v), gf=statistics.median(float(x["gflops"]) for x in v),
                  rho=float(v[0]["density"]), req=float(v[0]["requested_density"]), tiles=v[0]["tiles"], paths=v[0]["entmax_paths"], n=len(v))

out = ["score_std,seq,method,density,normalizer,dtype,runs,median_ms,gflops,over_dense,over_rho_dense,entmax_over_softmax,f16_over_f32,within_sparse_bound,tiles,entmax_paths"]
ratios, bound, f16 = [], defaultdict(lambda: [0, 0]), []
for k in sorted(med, key=lambda k: (k[0], k[1], not k[2].startswith("dense"), -med[k]["rho"], k[3], k[4])):
    std, seq, method, norm, dt = k
    m = med[k]
    d = med.get((std, seq, "dense@1.000000", norm, dt))
    od = m["ms"] / d["ms"] if d else float("nan")
    eos = ""
    if norm == "entmax15" and (std, seq, method, "softmax", dt) in med:
        e = m["ms"] / med[(std, seq, method, "softmax", dt)]["ms"]
        eos = f"{e:.3f}"
        ratios.append((e, k))
    fo = ""
    if dt == "f16" and (std, seq, method, norm, "f32") in med:
        x = m["ms"] / med[(std, seq, method, norm, "f32")]["ms"]
        fo = f"{x:.3f}"
        f16.append(x)
    wb = ""
    if d and not method.startswith("dense") and m["req"] <= 0.25:
        ok = m["ms"] <= 1.5 * m["rho"] * d["ms"] + a.overhead_ms
        wb = "yes" if ok else "no"
        bound[(std, norm)][0 if ok else 1] += 1
    out.append(f"{std},{seq},{method},{m['rho']:.4f},{norm},{dt},{m['n']},{m['ms']:.3f},{m['gf']:.3f},{od:.4f},{od / m['rho']:.3f},{eos},{fo},{wb},{m['tiles']},{m['paths']}")
open(a.medians, "w").write("\n".join(out) + "\n")
with open(a.runs, "w") as f:
    w = csv.DictWriter(f, fieldnames=list(allrows[0].keys()), extrasaction="ignore")
    w.writeheader()
    for r in allrows:
        w.writerow(r)
for spec in a.sets:
    std = spec.split("=", 1)[0]
    e = [x for x in ratios if x[1][0] == std]
    if e:
        over = [(k[1], k[2], k[4], round(v, 2)) for v, k in e if v > 1.5]
        print(f"std {std}: entmax/softmax {min(x[0] for x in e):.2f}-{max(x[0] for x in e):.2f}, {len(over)} of {len(e)} above 1.5: {over}")
for k, v in sorted(bound.items()):
    print(f"bound std {k[0]} {k[1]}: {v[0]} within, {v[1]} not")
if f16:
    print(f"f16/f32 median {statistics.median(f16):.3f} ({min(f16):.3f}-{max(f16):.3f})")
