"""Prefill-time (m >= ~16 tokens) schedule for the fused int4 matmul: a tensor-core (mma.sync) GEMM.

Since the wgmma GEMM (schedules/gemm_wgmma.py) took m > 16 on Hopper, this kernel serves every GEMM
copy on other GPUs and on shapes the wgmma kernel does not take.

Recognizes the PrimFunc of compiler/int4_kernel.py by its "nibble.int4" attr, but only the copy that the
dispatch pass (compiler/dispatch.py) tagged `"nibble.kernel" = "gemm"`. Anything else, or a shape the
kernel does not tile (see `gemm_func`), returns None and falls through to dlight's Matmul.

Like schedules/gemv.py this rule emits an equivalent hand-laid-out TIR kernel instead of chaining
schedule primitives on the TE PrimFunc: the point of the kernel is *where* the dequantize happens (while
staging the weight tile, once per block, in registers with a few bit operations per weight), and the
order of asynchronous copies, barriers and tensor-core instructions, which tensorize + software-pipeline
annotations do not give this much control over. It uses the same PTX that TVM's MMA tensor intrinsics
(tvm.s_tir.tensor_intrin.cuda LDMATRIX_f16_* / MMA_f16f16f32_*) lower to: `T.ptx_legacy.ldmatrix` and
`T.ptx_legacy.mma` (mma.sync.m16n8k16.row.col.f32.f16.f16.f32), plus `cp.async` for the staging.
Not importing the tensor-intrinsic module also saves the 30+ s it costs to import.

Per thread block (BM x BN output tile, BK-wide k steps, STAGES-deep cp.async ring in shared memory):
  * x tile [BM, BK] fp16 and the packed weight tile [BN, BK/8] uint32 are copied global -> shared with
    cp.async (16 B for x, 8/16 B for the words), STAGES-1 k steps ahead of the math; rows of x past m are
    clamped to row m-1 (their results are never stored), so no predicates in the main loop.
  * dequantize while staging: the step after next's packed words are turned into fp16 W[BN, BK] in a
    second (double-buffered) shared tile, by the same warps, between their mma of the current step: per
    uint32 word (8 nibbles), two masks, four byte-permutes and four `|0x6400` give 1024+q in each fp16
    half ("magic number" decode, no int->float conversion); then one HSUB2 (- (1024+z)) and one HMUL2
    (* scale) per 2 weights, which is bit-exact the PrimFunc's fp16 (q - z) * s.
  * x and W are read from shared with ldmatrix.x4 (XOR-swizzled 16 B chunks: conflict-free without
    padding) into mma.sync m16n8k16 fragments;
    accumulation is fp32 in registers (the dlight wmma schedule accumulates in fp16).
  * epilogue straight from the accumulator fragments: + bias, round to fp16, store (row < m only).
One __syncthreads per k step: the barrier that publishes step kt's W tile also frees the ring slot and
the W buffer that the same iteration then overwrites.

Split-K (few tokens). At m <= 32 a 128-wide N tile gives N/128 thread blocks (32 for N = 4096) and each
walks all of K: on 132 SMs most of the GPU idles, and each block is latency-bound (~2 k steps in flight).
With split_k = S the grid gets a third axis, blockIdx.z, over S contiguous slices of the K steps; each
block writes its fp32 partial tile (no bias, no rounding) to a global workspace ws[m, S, N] (a "global"
T.alloc_buffer: TVM allocates it per call from its device workspace pool, sized by the symbolic m), and a
second kernel in the same PrimFunc sums the S partials in a fixed order, adds the bias and rounds to
fp16: deterministic, the same fp32-accumulate-then-round as the PrimFunc, in another summation order.

Which tile and split (the rule's whole decision; `plan` returns it). compiler/dispatch.py makes one
"gemm" copy per token bucket, tagged with its bound R ("nibble.rows": that copy runs only for m <= R;
untagged: the unbounded copy for the largest m):
  * tile: the first of ArchConfig.tiles whose m_max >= R (16-row tiles for m <= 16, 32 for m <= 32,
    64 for m <= 256); past them, or with no R, the large tile. Wide N (N / large.block_n >=
    wide_n_blocks) takes the large tile past wide_m_max, where it already fills the SMs.
  * split: Config.split_k if set (tuned), else auto: blocks without split = ceil(R / block_m) x
    N / block_n; split = sms x resident blocks per SM (split_fill, capped by shared memory) // blocks,
    at most split_max, and at most what leaves every slice stages - 1 k steps (the ring's prologue).
    The unbounded copy never splits (its m is unknown and large).
Knobs are in Config and ArchConfig, per-arch defaults in DEFAULTS, so a tuner can search them.
"""
from __future__ import annotations

import dataclasses
from string import Template

from .template import ATTR, ROWS_ATTR, TemplateRule, indent, signature, split_k_reduce
CONFIG_ATTR = "nibble.config"  # = compiler.tuning.CONFIG_ATTR: a tuned Config for this copy's launch
VERSION = 2  # bump when the template changes meaning: tuning records of other versions are ignored
# v2: one launch per bucket copy (was: small/large picked inside the copy), split_k


@dataclasses.dataclass(frozen=True)
class Config:
    """One tile configuration of the GEMM."""

    block_m: int = 128  # BM: rows of x (tokens) per thread block
    block_n: int = 128  # BN: output features per thread block
    block_k: int = 32  # BK: reduction step; must divide the quantization group
    warps_m: int = 2  # warps along M; warp tile = BM/warps_m x BN/warps_n (multiples of 16 x 16)
    warps_n: int = 4
    stages: int = 4  # cp.async ring depth (>= 3: one slot read, one being dequantized, rest in flight)
    w_vec: int = 2  # uint32 words of qweight per cp.async (2 = 8 B, 4 = 16 B)
    split_k: int = 0  # K slices over blockIdx.z (fp32 partials + a reduction kernel); 0 = auto, see plan

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    def smem_bytes(self) -> int:
        ring = self.stages * (self.block_m * self.block_k * 2 + self.block_n * self.block_k // 2)
        return ring + 2 * self.block_n * self.block_k * 2

    def label(self) -> str:
        """Short name for tables: BMxBNxBK, stages, warps."""
        return (f"{self.block_m}x{self.block_n}x{self.block_k} s{self.stages} "
                f"w{self.warps_m}x{self.warps_n}")

    def check(self) -> str | None:
        """Why this config cannot be laid out, or None."""
        bm, bn, bk, t = self.block_m, self.block_n, self.block_k, self.threads
        if bm % (16 * self.warps_m) or bn % (16 * self.warps_n):
            return "warp tile must be a multiple of 16 x 16"
        if bk % 16 or bk < 16:
            return "block_k must be a multiple of 16"
        if self.stages < 3:
            return "stages must be >= 3"
        if (bm * bk // 8) % t:
            return "x tile must split into whole 16 B chunks per thread"
        if (bk // 8) % self.w_vec or (bn * bk // 8) % (t * self.w_vec):
            return "weight tile must split into whole w_vec-word chunks per thread"
        if self.split_k < 0:
            return "split_k must be >= 0 (0 = auto)"
        return None


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Per-arch tiles for the token buckets and the split-K rule (see the module docstring)."""

    tiles: tuple  # ((m_max, Config), ...) by increasing m_max: a copy for m <= R takes the first R fits
    large: Config  # the unbounded copy, and buckets past every m_max
    # wide N (n / large.block_n >= wide_n_blocks) takes the large tile past wide_m_max tokens. H200:
    # N = 4096 -> 32 blocks wants the 64-row tile at m = 200; N = 12288 -> 96 and 22016 -> 172 blocks
    # ran 1.3x faster with the large tile at m = 200 but 1.7x slower at m = 32 (gemm_h200*.md)
    wide_n_blocks: int = 64
    wide_m_max: int = 64
    max_smem: int = 96 * 1024  # dynamic shared memory a block may use on this arch (opt-in > 48 KiB)
    # split-K auto rule: aim for sms x split_fill thread blocks (split_fill resident per SM, fewer if
    # shared memory holds fewer), so every SM streams weights from several blocks at once: one block
    # keeps only ~2-3 k steps (a few KiB) of loads in flight, far below what hides HBM latency. More
    # slices cost fp32 workspace traffic (split x m x N x 4 B, through L2), hence split_max.
    sms: int = 132
    smem_per_sm: int = 228 * 1024
    split_fill: int = 4
    split_max: int = 16


# H200 measurements (benchmarks/results/gemm_h200.md): BK=64 with 16 B weight copies beats BK=32 by
# ~1.3x everywhere (half the barriers and dequant calls per MAC), 4 stages ~2% over 3; 128x128 tiles for
# large m, 64x128 below 256 tokens for small N so that ~200 tokens still make >= 128 blocks.
# 16- and 32-row tiles (one warp row, 4 warps along N) for m <= 16 / 32 so few tokens do not compute
# 64-128 rows of mma per tile, and take 56 / 64 KiB of shared memory (4 / 3 blocks per SM) for split-K.
_TINY = Config(block_m=16, block_k=64, warps_m=1, warps_n=4, w_vec=4, stages=4)
_TINY32 = Config(block_m=32, block_k=64, warps_m=1, warps_n=4, w_vec=4, stages=4)
_SMALL = Config(block_m=64, block_k=64, w_vec=4, stages=4)
_LARGE = Config(block_k=64, w_vec=4, stages=4)
_TILES = ((16, _TINY), (32, _TINY32), (256, _SMALL))
DEFAULTS = {
    "sm_90": ArchConfig(tiles=_TILES, large=_LARGE, max_smem=200 * 1024),
    "sm_80": ArchConfig(tiles=_TILES, large=_LARGE, max_smem=160 * 1024, sms=108, smem_per_sm=164 * 1024),
    "default": ArchConfig(tiles=((32, Config(block_m=16, warps_m=1, warps_n=2, stages=3)),
                                 (256, Config(block_m=64, warps_m=2, warps_n=4, stages=3))),
                          large=Config(stages=3), max_smem=48 * 1024, sms=80, smem_per_sm=96 * 1024),
}


# What compiler/tuning.py searches for each bucket copy (invalid combinations are declined by
# Config.check / fits; split_k 0 is the auto rule).
SPACE = {"block_m": (16, 32, 64, 128, 256), "block_n": (64, 128, 256), "block_k": (32, 64),
         "warps_m": (1, 2, 4), "warps_n": (2, 4), "stages": (3, 4, 5), "w_vec": (2, 4),
         "split_k": (0, 1, 2, 4, 8, 16)}


def config_for(target) -> ArchConfig:
    arch = str(target.attrs.get("arch", "")) if target is not None else ""
    return DEFAULTS.get(arch, DEFAULTS["default"])


def tile_for(arch: ArchConfig, n: int, rows: int | None) -> Config:
    """The tile config of the copy serving m <= rows (None: the unbounded copy); see the docstring."""
    if rows is None:
        return arch.large
    if rows > arch.wide_m_max and n // arch.large.block_n >= arch.wide_n_blocks:
        return arch.large
    return next((c for m_max, c in arch.tiles if rows <= m_max), arch.large)


def split_for(arch: ArchConfig, c: Config, n: int, k: int, rows: int | None) -> int:
    """K slices for config c on an n x k kernel serving m <= rows: c.split_k if set, else the auto rule."""
    if c.split_k:
        return c.split_k
    if rows is None or c.block_k < 16 or c.stages < 3 or n < c.block_n:  # (fits() declines the latter)
        return 1
    most = max(1, k // c.block_k // (c.stages - 1))  # every slice fills the ring's prologue
    blocks = -(-rows // c.block_m) * (n // c.block_n)
    resident = max(1, min(arch.split_fill, arch.smem_per_sm // (c.smem_bytes() + 1024)))
    return max(1, min(arch.sms * resident // blocks, arch.split_max, most))


def plan(attrs: dict, arch: ArchConfig, rows: int | None = None, tuned: Config | None = None):
    """(Config, split) the rule uses for a kernel spec and bucket; `tuned` replaces the tile config."""
    n, k = int(attrs["n"]), int(attrs["k"])
    c = tuned or tile_for(arch, n, rows)
    return c, split_for(arch, c, n, k, rows)


# CUDA helpers for everything that touches shared memory. They take 32-bit shared-space addresses
# (byte offsets from the block's dynamic shared buffer), never TIR buffer references: TVM's ThreadSync
# pass cannot tell the slots of a ring buffer apart and would otherwise add a barrier per stage (and
# refuses to put them inside the `if`s of the pipeline); this kernel places its barriers itself.
_HELPERS = {
    "nb_smem_addr": r"""
__forceinline__ __device__ unsigned int nb_smem_addr(void* p) {
  return (unsigned int)__cvta_generic_to_shared(p);
}
""",
    "nb_cp_async16": r"""
__forceinline__ __device__ void nb_cp_async16(unsigned int dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
}
""",
    "nb_cp_async8": r"""
__forceinline__ __device__ void nb_cp_async8(unsigned int dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" :: "r"(dst), "l"(src) : "memory");
}
""",
    "nb_ldmatrix_x4": r"""
__forceinline__ __device__ void nb_ldmatrix_x4(void* frag, unsigned int addr) {
  unsigned int* r = reinterpret_cast<unsigned int*>(frag);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
// Dequantize one uint32 word (8 nibbles along k) read from shared memory at src into 8 fp16 stored
// at dst as one 16 B store. zm = 1024 + zero point (exact in fp16), s = the group scale.
""",
    "nb_dequant8": r"""
__forceinline__ __device__ void nb_dequant8(unsigned int dst, unsigned int src, half s, half zm) {
  unsigned int w;
  asm volatile("ld.shared.b32 %0, [%1];" : "=r"(w) : "r"(src) : "memory");
  // nibble 2i in the low half of byte i of e, nibble 2i+1 in byte i of o
  const unsigned int e = w & 0x0F0F0F0Fu, o = (w >> 4) & 0x0F0F0F0Fu;
  const half2 s2 = __half2half2(s), z2 = __half2half2(zm);
  unsigned int r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    // bytes (e_i, e_i, o_i, o_i) -> halves (0x6400 | q_2i, 0x6400 | q_2i+1) = (1024 + q, 1024 + q')
    unsigned int p = __byte_perm(e, o, (unsigned)(i | (i << 4) | ((4 + i) << 8) | ((4 + i) << 12)));
    p = (p & 0x000F000Fu) | 0x64006400u;
    half2 h = __hmul2(__hsub2(*reinterpret_cast<half2*>(&p), z2), s2);  // exact (q - z), one rounding
    r[i] = *reinterpret_cast<unsigned int*>(&h);
  }
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};"
               :: "r"(dst), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3]) : "memory");
}
""",
}


_FUNC = Template('''
$SIGNATURE
$BODY
''')

# One launch; the helpers below fill the pipeline pieces. Shared memory (bytes from sb): the x ring
# [S][BM][BK] fp16 at 0, the packed-weight ring [S][BN][BK/8] u32 at $WQ0, the dequantized W tiles
# [2][BN][BK] fp16 at $WS0. $KT is this block's number of k steps (its K slice under split-K) and the
# loads add the slice's first step; ring slots and W buffers count local steps.
_LAUNCH = Template('''
for tx in T.thread_binding($THREADS, thread="threadIdx.x"):
    smem = T.alloc_buffer(($SMEM,), "uint8", scope="shared.dyn")
    sbv = T.alloc_buffer((1,), "uint32", scope="local")
    af = T.alloc_buffer(($MI * 8,), "float16", scope="local")
    bf = T.alloc_buffer(($NI * 4,), "float16", scope="local")
    cf = T.alloc_buffer(($MI * $NI * 4,), "float32", scope="local")
    sc = T.alloc_buffer(($LW,), "float16", scope="local")
    zc = T.alloc_buffer(($LW,), "float16", scope="local")
    sbv[0] = T.cuda.func_call("nb_smem_addr", smem.access_ptr("rw"), source_code=$HELPERS,
                              return_type="uint32")
    sb = T.meta_var(sbv[0])
    for i in T.unroll($MI * $NI * 4):
        cf[i] = T.float32(0)
    # prologue: k steps 0 .. S-2 in flight, step 0 dequantized
    for s in T.unroll($S - 1):
$LOAD_S
        T.evaluate(T.ptx["cp.async.commit_group"]())
$SCALE_0
    T.evaluate(T.ptx["cp.async.wait_group"]($S - 2))
    T.tvm_storage_sync("shared")
$DEQUANT_0
    for kt in T.serial($KT):
        # steps <= kt+1 have landed (own copies), then everyone's; W[kt % 2] is complete and
        # ring slot (kt-1) % S and W[(kt+1) % 2] are no longer read by anyone
        T.evaluate(T.ptx["cp.async.wait_group"]($S - 3))
        T.tvm_storage_sync("shared")
        if kt + $S - 1 < $KT:
$LOAD_NEXT
        T.evaluate(T.ptx["cp.async.commit_group"]())
        if kt + 1 < $KT:
$SCALE_NEXT
$COMPUTE
        if kt + 1 < $KT:
$DEQUANT_NEXT
$EPILOGUE
''')

def _swz(row: str, chunk: str, chunks: int) -> str:
    """XOR swizzle of the 16 B chunk index within a row so that 8 consecutive rows of one logical chunk
    land in 8 different bank groups (ldmatrix reads 8 rows x 16 B per matrix)."""
    per_line = max(1, 8 // chunks)  # rows per 128 B line
    phase = min(chunks, 8)
    return f"T.bitwise_xor({chunk}, (({row}) // {per_line}) % {phase})"


def _launch(c: Config, n: int, k: int, g: int, sym: bool, bias: bool, split: int = 1) -> str:
    """The GEMM launch; with split > 1 it covers one K slice per blockIdx.z and writes fp32 to ws."""
    bm, bn, bk, S, t = c.block_m, c.block_n, c.block_k, c.stages, c.threads
    steps = k // bk
    grid = (f'for by in T.thread_binding((m + T.int64({bm - 1})) // T.int64({bm}), thread="blockIdx.y"):\n'
            f'    for bx in T.thread_binding({n // bn}, thread="blockIdx.x"):')
    if split == 1:
        kb, kt_n = "0", str(steps)
    else:  # slice z = steps [z * steps // split, (z + 1) * steps // split): sizes differ by at most 1
        grid = f'for bz in T.thread_binding({split}, thread="blockIdx.z"):\n' + indent(grid, 4)
        kb = f"bz * {steps} // {split}"
        kt_n = (str(steps // split) if steps % split == 0
                else f"((bz + 1) * {steps} // {split} - {kb})")
    wm_, wn_ = bm // c.warps_m, bn // c.warps_n  # warp tile
    mi, ni = wm_ // 16, wn_ // 8
    xc = bk // 8  # 16 B chunks per row of an x or W tile (= packed words per weight-tile row)
    vpr = xc // c.w_vec  # w_vec-word copies per weight-tile row
    xl = bm * xc // t  # x chunks per thread per step
    lw = bn * vpr // t  # weight copies per thread per step
    wq0 = S * bm * bk * 2  # byte offsets in shared memory
    ws0 = wq0 + S * bn * xc * 4

    def call(name: str, *args: str) -> str:
        return f'T.evaluate(T.cuda.func_call("{name}", {", ".join(args)}, source_code={_HELPERS[name]!r}))'

    def load(step: str) -> str:
        slot = f"({step}) % {S}"
        lines = []
        for i in range(xl):
            ci = f"(tx + {i * t})"
            r, ch = f"{ci} // {xc}", f"{ci} % {xc}"
            dst = f"sb + T.Cast(\"uint32\", (({slot} * {bm} + {r}) * {bk} + {_swz(r, ch, xc)} * 8) * 2)"
            src = (f'x.access_ptr("r", offset=T.min(by * T.int64({bm}) + T.Cast("int64", {r}), m - T.int64(1))'
                   f' * T.int64({k}) + T.Cast("int64", ({kb} + {step}) * {bk} + ({ch}) * 8))')
            lines.append(call("nb_cp_async16", dst, src))
        for i in range(lw):
            ci = f"(tx + {i * t})"
            r, v = f"{ci} // {vpr}", f"{ci} % {vpr}"
            dst = f"sb + T.Cast(\"uint32\", {wq0} + (({slot} * {bn} + {r}) * {xc} + ({v}) * {c.w_vec}) * 4)"
            src = (f'qweight.access_ptr("r", offset=(bx * {bn} + {r}) * {k // 8} + ({kb} + {step}) * {xc}'
                   f' + ({v}) * {c.w_vec})')
            lines.append(call(f"nb_cp_async{4 * c.w_vec}", dst, src))
        return "\n".join(lines)

    def scale(step: str) -> str:
        lines = []
        for i in range(lw):
            r = f"(tx + {i * t}) // {vpr}"
            grp = f"({kb} + {step}) * {bk} // {g}"
            lines.append(f"sc[{i}] = scales[bx * {bn} + {r}, {grp}]")
            z = "T.float16(1032)" if sym else f"T.float16(1024) + zeros[bx * {bn} + {r}, {grp}]"
            lines.append(f"zc[{i}] = {z}")
        return "\n".join(lines)

    def dequant(step: str) -> str:
        slot, buf = f"({step}) % {S}", f"({step}) % 2"
        lines = []
        for i in range(lw):
            ci = f"(tx + {i * t})"
            r, v = f"{ci} // {vpr}", f"{ci} % {vpr}"
            lines.append(f"for u in T.unroll({c.w_vec}):")
            src = f"sb + T.Cast(\"uint32\", {wq0} + (({slot} * {bn} + {r}) * {xc} + ({v}) * {c.w_vec} + u) * 4)"
            dst = (f"sb + T.Cast(\"uint32\", {ws0} + (({buf} * {bn} + {r}) * {bk}"
                   f" + {_swz(r, f'({v}) * {c.w_vec} + u', xc)} * 8) * 2)")
            lines.append("    " + call("nb_dequant8", dst, src, f"sc[{i}]", f"zc[{i}]"))
        return "\n".join(lines)

    lane, wm, wn = "tx % 32", f"tx // 32 // {c.warps_n}", f"tx // 32 % {c.warps_n}"
    ra = f"{wm} * {wm_} + i * 16 + {lane} % 16"
    rb = f"{wn} * {wn_} + j * 16 + {lane} % 8 + {lane} // 16 * 8"
    a_addr = f"sb + T.Cast(\"uint32\", ((kt % {S} * {bm} + {ra}) * {bk} + {_swz(ra, f'kk * 2 + {lane} // 16', xc)} * 8) * 2)"
    b_addr = (f"sb + T.Cast(\"uint32\", {ws0} + ((kt % 2 * {bn} + {rb}) * {bk}"
              f" + {_swz(rb, f'kk * 2 + {lane} // 8 % 2', xc)} * 8) * 2)")
    compute = f"""
for kk in T.unroll({bk // 16}):
    for i in T.unroll({mi}):
        {call("nb_ldmatrix_x4", 'af.access_ptr("w", offset=i * 8)', a_addr)}
    for j in T.unroll({ni // 2}):
        {call("nb_ldmatrix_x4", 'bf.access_ptr("w", offset=j * 8)', b_addr)}
    for i in T.unroll({mi}):
        for j in T.unroll({ni}):
            T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "fp16", "fp16", "fp32", af.data, i * 8,
                bf.data, j * 4, cf.data, (i * {ni} + j) * 4, False, dtype="float32"))
"""
    val = f"cf[(i * {ni} + j) * 4 + h * 2 + c]"
    col = f"bx * {bn} + {wn} * {wn_} + j * 8 + {lane} % 4 * 2 + c"
    if bias and split == 1:
        val = f'{val} + T.Cast("float32", bias[{col}])'
    row = f'by * T.int64({bm}) + T.Cast("int64", {wm} * {wm_} + i * 16 + h * 8 + {lane} // 4)'
    # the fragment's fp32 pair -> y (bias, fp16) or, split, the slice's partial (the reduction finishes)
    store = (f'y[{row}, {col}] = T.Cast("float16", {val})' if split == 1 else f"ws[{row}, bz, {col}] = {val}")
    epilogue = f"""
for i in T.unroll({mi}):
    for j in T.unroll({ni}):
        for h in T.unroll(2):
            if {row} < m:
                for c in T.vectorized(2):
                    {store}
"""
    body = _LAUNCH.substitute(
        BM=bm, BN=bn, BK=bk, S=S, THREADS=t, MI=mi, NI=ni, LW=lw, KT=kt_n,
        SMEM=c.smem_bytes(), HELPERS=repr(_HELPERS["nb_smem_addr"]),
        LOAD_S=indent(load("s"), 8), SCALE_0=indent(scale("0"), 4),
        DEQUANT_0=indent(dequant("0"), 4), LOAD_NEXT=indent(load(f"kt + {S - 1}"), 12),
        SCALE_NEXT=indent(scale("kt + 1"), 12), COMPUTE=indent(compute, 8),
        DEQUANT_NEXT=indent(dequant("kt + 1"), 12), EPILOGUE=indent(epilogue, 4))
    depth = grid.count("\n") + 1
    return grid + "\n" + indent(body, 4 * depth)


def fits(attrs: dict, c: Config, max_smem: int, split: int = 1) -> str | None:
    """Why this config (with `split` K slices) cannot run this kernel spec, or None."""
    n, k, g = int(attrs["n"]), int(attrs["k"]), int(attrs["group_size"])
    why = c.check()
    if why:
        return why
    if str(attrs["x_dtype"]) != "float16":
        return "x must be float16 (other activation dtypes go to dlight)"
    if n % c.block_n or k % c.block_k or g % c.block_k:
        return f"n % {c.block_n}, k % {c.block_k} and group % {c.block_k} must be 0"
    if k // c.block_k // split < c.stages - 1:
        return f"needs at least {c.stages - 1} k steps per K slice"
    if c.smem_bytes() > max_smem:
        return f"{c.smem_bytes()} B of shared memory > {max_smem}"
    return None


def checked_plan(attrs: dict, arch: ArchConfig, rows: int | None = None, tuned: Config | None = None):
    """`plan` with the stages a short K slice allows, or None where the kernel cannot take the spec."""
    c, split = plan(attrs, arch, rows, tuned)
    if c.block_k <= 0 or split <= 0:
        return None
    # a short K slice cannot fill a deep ring: use fewer stages (>= 3) rather than give up
    c = dataclasses.replace(c, stages=max(3, min(c.stages, int(attrs["k"]) // c.block_k // split + 1)))
    return None if fits(attrs, c, arch.max_smem, split) else (c, split)


def takes(attrs: dict, rows: int | None, arch_name: str | None) -> bool:
    """Whether the untuned rule builds the bucket copy serving m <= rows for this arch ("sm_90")."""
    return checked_plan(attrs, DEFAULTS.get(arch_name or "", DEFAULTS["default"]), rows) is not None


def gemm_func(attrs: dict, arch: ArchConfig, rows: int | None = None, tuned: Config | None = None,
              source_only: bool = False):
    """The GEMM PrimFunc for one int4 kernel spec (the "nibble.int4" attr) serving m <= rows (None: any
    m), with the tile `plan` picks (or `tuned`), or None if it does not fit."""
    n, k, g = int(attrs["n"]), int(attrs["k"]), int(attrs["group_size"])
    sym, bias = bool(attrs["symmetric"]), bool(attrs["has_bias"])
    planned = checked_plan(attrs, arch, rows, tuned)
    if planned is None:
        return None
    c, split = planned
    body = _launch(c, n, k, g, sym, bias, split)
    if split > 1:
        ws, reduce = split_k_reduce(n, split, bias)
        body = "\n".join([ws, body, reduce])
    src = _FUNC.substitute(SIGNATURE=signature("gemm", attrs), BODY=indent(body, 4))
    if source_only:
        return src
    import tvm
    from tvm.script import tirx as T  # noqa: F401  (the source's T)

    return tvm.script.from_source(src)


def _rows(attrs) -> int | None:
    return int(attrs[ROWS_ATTR]) if ROWS_ATTR in attrs else None


class GEMM(TemplateRule):
    """dlight-style rule: the "gemm"-tagged copies of our int4 kernel -> the tensor-core GEMM above."""

    kind = "gemm"

    def __init__(self, config: ArchConfig | None = None):
        self.config = config

    def build(self, func, attrs, target):
        arch = self.config or config_for(target)
        rows, tuned = _rows(attrs), None
        if CONFIG_ATTR in attrs:  # tuned for this bucket: replaces the tile (and split) of plan
            from compiler.tuning import config_from

            tuned = config_from(func, Config, tile_for(arch, int(attrs[ATTR]["n"]), rows))
        return gemm_func(attrs[ATTR], arch, rows, tuned)


def rule():
    return GEMM()


def default_config(target, func=None) -> Config:
    """The untuned config of a "gemm" copy (its bucket's tile; the large one without a copy or bucket):
    what a tuning record replaces, and what tuning measures first."""
    arch = config_for(target)
    if func is None or func.attrs is None or ATTR not in func.attrs:
        return arch.large
    return tile_for(arch, int(func.attrs[ATTR]["n"]), _rows(func.attrs))
