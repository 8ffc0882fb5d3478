"""Residual add + RMSNorm in one CUDA kernel with two outputs: the sum (the next residual) and the norm.

A pre-norm transformer layer does, twice per layer,

    r = a + b                      (the residual stream plus the attention's / the MLP's output)
    y = epilogue(rms_norm(r))      (epilogue: the exporter's casts and weight multiplies)

and r is read again by the next residual add, so TVM's FuseOps (which fuses a producer into its
consumer only when the consumer post-dominates it) runs the add and the norm as two kernels, with r
written and re-read in between. compiler/fuse_add_rmsnorm.py routes the pair here; the casts and
reshapes in front of a and b are folded in too (the int4 GEMV writes fp16, the stream is fp32).

One thread block per row (token), THREADS threads, each owning the elements k = e * THREADS + t, so
every load and store of a warp is one contiguous run: r is computed in registers and stored, its
squares summed in fp32 (warp shuffles, then one shared slot per warp), and the normalized row written
from the same registers. Numerics are the exported graph's: r in the add's dtype, the mean of squares
and rsqrt in fp32 (as TVM's rms_norm), then the epilogue's casts and multiplies in their own dtypes.
"""
from __future__ import annotations

from string import Template

from .template import GRID_WAIT

ADD_RMSNORM = "add_rmsnorm"  # the "nibble.kernel" tag of these kernels
MIN_PER_THREAD = 8  # elements per thread at least (a decode step has one row: one block does it all)
MAX_PER_THREAD = 64  # elements a thread keeps in registers between the sum and the normalization

_KERNEL = Template('''
@T.prim_func
def add_rmsnorm($PARAMS):
    T.func_attr({"tirx.noalias": True})
    rows = T.int64()
$BUFFERS
    r = T.match_buffer(r_h, (rows, T.int64($K)), "$RD")
    y = T.match_buffer(y_h, (rows, T.int64($K)), "$YD")
    for row in T.thread_binding(rows, thread="blockIdx.x"):
        for t in T.thread_binding($THREADS, thread="threadIdx.x"):
            v = T.alloc_buffer(($E,), "float32", scope="local")
            acc = T.alloc_buffer((1,), "float32", scope="local")
            part = T.alloc_buffer(($WARPS,), "float32", scope="shared")
            acc[0] = T.float32(0)
            $WAIT
            # every load first (in registers, rounded to r's dtype), then the stores of r and the squares:
            # reading r back from memory, or storing between the loads, kept them from going out together
            for e in T.unroll($E):
                v[e] = T.Cast("float32", T.Cast("$RD", $SUM))
            for e in T.unroll($E):
                r[row, e * $THREADS + t] = T.Cast("$RD", v[e])
                acc[0] = acc[0] + v[e] * v[e]
            for f in T.unroll(5):
                acc[0] = acc[0] + T.tvm_warp_shuffle(T.uint32(0xFFFFFFFF), acc[0], T.bitwise_xor(t % 32, 16 >> f),
                                                     32, 32)
            if t % 32 == 0:
                part[t // 32] = acc[0]
            acc[0] = T.float32(0)
            for i in T.unroll($WARPS):
                acc[0] = acc[0] + part[i]
            acc[0] = T.rsqrt(acc[0] * T.float32($INV_K) + T.float32($EPS))
            for e in T.unroll($E):
                y[row, e * $THREADS + t] = $Y''')


def threads_for(k: int) -> int | None:
    """Threads per row for a row of k elements: the most (up to 1024) that leave each MIN_PER_THREAD
    or more, else the fewest (from 32) that leave each at most MAX_PER_THREAD; None if no warp
    multiple divides k."""
    sizes = [t for t in (1024, 512, 256, 128, 64, 32) if k % t == 0]
    return next((t for t in sizes if k // t >= MIN_PER_THREAD),
                next((t for t in sizes[::-1] if k // t <= MAX_PER_THREAD), None))


def add_rmsnorm_func(k: int, eps: float, inputs: list, add_dtype: str, gamma: str | None, epilogue: list,
                     out_dtype: str):
    """The kernel PrimFunc, or None for a row length it does not take.

    inputs: the add's two operands as (dtype read, [dtypes cast to, in order]), e.g. ("float16",
    ["float32"]) for astype(x, f32); add_dtype: r's dtype; gamma: the rms_norm weight's dtype (a [k]
    input) or None; epilogue: after the norm, in order, ("cast", dtype) or ("mul", dtype) (times a [k]
    weight input of that dtype); out_dtype: y's dtype. Params: (a, b, [gamma], [weights...], r, y)."""
    import tvm
    from tvm.script import tirx as T  # noqa: F401  (the template's T)

    threads = threads_for(k)
    if threads is None:
        return None
    params, buffers, terms = [], [], []
    for name, (dtype, casts) in zip(("a", "b"), inputs):
        params.append(f"{name}_h: T.handle")
        buffers.append(f'    {name} = T.match_buffer({name}_h, (rows, T.int64({k})), "{dtype}")')
        term = f"{name}[row, e * {threads} + t]"
        for c in casts:
            term = f'T.Cast("{c}", {term})'
        terms.append(term)
    idx = f"e * {threads} + t"
    # the norm: r * rsqrt(mean(r^2) + eps) (* gamma), in fp32, then in r's dtype (TVM's rms_norm keeps it)
    y = f'T.Cast("{add_dtype}", v[e] * acc[0])'
    if gamma is not None:
        params.append("g_h: T.handle")
        buffers.append(f'    g = T.match_buffer(g_h, (T.int64({k}),), "{gamma}")')
        y = f'T.Cast("{add_dtype}", v[e] * acc[0] * T.Cast("float32", g[{idx}]))'
    for i, (op, dtype) in enumerate(epilogue):
        if op == "cast":
            y = f'T.Cast("{dtype}", {y})'
        else:
            params.append(f"w{i}_h: T.handle")
            buffers.append(f'    w{i} = T.match_buffer(w{i}_h, (T.int64({k}),), "{dtype}")')
            y = f"w{i}[{idx}] * {y}"
    params += ["r_h: T.handle", "y_h: T.handle"]
    src = _KERNEL.substitute(
        PARAMS=", ".join(params), BUFFERS="\n".join(buffers), K=k, RD=add_dtype, YD=out_dtype,
        THREADS=threads, E=k // threads, WARPS=threads // 32, INV_K=repr(1.0 / k), EPS=repr(float(eps)),
        SUM=f"{terms[0]} + {terms[1]}", Y=y, WAIT=GRID_WAIT)
    return tvm.script.from_source(src)
