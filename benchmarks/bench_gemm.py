"""Prefill GEMM benchmark: nibble's tensor-core int4 GEMM (schedules/gemm.py) vs dlight's schedule of the
same PrimFunc vs cuBLAS fp16 (torch F.linear on the dequantized weight), on an NVIDIA GPU.

    python benchmarks/bench_gemm.py [--out DIR] [--variants] [--quick]

Shapes: Llama-2-7B linears (N <- K) 12288<-4096 (qkv), 4096<-4096 (o), 22016<-4096 (gate+up),
4096<-11008 (down), int4 symmetric, group 128, fp16 activations; M (tokens) in {32, 200, 2048}.
Numerics first (NaN-poisoned outputs, fresh random inputs, relative error vs an fp32 reference of the
dequantized weights, also at M = 17, 333 and with zero points + bias), then timing: CUDA events around
single launches, each after a 512 MiB write that evicts the L2 (see time_fn), median of 40.
--variants also times other tile configs of the GEMM (for the per-arch defaults in schedules/gemm.py;
a variant replaces the tile of every bucket, the split stays automatic).
Writes gemm_<gpu>.md / .json to --out (default benchmarks/results) and prints the table last.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]  # (N, K)
MS = (32, 200, 2048)


def variants():
    from schedules.gemm import Config

    return {  # label -> Config, timed with both launches set to it (w: warps_m x warps_n)
        "128x128x32 s4 w2x4": Config(),
        "128x128x64 s3 w2x4": Config(block_k=64, stages=3, w_vec=4),
        "128x128x64 s4 w2x4": Config(block_k=64, stages=4, w_vec=4),
        "128x128x64 s3 w2x2": Config(block_k=64, stages=3, w_vec=4, warps_n=2),
        "128x256x64 s3 w2x4": Config(block_n=256, block_k=64, stages=3, w_vec=4),
        "64x128x64 s4 w2x4": Config(block_m=64, block_k=64, w_vec=4),
        "64x128x64 s4 w1x4": Config(block_m=64, block_k=64, w_vec=4, warps_m=1),
        "64x64x64 s4 w2x2": Config(block_m=64, block_n=64, block_k=64, w_vec=4, warps_m=2, warps_n=2),
    }


PTXAS = []  # (kernel source tag, ptxas -v lines)


def register_nvcc(arch: str):
    """nvcc callback that also records ptxas -v (registers, spills) for the report."""
    import tvm_ffi

    from compiler.cuda import nvcc_path

    nvcc = nvcc_path()

    def compile_cuda(code: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="nb-gemm-") as tmp:
            cu, cubin = Path(tmp, "k.cu"), Path(tmp, "k.cubin")
            cu.write_text(code)
            r = subprocess.run([nvcc, "--cubin", "-O3", f"-arch={arch}", "-Xptxas", "-v", "-o", str(cubin), str(cu)],
                               capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(r.stderr[-3000:])
            PTXAS.append([ln.strip() for ln in r.stderr.splitlines()
                          if "registers" in ln or "spill" in ln or "Compiling entry" in ln])
            return bytearray(cubin.read_bytes())

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)


def build(func, target, rule):
    """Compile one PrimFunc scheduled by `rule` ("nibble" ArchConfig or "dlight") -> callable. For
    nibble: the GEMM bucket copies of compiler.dispatch.ROUTES + the unbounded one, and the callable runs
    the copy the dispatch would run for x's row count (as a compiled model does)."""
    import tvm

    if rule == "dlight":
        from tvm.s_tir import dlight as dl

        mod = tvm.IRModule({"main": func.with_attr({"global_symbol": "main", "nibble.kernel": "gemm"})})
        with target:
            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Fallback())(mod)
        return tvm.compile(mod, target=target)["main"]
    from compiler.dispatch import ROUTES, bucket_copy, kernel_for
    from schedules.gemm import GEMM

    funcs = {}
    for rows, kind in [(r, k) for r, k in ROUTES if k == "gemm"] + [(None, "gemm")]:
        name = f"gemm{'' if rows is None else rows}"
        sch = GEMM(rule).apply(bucket_copy(func, name, rows, kind), target, False)
        if sch is None:
            return None
        funcs[name] = sch.mod["main"].with_attr("global_symbol", name)
    ex = tvm.compile(tvm.IRModule(funcs), target=target)
    fns = {name: ex[name] for name in funcs}

    def routed(x, *rest):
        return fns[kernel_for(int(x.shape[0]))](x, *rest)

    return routed


def dequant_torch(q, s, k, g):
    """fp32 W[N, K] from packed uint32 q[N, K/8] and fp16 scales (symmetric), = compiler.quantize.dequantize."""
    import torch

    shifts = torch.arange(0, 32, 4, device=q.device, dtype=torch.int32)
    nib = (q.view(torch.int32)[:, :, None] >> shifts) & 15
    nib = nib.reshape(q.shape[0], -1)[:, :k].float()
    return (nib - 8.0) * s.float().repeat_interleave(g, dim=1)[:, :k]


FLUSH = []


def time_fn(fn, args, reps=40):
    """Median and spread (max-min over median) of single launches, microseconds. Before each launch a
    512 MiB write evicts the L2 (weights then come from HBM) and gives the CPU ~150 us to enqueue the
    call, so host-side call overhead stays out of the GPU interval between the two events."""
    import torch

    if not FLUSH:
        FLUSH.append(torch.empty(512 << 20, dtype=torch.uint8, device="cuda"))
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(reps):
        FLUSH[0].zero_()
        e0.record()
        fn(*args)
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3)
    med = statistics.median(ts)
    return med, (sorted(ts)[int(0.9 * reps)] - sorted(ts)[int(0.1 * reps)]) / med


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--variants", action="store_true")
    ap.add_argument("--quick", action="store_true", help="one shape, for a smoke run")
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F
    import tvm

    from compiler.int4_kernel import int4_matmul_func
    from compiler.quantize import QuantConfig
    from compiler.target import resolve, tvm_target
    from schedules.gemm import config_for

    torch.backends.cuda.matmul.allow_tf32 = False
    arch = "sm_" + "".join(map(str, torch.cuda.get_device_capability()))
    spec = resolve("cuda", arch)
    target = tvm_target(spec)
    register_nvcc(arch)
    dev = torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    default = config_for(target)
    shapes = SHAPES[:2] if args.quick else SHAPES
    g = 128
    rows, checks, var_rows = [], [], []
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    def tv(t):
        return tvm.runtime.from_dlpack(t)

    def rel(a, b):
        return float((a.float() - b).norm() / b.norm())

    def run_tvm(f, x, q, s, *extra):
        y = torch.empty(x.shape[0], q.shape[0], dtype=torch.float16, device=dev)
        f(tv(x), tv(q), tv(s), *map(tv, extra), tv(y))
        return y

    # numerics with zero points and bias (the other PrimFunc variant), one shape
    n, k = 4096, 4096
    fz = int4_matmul_func(n, k, QuantConfig(g, False), "float16", has_bias=True)
    nb = build(fz, target, default)
    q = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device=dev).view(torch.uint32)
    s = (torch.rand(n, k // g, device=dev) * 0.02 + 0.005).half()
    z = torch.randint(0, 16, (n, k // g), device=dev).half()
    b = torch.randn(n, device=dev).half()
    w = (dequant_torch(q, s, k, g) + 8.0 * s.float().repeat_interleave(g, 1)
         - (z.float() * s.float()).repeat_interleave(g, 1))  # (q - z) * s
    for m in (17, 333):
        x = torch.randn(m, k, device=dev).half()
        y = torch.full((m, n), float("nan"), dtype=torch.float16, device=dev)
        nb(tv(x), tv(q), tv(s), tv(z), tv(b), tv(y))
        ref = x.float() @ w.T + b.float()
        checks.append({"shape": f"{n}<-{k} asym+bias", "m": m, "rel_err": rel(y, ref),
                       "nan": bool(torch.isnan(y).any())})
        log("check", checks[-1])

    for n, k in shapes:
        f = int4_matmul_func(n, k, QuantConfig(g, True), "float16")
        t0 = time.time()
        nb, dl_ = build(f, target, default), build(f, target, "dlight")
        log(f"built {n}<-{k} in {time.time() - t0:.1f} s")
        q0 = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device=dev).view(torch.uint32)
        s0 = (torch.rand(n, k // g, device=dev) * 0.02 + 0.005).half()
        w32 = dequant_torch(q0, s0, k, g)
        # numerics (poisoned outputs; fresh x per m)
        for m in (17, 200, 333, 2048):
            x = torch.randn(m, k, device=dev).half()
            ref = x.float() @ w32.T
            for name, fn in (("nibble", nb), ("dlight", dl_)):
                y = torch.full((m, n), float("nan"), dtype=torch.float16, device=dev)
                fn(tv(x), tv(q0), tv(s0), tv(y))
                checks.append({"shape": f"{n}<-{k}", "m": m, "kernel": name, "rel_err": rel(y, ref),
                               "nan": bool(torch.isnan(y).any())})
                log("check", checks[-1])
        w16 = w32.half()
        for m in MS:
            xs = [torch.randn(m, k, device=dev).half()]
            y = torch.empty(m, n, dtype=torch.float16, device=dev)
            sets = (tv(xs[0]), tv(q0), tv(s0), tv(y))
            t_nb, sp_nb = time_fn(nb, sets)
            t_dl, sp_dl = time_fn(dl_, sets)
            t_cb, sp_cb = time_fn(lambda x_, w_: F.linear(x_, w_), (xs[0], w16))
            fl = 2.0 * m * n * k
            row = {"shape": f"{n}<-{k}", "m": m, "nibble_us": t_nb, "dlight_us": t_dl, "cublas_us": t_cb,
                   "nibble_tflops": fl / t_nb / 1e6, "dlight_tflops": fl / t_dl / 1e6,
                   "cublas_tflops": fl / t_cb / 1e6, "nibble_vs_cublas": t_cb / t_nb,
                   "dlight_vs_cublas": t_cb / t_dl, "spread": [sp_nb, sp_dl, sp_cb]}
            rows.append(row)
            log("time", row)
            if args.variants and m in (200, 2048):
                for label, c in variants().items():
                    try:
                        fv = build(f, target, dataclasses.replace(default, tiles=(), large=c))
                    except Exception as e:  # a variant that does not compile is a result too
                        var_rows.append({"shape": f"{n}<-{k}", "m": m, "config": label, "error": str(e)[-300:]})
                        continue
                    if fv is None:
                        var_rows.append({"shape": f"{n}<-{k}", "m": m, "config": label, "error": "does not fit"})
                        continue
                    y = torch.full((m, n), float("nan"), dtype=torch.float16, device=dev)
                    fv(tv(xs[0]), tv(q0), tv(s0), tv(y))
                    err = rel(y, xs[0].float() @ w32.T)
                    t_v, _ = time_fn(fv, sets)
                    var_rows.append({"shape": f"{n}<-{k}", "m": m, "config": label, "us": t_v,
                                     "tflops": fl / t_v / 1e6, "vs_cublas": t_cb / t_v, "rel_err": err})
                    log("variant", var_rows[-1])
            del xs, y, sets
        torch.cuda.empty_cache()

    meta = {"device": gpu, "arch": arch, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "tvm": tvm.__version__,
            "python": platform.python_version(), "group_size": g, "defaults": {
                "tiles": [[m_max, dataclasses.asdict(c)] for m_max, c in default.tiles],
                "large": dataclasses.asdict(default.large)},
            "method": "median of 40 single launches timed with CUDA events, each after a 512 MiB "
                      "write that evicts the 60 MiB L2 (weights and x from HBM)"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "h200" if "H200" in gpu else arch
    (out / f"gemm_{tag}.json").write_text(json.dumps(
        {"meta": meta, "timings": rows, "checks": checks, "variants": var_rows, "ptxas": PTXAS}, indent=1))
    md = [f"# int4 GEMM (prefill) on {gpu}", "",
          f"{meta['date']}, torch {meta['torch']} (CUDA {meta['cuda']}), TVM {meta['tvm']}. {meta['method']}.",
          "TFLOP/s = 2*M*N*K / time. vs cuBLAS = cuBLAS time / kernel time (> 1: faster than cuBLAS fp16).", "",
          "| shape (N<-K) | M | nibble us | TFLOP/s | dlight us | TFLOP/s | cuBLAS fp16 us | TFLOP/s "
          "| nibble/cuBLAS | dlight/cuBLAS |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['shape']} | {r['m']} | {r['nibble_us']:.1f} | {r['nibble_tflops']:.0f} | "
                  f"{r['dlight_us']:.1f} | {r['dlight_tflops']:.0f} | {r['cublas_us']:.1f} | "
                  f"{r['cublas_tflops']:.0f} | {r['nibble_vs_cublas']:.2f}x | {r['dlight_vs_cublas']:.2f}x |")
    md += ["", "Relative error vs fp32 reference (dequantized weights):", "",
           "| shape | M | kernel | rel. error |", "|---|---|---|---|"]
    for c in checks:
        md.append(f"| {c['shape']} | {c['m']} | {c.get('kernel', 'nibble')} | "
                  f"{c['rel_err']:.2e}{' NaN!' if c['nan'] else ''} |")
    if var_rows:
        md += ["", "Tile variants (every bucket copy set to the variant, automatic split):", "",
               "| shape | M | config | us | TFLOP/s | vs cuBLAS |", "|---|---|---|---|---|---|"]
        for v in var_rows:
            if "us" in v:
                md.append(f"| {v['shape']} | {v['m']} | {v['config']} | {v['us']:.1f} | {v['tflops']:.0f} | "
                          f"{v['vs_cublas']:.2f}x |")
            else:
                md.append(f"| {v['shape']} | {v['m']} | {v['config']} | {v['error'][:80]} | | |")
    (out / f"gemm_{tag}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    bad = [c for c in checks if c.get("kernel", "nibble") == "nibble" and (c["nan"] or c["rel_err"] > 2e-3)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
