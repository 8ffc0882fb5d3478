"""Tune the Llama-2-7B int4 task set (and the README example's) on this GPU; then time tuned kernels
against the template defaults and TVM's stock dlight schedule.

    python benchmarks/tune_llama.py --trials 128 --out DIR      # on the H200; records -> DIR/sm_90.jsonl
    python benchmarks/tune_llama.py --no-compare ...             # tune only (the comparison takes minutes)
    python benchmarks/tune_llama.py --compare-only LOG --out DIR # compare LOG's winners, no tuning

Tasks are what `nibble compile` builds for these shapes (fp16 activations, no bias, group 128): the GEMV
and GEMM token buckets and the unbounded GEMM copy of each linear (compiler/dispatch.py), with the same
keys compile looks up, so the records file can be committed as tuning_logs/sm_90.jsonl. Timing as
benchmarks/bench_linear.py:
median of CUDA-graph replays, weight copies rotated over more than 3x the L2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]
MS = [1, 4, 16, 200, 2048]


def llama_tasks(spec):
    """The tasks `nibble compile` makes for the four Llama-2-7B linears (fp16 model, no bias)."""
    import tvm
    from tvm import relax

    from compiler.build import prepare
    from compiler.int4_kernel import int4_matmul_func, kernel_name
    from compiler.quantize import QuantConfig
    from compiler.tuning import extract_tasks

    cfg = QuantConfig(128, True)
    bb = relax.BlockBuilder()
    m = tvm.tirx.Var("m", "int64")
    params = {}
    for k, n in SHAPES:
        params[(k, n)] = [relax.Var(f"x{k}_{n}", relax.TensorType([m, k], "float16")),
                          relax.Var(f"q{k}_{n}", relax.TensorType([n, k // 8], "uint32")),
                          relax.Var(f"s{k}_{n}", relax.TensorType([n, k // 128], "float16"))]
    flat = [v for vs in params.values() for v in vs]
    with bb.function("main", flat):
        with bb.dataflow():
            outs = []
            for (k, n), (x, q, s) in params.items():
                gv = bb.add_func(int4_matmul_func(n, k, cfg), kernel_name(n, k, cfg, "float16", False))
                outs.append(bb.emit(relax.call_tir(gv, [x, q, s], relax.TensorType([m, n], "float16"))))
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("num_input", len(flat))
    mod, _ = prepare(mod, spec)
    return mod, extract_tasks(mod, spec)


def attention_tasks():
    """Llama-2-7B's decode attention kernels as compile makes them from nibble/hf.py's export (32 heads of
    128, fp16 cache, fp32 mask [b, 1, s, T], output in token order): main's over the whole cache and
    main_new_kv's over (past, new) loaded early, each one-block and split (compiler/fuse_attention.py)."""
    from compiler.dispatch import KERNEL_ATTR
    from compiler.tuning import attention_task
    from schedules.attention import ATTENTION, DEFAULT, SPLIT, attention_func

    dtypes = {"q": "float16", "kv": "float16", "bias": "float32", "out": "float16"}
    tasks = []
    for two in (False, True):
        for cfg in (DEFAULT, SPLIT):
            f = attention_func(32, 128, 128 ** -0.5, dtypes, ("b", 1, "s"), cfg, two_source=two, out_layout="bshd",
                               early_loads=two)
            # calls=1, as llama_tasks' linears: every kernel runs once per layer, so equal trial budgets
            tasks.append(attention_task(f.with_attr({KERNEL_ATTR: ATTENTION, "tirx.is_scheduled": True}), calls=1))
    return tasks


def compare_attention(tasks, best, spec, rounds: int = 2) -> list[dict]:
    """Each attention task's tuned config against its default, both timed by tuning.measure (the cache
    rotated past the L2, summed over the task's two key counts), in alternating order."""
    import tvm

    from compiler.tuning import measure

    rows = []
    for t in tasks:
        d, b = t.default(spec), best.get(t.key, {}).get("config")
        times, sets = {"default": [], "tuned": []}, {}  # sets: the task's cache copies, shared by all timings
        for _ in range(rounds):
            for label, cfg in (("default", d), ("tuned", b), ("tuned", b), ("default", d)):
                if cfg is not None:
                    times[label].append(measure(t, cfg, spec, tvm.cuda(0), sets=sets))
        row = {"key": t.key, "ms": list(t.ms), "default": d, "config": b,
               **{f"us_{k}": sum(v) / len(v) for k, v in times.items() if v}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def example_tasks(spec, tmp: Path):
    """The tasks of the README's `nibble demo` model (TinyGPT exported to ONNX, fp32, with biases)."""
    from compiler.build import BuildOptions, lower, prepare
    from compiler.tuning import extract_tasks
    from frontends import import_model
    from nibble.example import export_onnx, tiny_gpt

    export_onnx(tiny_gpt(), tmp / "tiny_gpt.onnx")
    mod, _, _, _ = lower(import_model(tmp / "tiny_gpt.onnx"), BuildOptions(), log=lambda *_: None)  # as compile does
    mod, _ = prepare(mod, spec)
    return extract_tasks(mod, spec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=128, help="trials for the Llama task set")
    ap.add_argument("--example-trials", type=int, default=40)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-compare", action="store_true", help="stop after tuning (records in OUT/sm_90.jsonl)")
    ap.add_argument("--tasks", default=None, metavar="SUBSTR",
                    help="tune only the Llama tasks whose key contains SUBSTR (e.g. ':wgmma:129-256')")
    ap.add_argument("--resume", action="store_true", help="start from the records already in OUT/sm_90.jsonl "
                    "(copy tuning_logs/sm_90.jsonl there first): they are not re-run, --trials are new ones")
    ap.add_argument("--compare-only", metavar="LOG", help="no tuning: time the winners of this records file "
                    "(compiler.tuning.TuningLog.best) against the defaults and dlight")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    import tvm
    from tvm.s_tir import dlight as dl

    from bench_linear import _static_m, graph_time, rel_err
    from compiler.cuda import ensure_cuda_runtime, register_nvcc_callback
    from compiler.quantize import QuantConfig, dequantize, quantize
    from compiler.target import resolve, tvm_target
    from compiler.tuning import CONFIG_ATTR, TuningLog, tune
    from schedules import gpu_rules

    ensure_cuda_runtime()
    register_nvcc_callback("sm_90")
    spec = resolve("cuda", "sm_90")
    target = tvm_target(spec)
    log = TuningLog(out / "sm_90.jsonl", spec)
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tvm": tvm.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(meta), flush=True)

    mod, tasks = llama_tasks(spec)
    tasks += attention_tasks()
    meta["llama_tasks"] = len(tasks)
    if args.compare_only:  # no trials, no tune time: the records file's winners
        best = TuningLog(Path(args.compare_only), spec).best()
        meta["records"] = args.compare_only
    else:
        if args.tasks:
            tasks = [t for t in tasks if args.tasks in t.key]
            meta["llama_tasks"], meta["only"] = len(tasks), args.tasks
        meta["llama_trials"] = args.trials
        t0 = time.perf_counter()
        best = tune(tasks, spec, log, args.trials, resume=args.resume, out=lambda s: print(s, flush=True))
        meta["llama_tune_s"] = time.perf_counter() - t0
        print(f"Llama task set: {len(tasks)} tasks, {args.trials} trials, {meta['llama_tune_s']:.0f} s", flush=True)
        if args.example_trials:
            ex_tasks = example_tasks(spec, out)
            t0 = time.perf_counter()
            tune(ex_tasks, spec, log, args.example_trials, out=lambda s: print(s, flush=True))
            meta["example_tune_s"] = time.perf_counter() - t0
        (out / "tune_meta.json").write_text(json.dumps(meta, indent=1))
        if args.no_compare:
            return

    # -- tuned vs defaults vs dlight, per shape and M; the attention kernels tuned vs default ------------
    att_rows = compare_attention([t for t in tasks if t.kind == "attention"], best, spec)
    from compiler.dispatch import copy_name, kernel_for

    cfg = QuantConfig(128, True)
    dev = torch.device("cuda")
    rows = []
    for k, n in SHAPES if any(t.kind != "attention" for t in tasks) else ():  # (--tasks :attention: : none)
        funcs = {}
        for task in tasks:
            if not task.key.startswith(f"int4_matmul_n{n}_k{k}_"):
                continue
            name = copy_name(task.m if task.low else None, task.kind)  # "mma8", "wgmma256", "wgmma"
            funcs[f"default_{name}"] = task.func.with_attr("global_symbol", f"default_{name}")
            if task.key in best:
                funcs[f"tuned_{name}"] = task.func.with_attr({"global_symbol": f"tuned_{name}",
                                                              CONFIG_ATTR: best[task.key]["config"]})
        stock = {f"dlight_m{m}": _static_m(n, k, m).with_attr("global_symbol", f"dlight_m{m}") for m in MS}
        ours, st = tvm.IRModule(funcs), tvm.IRModule(stock)
        with target:
            ours = dl.ApplyDefaultSchedule(*gpu_rules(target))(ours)
            st = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                         dl.gpu.GeneralReduction(), dl.gpu.Fallback())(st)
        lib = tvm.compile(tvm.IRModule({**dict(ours.functions_items()), **dict(st.functions_items())}), target=target)
        rng = np.random.default_rng(k + n)
        w = rng.standard_normal((n, k), dtype=np.float32) * 0.02
        parts = quantize(w, cfg)
        w_deq = torch.from_numpy(dequantize(parts, k, cfg)).to(dev)
        wbytes = parts["qweight"].nbytes + parts["scales"].nbytes
        tdev = tvm.cuda(0)
        wargs = [(tvm.runtime.tensor(parts["qweight"], device=tdev), tvm.runtime.tensor(parts["scales"], device=tdev))
                 for _ in range(max(2, math.ceil(3 * 60 * 2**20 / wbytes)))]
        sel = lambda lst: [lst[i % len(lst)] for i in range(24)]  # noqa: E731
        for m in MS:
            kind = kernel_for(m)  # "mma8", ..., "wgmma256", "wgmma"
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            y = torch.full((m, n), float("nan"), device=dev, dtype=torch.float16)
            tx, ty = tvm.runtime.from_dlpack(x), tvm.runtime.from_dlpack(y)
            ref = x.float() @ w_deq.t()
            row = {"K": k, "N": n, "M": m, "kernel": kind}
            labels = [(label, fname) for label, fname in (("default", f"default_{kind}"), ("tuned", f"tuned_{kind}"),
                                                          ("dlight", f"dlight_m{m}"))
                      if fname in funcs or fname.startswith("dlight")]
            for label, fname in labels:
                y.fill_(float("nan"))
                lib[fname](tx, wargs[0][0], wargs[0][1], ty)
                torch.cuda.synchronize()
                row[f"err_{label}"] = rel_err(y, ref)
            # default and tuned timed in both orders, then averaged: timed once each, one after the other,
            # identical configs read 5-10% apart on the heavy shapes (h200_tune.md, runs 5-6); averaged
            # over both orders they still differ by up to 5% there (run 7, an A/A check), cause unknown
            pair = [lt for lt in labels if lt[0] != "dlight"]
            times = {label: [] for label, _ in labels}
            for label, fname in pair + pair[::-1] + [lt for lt in labels if lt[0] == "dlight"]:
                f = lib[fname]
                times[label].append(graph_time([lambda a=a, f=f: f(tx, a[0], a[1], ty) for a in sel(wargs)], torch) * 1e6)
            for label, ts in times.items():
                row[f"us_{label}"] = sum(ts) / len(ts)
            key = next((t.key for t in tasks if t.key.startswith(f"int4_matmul_n{n}_k{k}_")
                        and copy_name(t.m if t.low else None, t.kind) == kind), None)
            row["config"] = best.get(key, {}).get("config")
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "tune_llama.json").write_text(json.dumps({"meta": meta, "rows": rows, "attention": att_rows}, indent=1))
    lines = [f"# Tuning on {meta['device']} ({meta['date']})", "",
             f"torch {meta['torch']}, TVM {meta['tvm']}. Llama-2-7B task set: {meta['llama_tasks']} tasks, "
             + (f"the winners of {meta['records']} (no tuning in this run)." if args.compare_only else
                f"{meta['llama_trials']} trials, {meta['llama_tune_s']:.0f} s wall."), "",
             "| K->N | M | kernel | default us | tuned us | tuned/default | dlight us | err tuned | tuned config |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, t = r.get("us_default"), r.get("us_tuned")
        lines.append(f"| {r['K']}->{r['N']} | {r['M']} | {r['kernel']} | {d:.1f} | "
                     f"{t:.1f} | {d / t:.2f}x | {r['us_dlight']:.1f} | {r.get('err_tuned', float('nan')):.1e} | "
                     f"{r['config']} |" if t else
                     f"| {r['K']}->{r['N']} | {r['M']} | {r['kernel']} | {d:.1f} | - | - | {r['us_dlight']:.1f} | - | untuned |")
    lines += ["", "Decode attention kernels (us summed over the two key counts timed; default and tuned "
              "alternated, each timed 4 times):", "",
              "| task | keys | default config | default us | tuned us | default/tuned | tuned config |",
              "|---|---|---|---|---|---|---|"]
    for r in att_rows:
        t = r.get("us_tuned")
        lines.append(f"| {r['key'].split(':')[0]} | {r['ms']} | {r['default']} | {r['us_default']:.1f} | "
                     + (f"{t:.1f} | {r['us_default'] / t:.2f}x | {r['config']} |" if t else "- | - | untuned |"))
    (out / "tune_llama.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
