"""Decode-time (1..16 tokens) schedule for the fused int4 matmul on tensor cores: W is the mma's A.

Recognizes the copies of the "nibble.int4" PrimFunc that compiler/dispatch.py tagged
`"nibble.kernel" = "mma"` with a token bucket `"nibble.rows" = B <= 16`; anything else, or a shape the
kernel does not take (see `takes`), returns None.

Why: the CUDA-core GEMV (schedules/gemv.py) is issue-bound at one token (~4 instructions per weight
against the ~3.9 the SMs can issue at HBM speed) and grows B fp32 FMAs per weight with B tokens. Here
one `mma.sync.m16n8k16` (fp16 in, fp32 accumulate) multiplies a 16-row x 16-k tile of W by 8 tokens,
so the per-weight work is the decode alone and does not grow with tokens up to 8 (16: two mmas per
W fragment): per 256 weights a lane issues 128 LOP3, 64 HSUB2, 64 HFMA2, 64 PRMT (x), 32 shifts and
32 mma, ~1.9 instructions per weight (the generated PTX at K = 4096) against ~4 for the CUDA-core GEMV.

No offline weight re-layout (Marlin's way): the layout is compiler/quantize.py's [N, K/8] words. The
mma only needs *some* common order of k for W and x, so each lane keeps its own words' nibble order
and reads x in that order:
  * lane (r = lane / 4, t = lane % 4) of a warp loads, for a 128-k chunk c, one uint4 = 4 words of row
    r and one of row r + 8 of its 16-row tile: k = 128 c + 32 t + 8 u + j for word u, nibble j (a quad
    reads 64 contiguous bytes of a row).
  * decode (magic number, as in gemm.py): (w & 0x000F000F) | 0x64006400 is the fp16 pair
    (1024 + q_j, 1024 + q_j+4) for j = 0; the 0x00F000F0 mask gives 1024 + 16 q for j = 1; w >> 8 gives
    j = 2, 3. One HSUB2 (- (1024 + z)) or HFMA2 (* 1/16 - (64 + z)) makes the exact integers q - z.
    So a word gives the 4 fp16 pairs (j, j+4), j = 0..3.
  * mma A fragment (m16n8k16, row-major): a lane holds row r in regs 0 and 2, row r + 8 in regs 1 and
    3, at logical k 2t, 2t+1 (regs 0, 1) and 2t+8, 2t+9 (regs 2, 3). Word u's pairs (0,4), (1,5) fill one mma, (2,6), (3,7) the next: logical
    k 2t+e of that mma is physical k 128 c + 32 t + 8 u + {0,4 | 1,5 | 2,6 | 3,7}[e].
  * mma B fragment (x, col-major): lane (r, t) holds token r at logical k 2t, 2t+1 and 2t+8, 2t+9: the
    same t, so the same physical k, in the lane's own 16 B of x per word: x pairs (x_j, x_j+4) are one
    byte-permute each.
  * the group scale is applied in fp32 once per chunk (a chunk lies in one group: G % 128 == 0): each
    chunk's mmas accumulate into a zeroed fragment, which is then scaled into the running sum. So the
    weights are never rounded to fp16: equal in exact arithmetic to the PrimFunc (which rounds each
    (q - z) * s to fp16), and closer to the fp32 reference.
The first pipeline stage's weight loads go out before the kernel waits for the previous kernel
(template.GRID_WAIT): in a CUDA graph with programmatic edges they overlap that kernel's run.
SwiGLU copies (spec "swiglu", compiler/fuse_swiglu.py: y = silu(first N/2 outputs) * the other N/2) read
rows r of a tile from the gate half of W and rows r + 8 from the up half (_row), so a block's sums hold
both rows of each of its outputs; the store rounds both to fp16 as the plain copy would and applies the
graph's fp16 SwiGLU: the unfused kernels' bits, one kernel fewer per Llama layer.
Warps of a block split the chunks of one 16-row tile (x fragments are reused over ROW_TILES tiles per
warp) and sum their fragments through shared memory at the end; blockIdx.y walks 8 * TT token tiles.
Knobs in Config (per-arch defaults by N and token tiles in ArchConfig), searched by `nibble tune` (SPACE).
"""
from __future__ import annotations

import dataclasses
import math
from string import Template

from .template import ATTR, GRID_WAIT, ROWS_ATTR, TemplateRule, indent, is_swiglu, signature

CHUNK = 128  # k per lane-quad per chunk: 4 lanes x 4 words x 8 nibbles
VERSION = 1  # bump when the kernel changes meaning: tuning records of other versions are ignored


@dataclasses.dataclass(frozen=True)
class Config:
    warps: int = 8  # warps per thread block; they split the 128-k chunks of the block's rows
    row_tiles: int = 1  # 16-row W tiles per warp (each x fragment feeds row_tiles mmas: less x traffic)
    chunks: int = 2  # U: chunks per pipeline step: a lane has 2 * row_tiles * U 16-byte loads in flight
    # while it computes the previous U chunks
    # PTX qualifiers of the weight loads ("": TVM's plain vector load). The weights are read once: through
    # the non-coherent path, not kept in L1 (x and the scales live there), and each 64-byte request
    # asks L2 for the whole 256-byte segment, which the block's other warps read next. H200, M = 1..8
    # (h200_gemv_loads.md): 2-8% faster than plain loads on the four Llama shapes.
    loads: str = "nc.L1::no_allocate.L2::256B"


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Per-arch defaults: by the number of 16-row tiles of W (N / 16), the Config for copies with one
    8-token tile (m <= 8) and with two (m <= 16): ((max tiles, one-tile Config, two-tile Config), ...)."""

    by_tiles: tuple


# H200 (bench_linear.py --candidates, MMA_VARIANTS; h200_bench_linear_mma_candidates.md), us at 1 / 16 tokens:
#  * N = 4096 (256 tiles): 16 warps 5.3 vs 5.9 (8 warps) at m = 1; at m = 16 8 warps 8.6 vs 10.1 (16):
#    two token tiles take ~100 registers, so 16-warp blocks fit one per SM.
#  * N = 12288 (768 tiles): 4 warps 11.2 vs 11.5 (8) at m = 1, 20.2 vs 21.2 at m = 16.
#  * N = 22016 (1376 tiles): 8 warps 17.4 vs 19.5 (4; probably its 1.5 waves of resident blocks).
#    At m = 16, 8 warps with two row tiles: 32.8 us (h200_gemv_loads.md run 4) and 32.6-32.7 (three runs
#    of the twelfth session, h200_m16_22016.md). 4 warps of 4 chunks per step ran 29.6 on the ninth
#    session's machine but 41.6-42.0 in all three runs of the twelfth's (the same CUDA source), so the
#    steadier config is the default; 4 warps of 2 chunks 38.1 / 39.2.
_H200 = ArchConfig(by_tiles=((512, Config(warps=16), Config(warps=8)),
                             (1024, Config(warps=4), Config(warps=4)),
                             (1 << 30, Config(warps=8), Config(warps=8, row_tiles=2))))
DEFAULTS = {"sm_90": _H200, "default": _H200}  # other GPUs: not measured, the H200's choice
SPACE = {"warps": (4, 8, 16), "row_tiles": (1, 2), "chunks": (1, 2, 4)}


def config_for(target) -> ArchConfig:
    arch = str(target.attrs.get("arch", "")) if target is not None else ""
    return DEFAULTS.get(arch, DEFAULTS["default"])


def default_for(arch: ArchConfig, n: int, rows: int) -> Config:
    """The untuned Config of the copy serving m <= rows of an N-feature linear."""
    tiles = n // 16
    _, one, two = next(e for e in arch.by_tiles if tiles <= e[0])
    return one if rows <= 8 else two


def takes(attrs: dict, arch: str | None) -> bool:
    """Whether this kernel can serve the int4 spec on arch ("sm_90"): fp16 activations, whole 128-k
    chunks inside whole groups, whole 16-row tiles, an arch with mma.sync m16n8k16 (sm_80+)."""
    n, k, g = int(attrs["n"]), int(attrs["k"]), int(attrs["group_size"])
    return (str(attrs["x_dtype"]) == "float16" and k % CHUNK == 0 and g % CHUNK == 0 and n % 16 == 0
            and arch is not None and arch.startswith("sm_") and int(arch[3:]) >= 80)


_HELPERS = r"""
__forceinline__ __device__ unsigned nb_mma_u(half2 h) { return *reinterpret_cast<unsigned*>(&h); }
__forceinline__ __device__ half2 nb_mma_h(unsigned u) { return *reinterpret_cast<half2*>(&u); }
// word w (nibble j = k offset j) -> the exact fp16 pairs (q_j - z, q_j+4 - z), j = 0..3, in a[j]
// zl = (1024 + z) x2, zh = -(64 + z) x2
__forceinline__ __device__ void nb_mma_dq(unsigned w, half2 zl, half2 zh, unsigned* a) {
  const half2 g = __float2half2_rn(0.0625f);
  const unsigned w2 = w >> 8;
  a[0] = nb_mma_u(__hsub2(nb_mma_h((w & 0x000F000Fu) | 0x64006400u), zl));
  a[1] = nb_mma_u(__hfma2(nb_mma_h((w & 0x00F000F0u) | 0x64006400u), g, zh));
  a[2] = nb_mma_u(__hsub2(nb_mma_h((w2 & 0x000F000Fu) | 0x64006400u), zl));
  a[3] = nb_mma_u(__hfma2(nb_mma_h((w2 & 0x00F000F0u) | 0x64006400u), g, zh));
}
__forceinline__ __device__ void nb_mma_16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                             unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// One 128-k chunk of one 16-row tile (see the module docstring). acc: this lane's fp32 C fragments,
// 4 per token tile; w0 / w8: its 4 words of rows r / r + 8; x0 (x1): token r's (r + 8's) x at this
// lane's first k; s, z: the rows' group scales and zero points.
__forceinline__ __device__ void nb_mma_chunk(float* acc, const unsigned* w0, const unsigned* w8,
                                             const half* x0, const half* x1, int tiles,
                                             half s0, half s8, half z0, half z8) {
  const half2 zl0 = __half2half2(__hadd(z0, __float2half(1024.f)));
  const half2 zl8 = __half2half2(__hadd(z8, __float2half(1024.f)));
  const half2 zh0 = __half2half2(__hneg(__hadd(z0, __float2half(64.f))));
  const half2 zh8 = __half2half2(__hneg(__hadd(z8, __float2half(64.f))));
  float t[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    unsigned a[4], b[4];
    nb_mma_dq(w0[u], zl0, zh0, a);
    nb_mma_dq(w8[u], zl8, zh8, b);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      if (j < tiles) {
        const uint4 xv = *reinterpret_cast<const uint4*>((j ? x1 : x0) + 8 * u);
        // (x_0, x_4), (x_1, x_5) | (x_2, x_6), (x_3, x_7): the k order of the W pairs
        nb_mma_16816(t + 4 * j, a[0], b[0], a[1], b[1],
                     __byte_perm(xv.x, xv.z, 0x5410), __byte_perm(xv.x, xv.z, 0x7632));
        nb_mma_16816(t + 4 * j, a[2], b[2], a[3], b[3],
                     __byte_perm(xv.y, xv.w, 0x5410), __byte_perm(xv.y, xv.w, 0x7632));
      }
    }
  }
  const float f0 = __half2float(s0), f8 = __half2float(s8);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    if (j < tiles) {
      acc[4 * j + 0] += t[4 * j + 0] * f0;
      acc[4 * j + 1] += t[4 * j + 1] * f0;
      acc[4 * j + 2] += t[4 * j + 2] * f8;
      acc[4 * j + 3] += t[4 * j + 3] * f8;
    }
  }
}
"""

# Stage `it` of the software pipeline over a warp's groups of U chunks: the loads of group it (into
# register buffer it % 2), then the math of group it - 1. The stages are unrolled here, in Python, so
# the buffers' indices are constants (registers) and the loads of group it are issued before the math
# of group it - 1. Chunk c goes to warp c % W, so a step's warps read adjacent 64-byte pieces of each row
# (a warp taking a contiguous run of chunks instead ran 5-40% slower on the H200, h200_gemv_loads.md).
# $-fields as in _KERNEL plus IT and BUF.
_LOAD = Template('''
for u in T.unroll($U):
    c = T.meta_var(($IT * $U + u) * $W + warp)
    if c < $C:
        for rt in T.unroll($RT):
            for h in T.unroll(2):
                q = T.meta_var((($BUF * $U + u) * $RT + rt) * 2 + h)
$WLOAD
                sc[q] = scales[$ROW, c * $CHUNK // $G]
                zc[q] = $ZERO
''')
_MATH = Template('''
for u in T.unroll($U):
    c = T.meta_var(($IT * $U + u) * $W + warp)
    if c < $C:
        for rt in T.unroll($RT):
            q = T.meta_var((($BUF * $U + u) * $RT + rt) * 2)
            T.evaluate(T.cuda.func_call(
                "nb_mma_chunk", acc.access_ptr("rw", offset=rt * 8),
                wv.access_ptr("r", offset=q * 4), wv.access_ptr("r", offset=q * 4 + 4),
                x.access_ptr("r", offset=T.min(by * $TOK + T.Cast("int64", r), m - T.int64(1))
                             * T.int64($K) + T.Cast("int64", c * $CHUNK + t * 32)),
                x.access_ptr("r", offset=T.min(by * $TOK + T.Cast("int64", r + 8), m - T.int64(1))
                             * T.int64($K) + T.Cast("int64", c * $CHUNK + t * 32)),
                $TT, sc[q], sc[q + 1], zc[q], zc[q + 1], source_code=$HELPERS))
''')

# One lane's 16 bytes of W (the 4 words of row ROW at chunk c): TVM's vector load, or (Config.loads)
# inline PTX with cache qualifiers. $-fields ROW, KW (words per row), LDNAME and LDSRC (the helper's name
# and source).
_WLOAD = '''                for v in T.vectorized(4):
                    wv[q * 4 + v] = qweight[$ROW, c * 16 + t * 4 + v]'''
_WLOAD_PTX = '''                T.evaluate(T.cuda.func_call("$LDNAME", wv.access_ptr("w", offset=q * 4), qweight.access_ptr(
                    "r", offset=($ROW) * $KW + c * 16 + t * 4), source_code=$LDSRC))'''
_LD_HELPER = """
__forceinline__ __device__ void {name}(unsigned* d, const unsigned* s) {{
  asm("ld.global.{q}.v4.u32 {{%0, %1, %2, %3}}, [%4];" : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]) : "l"(s));
}}
"""


def _weight_load(loads: str, row: str, kw: int) -> str:
    """The TVMScript of one lane's weight load (_WLOAD or, with `loads`, _WLOAD_PTX and its helper)."""
    if not loads:
        return Template(_WLOAD).substitute(ROW=row)
    name = "nb_ld_" + "".join(ch if ch.isalnum() else "_" for ch in loads)
    return Template(_WLOAD_PTX).substitute(ROW=row, KW=kw, LDNAME=name,
                                           LDSRC=repr(_LD_HELPER.format(name=name, q=loads)))


# $-fields: SIGNATURE (template.signature) K G (group) C (chunks per row) CHUNK TT (token tiles) TOK (= 8 TT)
# W (warps) RT U ITERS (pipeline groups per warp) RB (rows per block) NBLK OUT (outputs per block) OPT
# (outputs per thread) ZERO VAL (the output before rounding) PIPELINE (the stages)
_KERNEL = Template('''
$SIGNATURE
    for by in T.thread_binding((m + T.int64($TOK - 1)) // T.int64($TOK), thread="blockIdx.y"):
        for bx in T.thread_binding($NBLK, thread="blockIdx.x"):
            for tx in T.thread_binding($W * 32, thread="threadIdx.x"):
                red = T.alloc_buffer(($W * $OUT,), "float32", scope="shared")
                acc = T.alloc_buffer(($RT * 8,), "float32", scope="local")
                wv = T.alloc_buffer((2 * $U * $RT * 8,), "uint32", scope="local")
                sc = T.alloc_buffer((2 * $U * $RT * 2,), "float16", scope="local")
                zc = T.alloc_buffer((2 * $U * $RT * 2,), "float16", scope="local")
                s = T.alloc_buffer((1,), "float32", scope="local")
                warp = T.meta_var(tx // 32)
                r = T.meta_var(tx % 32 // 4)
                t = T.meta_var(tx % 4)
                for i in T.unroll($RT * 8):
                    acc[i] = T.float32(0)
$PIPELINE
                # fragment (rt, token tile j, i) = row rt*16 + r + 8*(i // 2), token 8j + 2t + i % 2
                for rt in T.unroll($RT):
                    for j in T.unroll($TT):
                        for i in T.unroll(4):
                            red[warp * $OUT + (rt * 16 + r + i // 2 * 8) * $TOK + j * 8 + t * 2 + i % 2] = acc[rt * 8 + j * 4 + i]
                T.tvm_storage_sync("shared")
$STORE''')
# out index o = token * RB + row: consecutive threads store consecutive features
_STORE = '''
for e in T.unroll($OPT):
    o = T.meta_var(tx + e * $W * 32)
    if o < $OUT:
        tok = T.meta_var(by * $TOK + T.Cast("int64", o // $RB))
        if tok < m:
            s[0] = T.float32(0)
            for w in T.unroll($W):
                s[0] = s[0] + red[w * $OUT + o % $RB * $TOK + o // $RB]
            y[tok, bx * $RB + o % $RB] = T.Cast("float16", $VAL)'''
# swiglu: out index o = token * RB / 2 + f; output f of the block is silu(gate row) * up row, the rows
# (f // 8) * 16 + f % 8 and that + 8 of the block (see _row), each summed over the warps and
# rounded to fp16 exactly as _STORE does, then combined in the graph's fp16 ops
# (compiler.int4_kernel.silu_times): the bits of the unfused kernel followed by the graph's SwiGLU
_STORE_SWIGLU = '''
sg = T.alloc_buffer((2,), "float32", scope="local")
gh = T.alloc_buffer((2,), "float16", scope="local")
for e in T.unroll($OPT):
    o = T.meta_var(tx + e * $W * 32)
    if o < $OUT // 2:
        tok = T.meta_var(by * $TOK + T.Cast("int64", o // ($RB // 2)))
        gate = T.meta_var(o % ($RB // 2) // 8 * 16 + o % 8)
        if tok < m:
            sg[0] = T.float32(0)
            sg[1] = T.float32(0)
            for w in T.unroll($W):
                sg[0] = sg[0] + red[w * $OUT + gate * $TOK + o // ($RB // 2)]
                sg[1] = sg[1] + red[w * $OUT + (gate + 8) * $TOK + o // ($RB // 2)]
            gh[0] = T.Cast("float16", sg[0])
            gh[1] = T.Cast("float16", sg[1])
            y[tok, bx * ($RB // 2) + o % ($RB // 2)] = gh[0] * (T.float16(1) / (T.float16(1) + T.exp(
                T.float16(0) - gh[0]))) * gh[1]'''


def _row(n: int, rt: int, swiglu: bool) -> str:
    """The row of W that lane row r of half h (rows r / r + 8 of the mma tile) of row tile rt of block bx
    reads. SwiGLU: row r of the block's 8-row gate slice (h = 0, W's rows [0, N/2)) or of the up slice
    (h = 1, N/2 + the same): one 16-row tile holds the gate and up rows of 8 outputs, so the block's
    partial sums pair them with no weight re-layout."""
    if swiglu:
        return f"h * {n // 2} + bx * {8 * rt} + rt * 8 + r"
    return f"bx * {16 * rt} + rt * 16 + h * 8 + r"


def gemv_mma_func(attrs: dict, rows: int, cfg: Config):
    """The tensor-core GEMV PrimFunc for one int4 spec and token bucket (m <= rows), or None."""
    n, k, g = int(attrs["n"]), int(attrs["k"]), int(attrs["group_size"])
    sym, bias = bool(attrs["symmetric"]), bool(attrs["has_bias"])
    rt = cfg.row_tiles
    while rt > 1 and n % (16 * rt):
        rt //= 2
    if not takes(attrs, "sm_80") or rows > 16 or n % (16 * rt) or cfg.warps < 1 or cfg.chunks < 1:
        return None
    swiglu = is_swiglu(attrs)
    if swiglu and (bias or not sym):
        return None  # not built: Llama's gate/up projections have neither
    tt = 1 if rows <= 8 else 2
    tok, rb, c = 8 * tt, 16 * rt, k // CHUNK
    out = rb * tok
    row = _row(n, rt, swiglu)
    zero = "T.float16(8)" if sym else f"zeros[{row}, c * {CHUNK} // {g}]"
    val = f'T.Cast("float32", bias[bx * {rb} + o % {rb}]) + s[0]' if bias else "s[0]"
    fields = dict(
        K=k, G=g, C=c, CHUNK=CHUNK, TT=tt, TOK=tok, W=cfg.warps, RT=rt,
        U=cfg.chunks, ITERS=math.ceil(c / (cfg.chunks * cfg.warps)), RB=rb, NBLK=n // rb, OUT=out,
        OPT=math.ceil(out // (2 if swiglu else 1) / (32 * cfg.warps)), ROW=row, ZERO=zero, VAL=val,
        SIGNATURE=signature("gemv_mma", attrs, n // 2 if swiglu else n), HELPERS=repr(_HELPERS))
    fields["WLOAD"] = _weight_load(cfg.loads, row, k // 8)
    fields["STORE"] = indent(Template(_STORE_SWIGLU if swiglu else _STORE).substitute(fields), 16)
    stages = []
    for it in range(fields["ITERS"] + 1):  # see _LOAD / _MATH
        if it < fields["ITERS"]:
            stages.append(_LOAD.substitute(fields, IT=it, BUF=it % 2))
        if it == 0:  # the first group's weights are in flight before x, the previous kernel's output
            stages.append(GRID_WAIT)
        if it >= 1:
            stages.append(_MATH.substitute(fields, IT=it - 1, BUF=(it - 1) % 2))
    src = _KERNEL.substitute(fields, PIPELINE=indent("\n".join(stages), 16))
    import tvm
    from tvm.script import tirx as T  # noqa: F401  (the template's T)

    return tvm.script.from_source(src)


class GEMVMMA(TemplateRule):
    """dlight-style rule: the "mma"-tagged copies of our int4 kernel -> the tensor-core GEMV above."""

    kind = "mma"
    swiglu = True

    def __init__(self, config: Config | None = None):
        self.config = config  # replaces the per-arch default of every copy (benchmarks, tests)

    def build(self, func, attrs, target):
        from compiler.tuning import config_from

        if not takes(attrs[ATTR], str(target.attrs.get("arch", "")) or None):
            return None
        cfg = config_from(func, Config, self.config or default_config(target, func))  # a tuned record wins
        return gemv_mma_func(attrs[ATTR], int(attrs[ROWS_ATTR]), cfg)


def rule():
    return GEMVMMA()


def default_config(target, func=None) -> Config:
    """The untuned config of a copy on a target (what tuning measures first and must beat)."""
    if func is None or func.attrs is None or ATTR not in func.attrs:
        return Config()
    return default_for(config_for(target), int(func.attrs[ATTR]["n"]), int(func.attrs[ROWS_ATTR]))
