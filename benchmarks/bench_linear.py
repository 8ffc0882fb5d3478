"""One int4 (W4A16, group 128, fp16 scales) linear on the GPU: nibble vs the alternatives, per shape and M.

    python benchmarks/bench_linear.py [--out DIR] [--shapes 4096x4096,...] [--ms 1,2,...]

Columns (median of CUDA-graph replays, each launch on its own weight copy so weights come from HBM:
enough copies rotate to exceed 3x the 60 MiB L2):
  copy     a device-to-device copy moving the same bytes as the int4 kernel (read + write counted =
           qweight + scales + x + y), timed the same way: the floor the targets are measured against
  nibble   our build: the GEMV copy for M <= 16 (its token bucket, as compiler/dispatch.py picks),
           the dlight-Matmul GEMM copy above
  dlight   TVM's stock dlight rules on the same PrimFunc, m made static (its best case)
  cublas   torch F.linear with the fp16 weight (4x the bytes)
  tinygemm torch._weight_int4pack_mm (torch's int4 kernel; bf16 activations, as it requires)
Before timing, every kernel is checked on fresh random inputs with a NaN-poisoned output against
x @ dequantize(W)^T in fp32 (rel. L2 error). Writes bench_linear.json / .md to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]  # Llama-2-7B (K, N)
MS = [1, 2, 4, 8, 16, 32, 200, 2048]
L2_BYTES = 60 * 2**20
ROTATE_BYTES = 3 * L2_BYTES  # weight copies in rotation exceed this, so each launch reads HBM
# GEMV config variants timed beside the default (name -> Config overrides), at the M's of VARIANT_MS
VARIANTS = {"ts2": dict(rows_per_thread=2), "ts8": dict(rows_per_thread=8)}
VARIANT_MS = (1, 4)
LAUNCHES = 24  # launches captured per CUDA graph (at least one pass over the copies)


def build_kernels(k, n, ms, target):
    """{name: tvm function}: nibble's GEMV buckets + GEMM copy, and static-m stock-dlight copies."""
    import tvm
    from tvm.s_tir import dlight as dl

    from compiler.dispatch import BUCKETS, KERNEL_ATTR, ROWS_ATTR
    from compiler.int4_kernel import int4_matmul_func
    from compiler.quantize import QuantConfig
    from schedules import gpu_rules

    base = int4_matmul_func(n, k, QuantConfig(128, True))
    funcs = {f"gemv{b}": base.with_attr({KERNEL_ATTR: "gemv", ROWS_ATTR: b}) for b in BUCKETS}
    funcs["gemm"] = base.with_attr(KERNEL_ATTR, "gemm")
    stock = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
             dl.gpu.Fallback()]
    stock_mod = tvm.IRModule({f"dlight_m{m}": _static_m(n, k, m).with_attr("global_symbol", f"dlight_m{m}")
                              for m in ms})
    ours = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    from schedules.gemv import GEMV, Config, config_for

    variants = {}
    for vname, over in VARIANTS.items():
        rule = GEMV(dataclasses.replace(config_for(target), **over))
        for b in BUCKETS:
            if b in VARIANT_MS:
                name = f"gemv{b}_{vname}"
                variants[name] = rule.apply(funcs[f"gemv{b}"], target, False).mod["main"].with_attr(
                    {"global_symbol": name, "tirx.is_scheduled": True})
    ours.update(tvm.IRModule(variants))
    with target:
        ours = dl.ApplyDefaultSchedule(*gpu_rules(target))(ours)
        stock_mod = dl.ApplyDefaultSchedule(*stock)(stock_mod)
    mod = tvm.IRModule({**dict(ours.functions_items()), **dict(stock_mod.functions_items())})
    rt = tvm.compile(mod, target=target)
    return {name.name_hint: rt[name.name_hint] for name in mod.get_global_vars()}


def _static_m(n, k, m):
    """The same PrimFunc with m a constant (stock dlight then picks its GEMV for m=1: its best case)."""
    import compiler.int4_kernel as ik
    from compiler.quantize import QuantConfig

    real = ik.tirx

    class _StaticM:  # int4_matmul_func's only Var is m
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def Var(name, dtype):  # noqa: N802
            return real.IntImm(dtype, m)

    ik.tirx = _StaticM()
    try:
        return ik.int4_matmul_func(n, k, QuantConfig(128, True))
    finally:
        ik.tirx = real


def nibble_kernel_for(m):
    from compiler.dispatch import BUCKETS

    return next((f"gemv{b}" for b in BUCKETS if m <= b), "gemm")


def graph_time(fn_list, torch=None, reps=15):
    from compiler.timing import graph_time as _graph_time

    return _graph_time(fn_list, reps)


def rel_err(y, ref):
    y = y.float()
    if not bool(y.isfinite().all()):
        return float("nan")
    return float((y - ref).norm() / ref.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]

    import torch
    import tvm
    import torch.nn.functional as F

    from compiler.cuda import ensure_cuda_runtime, register_nvcc_callback
    from compiler.quantize import QuantConfig, dequantize, quantize
    from compiler.target import resolve, tvm_target

    ensure_cuda_runtime()
    register_nvcc_callback("sm_90")
    target = tvm_target(resolve("cuda", "sm_90"))
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows, meta = [], {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tvm": tvm.__version__,
        "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": platform.node(), "method": "median of 15 CUDA-graph replays of %d launches, "
        "weights rotated over > %d MiB" % (LAUNCHES, ROTATE_BYTES >> 20)}
    print(json.dumps(meta), flush=True)
    cfg = QuantConfig(128, True)
    for k, n in shapes:
        t0 = time.time()
        kernels = build_kernels(k, n, ms, target)
        rng = np.random.default_rng(k + n)
        w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02)
        parts = quantize(w, cfg)
        w_deq = torch.from_numpy(dequantize(parts, k, cfg)).to(dev)  # fp32 [N, K]
        sc = torch.from_numpy(parts["scales"]).to(dev)
        wbytes = parts["qweight"].nbytes + parts["scales"].nbytes
        copies = max(2, math.ceil(ROTATE_BYTES / wbytes))
        tdev = tvm.cuda(0)  # the packed weight as TVM tensors: torch's uint32 support is partial
        wargs = [(tvm.runtime.tensor(parts["qweight"], device=tdev), tvm.runtime.tensor(parts["scales"], device=tdev))
                for _ in range(copies)]
        w16 = w_deq.half()
        w16s = [w16.clone() for _ in range(max(2, math.ceil(ROTATE_BYTES / (w16.numel() * 2))))]
        # torch's int4 kernel: uint8 [N, K/2] (two nibbles per byte, even k in the high nibble)
        tiny = None
        try:
            from compiler.quantize import unpack_int4

            q = torch.from_numpy(unpack_int4(parts["qweight"], k).astype(np.int32)).to(dev)
            packed_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
            wp = torch._convert_weight_to_int4pack(packed_u8, 8)
            s_bf = sc.to(torch.bfloat16).t().contiguous()  # [K/G, N]
            sz = torch.stack([s_bf, torch.zeros_like(s_bf)], dim=2)  # w = (q - 8) * s + 0
            tiny = [(wp.clone(), sz.clone()) for _ in range(max(2, math.ceil(ROTATE_BYTES / (wp.numel() * wp.element_size()))))]
        except Exception as e:  # noqa: BLE001
            print(f"tinygemm unavailable: {e!r}"[:300], flush=True)
        print(f"K={k} N={n}: built + quantized in {time.time() - t0:.1f} s; {copies} weight copies", flush=True)
        to_tvm = tvm.runtime.from_dlpack
        for m in ms:
            row = {"K": k, "N": n, "M": m}
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            ref = x.float() @ w_deq.t()
            y = torch.full((m, n), float("nan"), device=dev, dtype=torch.float16)
            nib, dl_name = kernels[nibble_kernel_for(m)], f"dlight_m{m}"
            tx, ty = to_tvm(x), to_tvm(y)
            # -- numerics (fresh inputs, poisoned outputs) --
            nib(tx, wargs[0][0], wargs[0][1], ty)
            torch.cuda.synchronize()
            row["err_nibble"] = rel_err(y, ref)
            y.fill_(float("nan"))
            kernels[dl_name](tx, wargs[0][0], wargs[0][1], ty)
            torch.cuda.synchronize()
            row["err_dlight"] = rel_err(y, ref)
            row["err_cublas"] = rel_err(F.linear(x, w16), ref)
            xb = x.to(torch.bfloat16)
            if tiny is not None:
                try:
                    row["err_tinygemm"] = rel_err(torch._weight_int4pack_mm(xb, tiny[0][0], 128, tiny[0][1]), ref)
                except Exception as e:  # noqa: BLE001
                    print(f"tinygemm failed: {e!r}"[:300], flush=True)
                    tiny = None
            # -- timing --
            mbytes = wbytes + (m * k + m * n) * 2
            half = mbytes // 2 // 2  # fp16 elements: a copy reading + writing mbytes in total
            cps = max(2, math.ceil(ROTATE_BYTES / (2 * half)))
            srcs = [torch.randn(half, device=dev, dtype=torch.float16) for _ in range(cps)]
            dsts = [torch.empty_like(s) for s in srcs]
            sel = lambda lst: [lst[i % len(lst)] for i in range(LAUNCHES)]  # noqa: E731
            row["t_copy"] = graph_time([lambda s=s, d=d: d.copy_(s) for s, d in sel(list(zip(srcs, dsts)))], torch)
            row["t_nibble"] = graph_time([lambda a=a: nib(tx, a[0], a[1], ty) for a in sel(wargs)], torch)
            row["t_dlight"] = graph_time([lambda a=a: kernels[dl_name](tx, a[0], a[1], ty) for a in sel(wargs)], torch)
            row["t_cublas"] = graph_time([lambda w_=w_: F.linear(x, w_) for w_ in sel(w16s)], torch)
            if tiny is not None:
                row["t_tinygemm"] = graph_time(
                    [lambda t=t: torch._weight_int4pack_mm(xb, t[0], 128, t[1]) for t in sel(tiny)], torch)
            for vname in VARIANTS if m in VARIANT_MS else ():
                vk = kernels[f"{nibble_kernel_for(m)}_{vname}"]
                y.fill_(float("nan"))
                vk(tx, wargs[0][0], wargs[0][1], ty)
                torch.cuda.synchronize()
                row[f"err_{vname}"] = rel_err(y, ref)
                row[f"t_{vname}"] = graph_time([lambda a=a, vk=vk: vk(tx, a[0], a[1], ty) for a in sel(wargs)], torch)
            del srcs, dsts
            row["bytes"] = mbytes
            row["GBps_nibble"] = mbytes / row["t_nibble"] / 1e9
            row["TFLOPs_nibble"] = 2 * m * n * k / row["t_nibble"] / 1e12
            rows.append(row)
            print(_line(row), flush=True)
        write(Path(args.out), meta, rows)  # after every shape: a run cut short keeps what it measured
        del w16s, tiny, wargs, kernels
        torch.cuda.empty_cache()
    write(Path(args.out), meta, rows)
    print((Path(args.out) / "bench_linear.md").read_text())


def write(out, meta, rows):
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_linear.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = [f"# int4 linear on {meta['device']} ({meta['date']})", "",
          f"torch {meta['torch']}, CUDA {meta['cuda']}, TVM {meta['tvm']}; {meta['method']}.", "",
          "us per call; x copy = time / same-bytes copy time; cuBLAS/nibble = speedup over cuBLAS fp16", "",
          "| K->N | M | copy us | nibble us | nibble x copy | GB/s | TFLOP/s | cuBLAS us | cuBLAS/nibble | "
          "tinygemm us | dlight us | err nibble |", "|" + "---|" * 12]
    md += [_md(r) for r in rows]
    (out / "bench_linear.md").write_text("\n".join(md) + "\n")


def _fmt(v, f="{:.1f}"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f.format(v)


def _line(r):
    us = lambda key: _fmt(r.get(key) and r[key] * 1e6)  # noqa: E731
    return (f"K={r['K']:5d} N={r['N']:5d} M={r['M']:4d} copy {us('t_copy')} nibble {us('t_nibble')} "
            f"dlight {us('t_dlight')} cublas {us('t_cublas')} tinygemm {us('t_tinygemm')} | err nibble "
            f"{r['err_nibble']:.1e} dlight {r['err_dlight']:.1e} cublas {r['err_cublas']:.1e} tiny "
            f"{_fmt(r.get('err_tinygemm'), '{:.1e}')}"
            + "".join(f" | {v} {us('t_' + v)} ({r['err_' + v]:.0e})" for v in VARIANTS if "t_" + v in r))


def _md(r):
    us = lambda key: _fmt(r.get(key) and r[key] * 1e6)  # noqa: E731
    return (f"| {r['K']}->{r['N']} | {r['M']} | {us('t_copy')} | {us('t_nibble')} | "
            f"{r['t_nibble'] / r['t_copy']:.2f} | {r['GBps_nibble']:.0f} | {r['TFLOPs_nibble']:.1f} | "
            f"{us('t_cublas')} | {r['t_cublas'] / r['t_nibble']:.2f} | {us('t_tinygemm')} | {us('t_dlight')} | "
            f"{r['err_nibble']:.1e} |")


if __name__ == "__main__":
    main()
