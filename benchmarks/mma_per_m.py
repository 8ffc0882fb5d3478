"""Does the decode GEMV want another config at 1, 2 or 4 tokens than at 8? Every config of
schedules/gemv_mma.py's SPACE, built as the 8-token copy (mma8, which serves m = 1..8), timed at each M.

    python benchmarks/mma_per_m.py --out DIR     # on the H200: DIR/mma_per_m.{json,md}

If one config is at least 1.1x faster than the default at M = 1 or 4 while another wins at 8, the
decode buckets {1, 2, 4, 8, 16} that issue 4 names would pay: today one copy serves m = 1..8 and is
tuned on the sum of its times at 1 and 8. Timing as tune_llama.py: CUDA-graph medians, weight copies
rotated past the L2, every config timed in two passes of opposite order and the two averaged; the
default is built twice (as "default" and as its config in the sweep), so the table has an A/A pair.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tune_llama import SHAPES, llama_tasks  # noqa: E402

MS = (1, 2, 4, 8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    args = ap.parse_args()
    out, ms = Path(args.out), [int(m) for m in args.ms.split(",")]
    out.mkdir(parents=True, exist_ok=True)

    import torch
    import tvm
    from tvm.s_tir import dlight as dl

    from bench_linear import graph_time, rel_err
    from compiler.cuda import ensure_cuda_runtime, register_nvcc_callback
    from compiler.quantize import QuantConfig, dequantize, quantize
    from compiler.target import resolve, tvm_target
    from compiler.tuning import CONFIG_ATTR
    from schedules import gemv_mma, gpu_rules

    ensure_cuda_runtime()
    register_nvcc_callback("sm_90")
    spec = resolve("cuda", "sm_90")
    target = tvm_target(spec)
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tvm": tvm.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "ms": ms}
    print(json.dumps(meta), flush=True)
    _, tasks = llama_tasks(spec)
    space = [dict(zip(gemv_mma.SPACE, v)) for v in itertools.product(*gemv_mma.SPACE.values())]
    cfg_q, dev, tdev = QuantConfig(128, True), torch.device("cuda"), tvm.cuda(0)
    rows = []
    for k, n in SHAPES:
        task = next(t for t in tasks if t.key.startswith(f"int4_matmul_n{n}_k{k}_") and t.key.endswith(":mma:1-8"))
        default = task.default(spec)
        funcs = {"default": task.func.with_attr({"global_symbol": "default", CONFIG_ATTR: default})}
        for i, c in enumerate(space):
            funcs[f"c{i}"] = task.func.with_attr({"global_symbol": f"c{i}", CONFIG_ATTR: {**default, **c}})
        with target:
            mod = dl.ApplyDefaultSchedule(*gpu_rules(target))(tvm.IRModule(funcs))
        mod = tvm.IRModule({g: f for g, f in mod.functions_items() if f.attrs.get("tirx.is_scheduled")})
        names = sorted(g.name_hint for g in mod.get_global_vars())
        lib = tvm.compile(mod, target=target)
        rng = np.random.default_rng(k + n)
        parts = quantize(rng.standard_normal((n, k), dtype=np.float32) * 0.02, cfg_q)
        w_deq = torch.from_numpy(dequantize(parts, k, cfg_q)).to(dev)
        wbytes = parts["qweight"].nbytes + parts["scales"].nbytes
        wargs = [(tvm.runtime.tensor(parts["qweight"], device=tdev), tvm.runtime.tensor(parts["scales"], device=tdev))
                 for _ in range(max(2, math.ceil(3 * 60 * 2**20 / wbytes)))]
        sel = [wargs[i % len(wargs)] for i in range(24)]
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            y = torch.full((m, n), float("nan"), device=dev, dtype=torch.float16)
            tx, ty = tvm.runtime.from_dlpack(x), tvm.runtime.from_dlpack(y)
            ref = x.float() @ w_deq.t()
            times: dict[str, list] = {nm: [] for nm in names}
            for nm in names + names[::-1]:
                f = lib[nm]
                times[nm].append(graph_time([lambda a=a, f=f: f(tx, a[0], a[1], ty) for a in sel], torch) * 1e6)
            for nm in names:
                y.fill_(float("nan"))
                lib[nm](tx, wargs[0][0], wargs[0][1], ty)
                torch.cuda.synchronize()
                cfg = default if nm == "default" else {**default, **space[int(nm[1:])]}
                row = {"K": k, "N": n, "M": m, "name": nm, "config": {f: cfg[f] for f in gemv_mma.SPACE},
                       "is_default": cfg == default, "us": sum(times[nm]) / 2, "err": rel_err(y, ref)}
                rows.append(row)
            best = min((r for r in rows if r["K"] == k and r["N"] == n and r["M"] == m), key=lambda r: r["us"])
            d = next(r for r in rows if r["K"] == k and r["N"] == n and r["M"] == m and r["name"] == "default")
            print(f"{k}->{n} M={m}: default {d['us']:.2f} us, best {best['us']:.2f} {best['config']} "
                  f"({d['us'] / best['us']:.2f}x)", flush=True)
    (out / "mma_per_m.json").write_text(json.dumps({"meta": meta, "space": gemv_mma.SPACE, "rows": rows}, indent=1))
    write_md(out / "mma_per_m.md", meta, rows, ms)


def write_md(path, meta, rows, ms):
    """Per shape and M: the default, the A/A pair, the best config and the best at the other Ms."""
    lines = [f"# mma8 configs per token count on {meta['device']} ({meta['date']})", "",
             f"torch {meta['torch']}, TVM {meta['tvm']}. Every gemv_mma SPACE config built as the 8-token copy, "
             "timed at each M (us, mean of two passes of opposite order).", "",
             "| K->N | M | default us | default's twin us (A/A) | best us | best/default | best config | "
             "that config at the other Ms (vs default) |", "|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["K"], r["N"])  # noqa: E731
    for (k, n), grp in itertools.groupby(sorted(rows, key=key), key):
        grp = list(grp)
        for m in ms:
            at = [r for r in grp if r["M"] == m]
            d = next(r for r in at if r["name"] == "default")
            twin = next(r for r in at if r["is_default"] and r["name"] != "default")
            b = min(at, key=lambda r: r["us"])
            other = []
            for m2 in ms:
                if m2 == m:
                    continue
                at2 = [r for r in grp if r["M"] == m2]
                b2 = next(r for r in at2 if r["name"] == b["name"])
                d2 = next(r for r in at2 if r["name"] == "default")
                other.append(f"M={m2} {d2['us'] / b2['us']:.2f}x")
            lines.append(f"| {k}->{n} | {m} | {d['us']:.2f} | {twin['us']:.2f} | {b['us']:.2f} | "
                         f"{d['us'] / b['us']:.2f}x | {b['config']} | {', '.join(other)} |")
    Path(path).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
