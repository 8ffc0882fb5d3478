"""The fused int4 weight-only matmul as one TensorIR PrimFunc (what the schedules in schedules/ take).

    Y[m, n] = cast_out( sum_k  fp16(X[m, k]) * W[n, k]   (+ bias[n]) )      accumulated in fp32
    W[n, k] = (nibble(qweight[n, k // 8], k % 8) - zero[n, k // G]) * scales[n, k // G]

It is built with TE and has three blocks, the shape dlight's and our rules expect:
  "dequantize"  W[N, K] fp16 from the packed weight (a schedule inlines it: dequantize in registers)
  "matmul"      the fp32-accumulating reduction over K
  "epilogue"    + bias, round to fp16 (the A16 in W4A16), cast to the model's dtype
and, swiglu (a merged gate/up projection whose only reader is SwiGLU; compiler/fuse_swiglu.py), a fourth:
  "swiglu"      Y[m, f] = silu(Y[m, f]) * Y[m, N/2 + f] in the fp16 ops of the exported graph, f < N/2
The token dim M is one symbolic int64 var, so one PrimFunc serves every batch/sequence length; the
Relax pass flattens leading dims into M. The func carries attrs (N, K, group size, ...) under
"nibble.int4" so schedules, the tuner and `inspect` can find it without pattern matching.
"""
from __future__ import annotations

import math

import tvm
from tvm import te, tirx

from .quantize import QuantConfig

ATTR = "nibble.int4"  # PrimFunc attribute marking our kernels; its value is the dict from spec()


def kernel_name(n: int, k: int, cfg: QuantConfig, x_dtype: str, has_bias: bool, swiglu: bool = False) -> str:
    g = "pc" if cfg.group_size == -1 else f"g{cfg.group_size}"
    return (f"int4_matmul_n{n}_k{k}_{g}{'' if cfg.symmetric else '_asym'}"
            f"_{x_dtype}{'_bias' if has_bias else ''}{'_swiglu' if swiglu else ''}")


def silu_times(g, u):
    """silu(g) * u as the exported graph computes it in fp16, (g * (1 / (1 + exp(0 - g)))) * u (ONNX's
    Sigmoid and Mul, legalized by TVM), so that a kernel computing it gives the graph's bits."""
    one, zero = tirx.const(1, g.dtype), tirx.const(0, g.dtype)
    return g * (one / (one + tirx.exp(zero - g))) * u


def int4_matmul_func(n: int, k: int, cfg: QuantConfig, x_dtype: str = "float16",
                     has_bias: bool = False, swiglu: bool = False, m: int | None = None) -> tvm.tirx.PrimFunc:
    """The PrimFunc (x[m, K] x_dtype, qweight, scales[, zeros][, bias]) -> y[m, N] x_dtype, or with
    swiglu -> y[m, N / 2] = silu(first half of the N outputs) * second half. The token count m is a
    symbolic Var, or the given constant (a static workload: stock dlight's m = 1 case, meta-schedule)."""
    g = cfg.group(k)
    i64 = lambda v: tirx.IntImm("int64", v)  # one index dtype everywhere: dlight's reindex needs it
    m = tirx.Var("m", "int64") if m is None else i64(m)
    n_, k_ = i64(n), i64(k)
    x = te.placeholder((m, k_), x_dtype, name="x")
    qweight = te.placeholder((n_, i64(math.ceil(k / 8))), "uint32", name="qweight")
    scales = te.placeholder((n_, i64(math.ceil(k / g))), "float16", name="scales")
    zeros = None if cfg.symmetric else te.placeholder(scales.shape, "float16", name="zeros")
    bias = te.placeholder((n_,), x_dtype, name="bias") if has_bias else None

    def dequant(i, j):
        word = qweight[i, j // i64(8)]
        nib = (word >> (tirx.Cast("uint32", j % i64(8)) * tirx.const(4, "uint32"))) & tirx.const(15, "uint32")
        zero = tirx.const(8, "float16") if zeros is None else zeros[i, j // i64(g)]
        return (nib.astype("float16") - zero) * scales[i, j // i64(g)]

    w = te.compute((n_, k_), dequant, name="dequantize")
    r = te.reduce_axis((i64(0), k_), name="k")
    acc = te.compute(
        (m, n_),
        lambda i, j: te.sum(x[i, r].astype("float16").astype("float32") * w[j, r].astype("float32"),
                            axis=r),
        name="matmul",
    )

    def epilogue(i, j):
        v = acc[i, j] + bias[j].astype("float32") if bias is not None else acc[i, j]
        return v.astype("float16").astype(x_dtype)

    y = te.compute((m, n_), epilogue, name="epilogue")
    if swiglu:
        f = i64(n // 2)
        y = te.compute((m, f), lambda i, j: silu_times(y[i, j], y[i, j + f]), name="swiglu")
    args = [x, qweight, scales] + ([zeros] if zeros is not None else []) + ([bias] if bias is not None else []) + [y]
    func = te.create_prim_func(args)
    spec = {"n": n, "k": k, "group_size": g, "symmetric": cfg.symmetric, "has_bias": has_bias, "x_dtype": x_dtype}
    if swiglu:
        spec["swiglu"] = True  # absent otherwise: read it with schedules.template.is_swiglu
    return func.with_attr({"global_symbol": kernel_name(n, k, cfg, x_dtype, has_bias, swiglu), ATTR: spec})
