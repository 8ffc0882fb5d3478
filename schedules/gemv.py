"""Decode-time (small token count) schedule for the fused int4 matmul: a batched GEMV.

Recognizes the PrimFunc of compiler/int4_kernel.py by its "nibble.int4" attr, but only a copy that the
dispatch pass (compiler/dispatch.py) tagged `"nibble.kernel" = "gemv"` with the token bucket it serves
(`"nibble.rows" = B`: that copy runs only for m <= B). Everything else returns None and falls through
to dlight (the big-m copy is scheduled by dlight's Matmul).

Why a hand-laid-out TIR kernel and not a chain of schedule primitives: at decode the kernel must run at
the memory roofline, and on an H200 that leaves ~4 issue slots per weight (33 T lane-ops/s over ~8.7 T
int4 weights/s). The PrimFunc's own dequantize (shift, and, int->fp16 convert, sub, mul, fp16->fp32)
costs ~7, with the convert on a quarter-rate pipe, which is why dlight's GEMV stops at ~half the
roofline. Primitives can move that arithmetic around but not change it, so the rule emits an
equivalent kernel with a cheaper decode (same inputs, same fp32 accumulation):

  * 128-bit loads: each lane reads one uint4 = 4 words = 32 weights of a row per chunk; a warp reads
    32 consecutive chunks (512 B contiguous); U chunks x TS rows per lane are issued before any math.
  * decode with a float "magic number": for nibble j of word w, with p = 4 * (j % 4) and
    w' = (w & 0xFFFF) | 0x4B000000 for j < 4, (w >> 16) | 0x4B000000 else (once per word),
        as_float(w' & (0x4B000000 | 0xF << p)) - (2^23 + z * 2^p)  ==  (q - z) * 2^p   exactly:
    one LOP3 + one FADD per weight, no int->float convert. The 2^p is undone by keeping one partial
    sum per nibble position p and scaling it by 2^-p once per chunk (exact: powers of two). Then one
    FFMA per weight per token.
  * the group scale is applied once per 32-weight chunk: sum_k x*(q-z) in fp32, times s. Real-number
    equal to the PrimFunc (which rounds each (q-z)*s to fp16 first); it is closer to the fp32
    reference (compiler.quantize.dequantize), not further.
  * reduction split: every row's K is spread over the 32 lanes of a warp (warp-shuffle reduce, no
    shared memory, no atomics); a lane owns TS rows, so N=4096 still gives ~8 warps per SM with all
    TS*U 16-byte loads of a lane in flight at once (K=4096: the whole row slice in one go). Tokens:
    blockIdx.y over tiles of B rows of x (the dispatch makes that one tile).
Knobs are in Config (per-arch defaults, per bucket) so a tuner can search them. Measured on an H200
(benchmarks/results/h200_notes.md): TS=4 beats TS=2/8 at m=4 by 1.3-2x and ties at m=1; the kernel is
good for m <= 4 only: past that, each lane re-reading B rows of x from L1 for every TS rows of W and
B fp32 FMAs per weight make it slower than the GEMM copy. The tensor-core decode kernel
(schedules/gemv_mma.py) is that fix; the dispatch routes to it wherever it takes the shape, and to
this kernel only where it does not (groups not a multiple of 128, K % 128, GPUs before sm_80).
"""
from __future__ import annotations

import dataclasses
import math
from string import Template

from .template import ATTR, ROWS_ATTR, TemplateRule, signature


@dataclasses.dataclass(frozen=True)
class Config:
    """One GEMV variant. Defaults per arch in DEFAULTS; `rows_per_thread`/`chunks` are per bucket."""

    warps: int = 4  # warps per thread block (threadIdx.y); each warp owns ts rows of W
    rows_per_thread: int = 4  # TS for token buckets B < 8: each x value is converted once for TS rows
    rows_per_thread_large: int = 1  # TS for B >= 8 (registers: ~5*TS*B accumulators + 8*B x values)
    chunks: int = 4  # U: 16-byte chunks of each row a lane loads per iteration (loads in flight)

    def ts(self, b: int) -> int:
        return self.rows_per_thread if b < 8 else self.rows_per_thread_large


DEFAULTS = {"sm_90": Config(), "sm_80": Config(), "default": Config()}
# What `nibble tune` searches (compiler/tuning.py); the rule shrinks warps where N does not divide.
SPACE = {"warps": (2, 4, 8), "rows_per_thread": (1, 2, 4, 8),  # (rows_per_thread_large: no bucket >= 8)
         "chunks": (1, 2, 4, 8)}
VERSION = 1  # bump when the kernel changes meaning: tuning records of other versions are ignored


def config_for(target) -> Config:
    arch = str(target.attrs.get("arch", "")) if target is not None else ""
    return DEFAULTS.get(arch, DEFAULTS["default"])


# The kernel, as TVMScript. $-fields are filled per shape and config; `T` is tvm.script.tirx.
_KERNEL = Template('''
$SIGNATURE
    for by in T.thread_binding((m + T.int64($B - 1)) // T.int64($B), thread="blockIdx.y"):
        for bx in T.thread_binding($NBLK, thread="blockIdx.x"):
            for ty in T.thread_binding($WARPS, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    acc = T.alloc_buffer(($TS, $B), "float32", scope="local")
                    part = T.alloc_buffer(($TS, 4, $B), "float32", scope="local")
                    wv = T.alloc_buffer(($TS, $U, 4), "uint32", scope="local")
                    wm = T.alloc_buffer((2,), "uint32", scope="local")
                    xv = T.alloc_buffer(($B, 8), "$XD", scope="local")
                    xp = T.alloc_buffer(($B, 8), "float32", scope="local")
                    sc = T.alloc_buffer(($TS,), "float32", scope="local")
                    zc = T.alloc_buffer(($TS, 4), "float32", scope="local")
                    for t, i in T.grid($TS, $B):
                        acc[t, i] = T.float32(0)
                    for it in T.serial($ITERS):
                        # all of this lane's weight loads first: TS*U independent 16-byte loads
                        for t, u in T.grid($TS, $U):
                            if (it * $U + u) * 32 + tx < $C:
                                for v in T.vectorized(4):
                                    wv[t, u, v] = qweight[bx * $RB + ty * $TS + t,
                                                          ((it * $U + u) * 32 + tx) * 4 + v]
                        for u in T.unroll($U):
                            c = T.meta_var((it * $U + u) * 32 + tx)  # this lane's chunk of 32 k
                            if c < $C:
                                for t in T.unroll($TS):
                                    sc[t] = T.Cast("float32", scales[bx * $RB + ty * $TS + t, c * 32 // $G])
                                    for p in T.unroll(4):
                                        zc[t, p] = $ZERO
                                    for p, i in T.grid(4, $B):
                                        part[t, p, i] = T.float32(0)
                                for w in T.unroll(4):
                                    for i in T.unroll($B):
                                        for v in T.vectorized(8):
                                            xv[i, v] = x[T.min(by * $B + i, m - T.int64(1)), c * 32 + w * 8 + v]
                                        for j in T.unroll(8):
                                            xp[i, j] = T.Cast("float32", xv[i, j])
                                    for t in T.unroll($TS):
                                        # the low / high 4 nibbles of the word under the float exponent
                                        wm[0] = (wv[t, u, w] & T.uint32(0xFFFF)) | T.uint32(0x4B000000)
                                        wm[1] = T.shift_right(wv[t, u, w], T.uint32(16)) | T.uint32(0x4B000000)
                                        for j in T.unroll(8):
                                            # (q - z) * 2^(4*(j%4)), exact: see the module docstring
                                            wf = T.meta_var(T.reinterpret("float32", wm[j // 4] & (
                                                T.shift_left(T.uint32(15), T.Cast("uint32", 4 * (j % 4))) | T.uint32(0x4B000000)))
                                                - zc[t, j % 4])
                                            for i in T.unroll($B):
                                                part[t, j % 4, i] = part[t, j % 4, i] + xp[i, j] * wf
                                for t, i in T.grid($TS, $B):
                                    # undo the 2^(4p) of each nibble position, then the group scale
                                    acc[t, i] = acc[t, i] + (part[t, 0, i] + part[t, 1, i] * T.float32(1.0 / 16)
                                                             + part[t, 2, i] * T.float32(1.0 / 256)
                                                             + part[t, 3, i] * T.float32(1.0 / 4096)) * sc[t]
                    # the 32 lanes of a warp hold partial sums of the same rows: butterfly them down
                    for t, i in T.grid($TS, $B):
                        for s in T.unroll(5):
                            acc[t, i] = acc[t, i] + T.tvm_warp_shuffle_down(
                                T.uint32(0xFFFFFFFF), acc[t, i], 16 >> s, 32, 32)
                    if tx == 0:
                        for t, i in T.grid($TS, $B):
                            if by * $B + i < m:
                                y[by * $B + i, bx * $RB + ty * $TS + t] = $OUT
''')


def gemv_func(attrs: dict, rows: int, cfg: Config):
    """The GEMV PrimFunc for one int4 kernel spec (the "nibble.int4" attr) and token bucket, or None."""
    from tvm.script import tirx as T  # noqa: F401  (the template's T)
    import tvm

    n, k, g = int(attrs["n"]), int(attrs["k"]), int(attrs["group_size"])
    sym, bias, xd = bool(attrs["symmetric"]), bool(attrs["has_bias"]), str(attrs["x_dtype"])
    ts, warps = cfg.ts(rows), cfg.warps
    # shapes this kernel handles: whole 32-weight chunks inside one group, whole thread blocks
    while warps > 1 and n % (warps * ts):
        warps //= 2
    if k % 32 or g % 32 or k % g or n % (warps * ts) or xd not in ("float16", "float32"):
        return None
    chunks_per_row = k // 32
    u = max(1, min(cfg.chunks, math.ceil(chunks_per_row / 32)))
    # zc[t, p] = 2^23 + z * 2^(4p): what the magic-number decode subtracts (see the docstring)
    z = ("T.float32(8.0)" if sym else
         f'T.Cast("float32", zeros[bx * {warps * ts} + ty * {ts} + t, c * 32 // {g}])')
    zero = f'T.float32(8388608.0) + {z} * T.Cast("float32", T.shift_left(1, 4 * p))'
    out = "acc[t, i]"
    if bias:
        out = f'acc[t, i] + T.Cast("float32", bias[bx * {warps * ts} + ty * {ts} + t])'
    out = f'T.Cast("{xd}", T.Cast("float16", {out}))'
    src = _KERNEL.substitute(
        SIGNATURE=signature("gemv", attrs), G=g, C=chunks_per_row, B=rows, XD=xd, ZERO=zero,
        OUT=out, TS=ts, U=u, WARPS=warps, RB=warps * ts, NBLK=n // (warps * ts),
        ITERS=math.ceil(chunks_per_row / (32 * u)))
    func = tvm.script.from_source(src)
    return func


class GEMV(TemplateRule):
    """dlight-style rule: the "gemv"-tagged copies of our int4 kernel -> the batched GEMV above."""

    kind = "gemv"

    def __init__(self, config: Config | None = None):
        self.config = config

    def build(self, func, attrs, target):
        from compiler.tuning import config_from

        cfg = config_from(func, Config, self.config or config_for(target))  # a tuned record wins
        return gemv_func(attrs[ATTR], int(attrs[ROWS_ATTR]), cfg)


def rule():
    return GEMV()


def default_config(target, func=None) -> Config:
    """The untuned config for a target (what tuning measures first and must beat); any copy."""
    return config_for(target)
