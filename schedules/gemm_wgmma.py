"""Prefill-time (many tokens) schedule for the fused int4 matmul on Hopper: wgmma with W in registers.

Recognizes the copies of the "nibble.int4" PrimFunc that compiler/dispatch.py tagged
`"nibble.kernel" = "wgmma"` (on sm_90 the copies for m <= 32, 64, 128, 256, 1024 and the unbounded one;
the bound "nibble.rows" picks the default tile and K split); anything else, or a shape the kernel does not take (see
`takes`), returns None.

Why: schedules/gemm.py runs mma.sync and reaches ~300 TFLOP/s at 2048 tokens on an H200, where cuBLAS
fp16 reaches ~750 with wgmma (warpgroup MMA, sm_90a). Here the product is computed transposed, Y^T = W X^T, so that the
int4 weight is wgmma's A operand, which may come from registers (`wgmma ... {a0..a3}, descB`): each
warpgroup dequantizes its 64 rows x 16 k of W straight into the A fragment, and x, read once per block
into shared memory, is B through a shared-memory descriptor (vLLM's Machete gives its operands the
same roles).

Per thread block: WG warpgroups (128 threads each) own MT 64-row tiles of W each (BN = 64 WG MT rows
of N), all on the same BT tokens (BT = wgmma's n, <= 256, so one instruction covers the token tile); K,
or with split_k = SPLIT > 1 this block's slice of it (blockIdx.z), is walked in 64-k blocks through an
S-stage ring in shared memory, filled by TMA (Config.tma; else by per-thread cp.async, the kernel before):
thread 0 arms the stage's mbarrier with its byte count and issues the stage's tensor copies, every thread
waits on the barrier's phase. The tensor maps are encoded on the host at each call and passed as
__grid_constant__ kernel parameters (TVM's tensormap_encode_tiled).
  * x tile: BT token rows x 128 B (64 fp16 k), in wgmma's canonical K-major 128 B-swizzled layout
    (16 B chunk c of row n at n * 128 + (c ^ n % 8) * 16, 1 KiB-aligned atoms), which is TMA's 128 B
    swizzle. A tile at least 3/4 full of tokens < m comes in one box, a smaller one in boxes of x_rows
    rows up to m (TMA fills a box's rows past m with zeros, slowly; cp.async zero-fills them by
    src-size 0). The descriptor: start address, stride 1 KiB between 8-row groups, swizzle mode 128 B;
    the 4 k16 steps of a block add 32 B to the start address.
  * W tile: BN rows x 32 B of packed words (8 words = 64 k per row): TMA boxes of up to 256 rows (or one
    16 B cp.async per thread).
  * A fragment (the mma.sync m16n8k16 A layout, per warp 16 rows): lane (r = lane / 4, t = lane % 4)
    holds rows r, r + 8 at k 2t, 2t+1 and 2t+8, 2t+9 of the k16 step: byte t of the step's two words.
    A byte-permute puts byte t in both fp16 halves, one LOP3 masks (lo, 16 hi) and ORs the 0x6400
    magic, one HFMA2 (* (1, 1/16) - (1024 + z, 64 + z)) gives the exact (lo - z, hi - z), one HMUL2 the
    group scale: the PrimFunc's fp16 (q - z) * s, bit for bit. 4 instructions per 2 weights, each
    weight then used by BT tokens.
  * pipeline: per 64-k block, wait for its copies (the stage's mbarrier; or cp.async's group, then a
    fence of the async proxy, as wgmma reads what cp.async wrote), one barrier, issue the copies of the
    block S - 2 ahead, decode this block's 4 A fragments (into one of two register buffers), issue its
    4 wgmmas and commit them, then wait until only these are in flight: the previous block's wgmmas
    overlap this block's barrier and decode. The barrier of the next block then proves every warpgroup
    is done with the ring slot the next copies overwrite.
  * epilogue through shared memory (the ring, now free): the accumulators (fp32; lane holds rows r,
    r + 8 x tokens 8i + 2t, 8i + 2t + 1) + bias, rounded to fp16, go by `stmatrix .trans` into a
    [token][row] tile (rows padded by 16 B: conflict-free), then whole 16 B rows of it to y for tokens
    < m (stored straight they were scattered 2 B writes: 3-5% slower at 2048 tokens).
  * split K: the slice's fp32 partial (no bias) goes through the same tile to a workspace ws[m, SPLIT,
    N], and a second kernel in the PrimFunc (template.split_k_reduce, shared with schedules/gemm.py)
    sums the slices in order, adds the bias and rounds. Slices are whole 128-k pairs; one that starts
    inside a group (groups > 128) loads that group's scales first.
Accumulation is fp32 throughout. Knobs in Config, per-arch defaults in DEFAULTS (tile by token bucket
and N, K split by a rule: about one block per SM at m = the bucket's bound, at least the table's);
`nibble tune` searches SPACE. The kernel body is CUDA (a helper called from a one-statement TIR
launch), as the asm operands of wgmma (BT / 2 accumulator registers) have no TIR spelling. nvcc
builds it for sm_90a (compiler/cuda.py).

Measured on the H200 (benchmarks/results/h200_wgmma_tma.md): TMA staging took the 2048-token GEMM from
0.79-0.88x cuBLAS fp16 to 0.91-1.15x (cp.async's copies were its largest removable part:
h200_wgmma_ablation.md). Thread 0 issues the copies and also computes, so each extra TMA issue per stage
costs its warpgroup time; a producer warp with "empty" barriers instead ran 1.2-1.4x slower
(h200_wgmma_producer.md).

Stream-K (Config.stream_k; h200_wgmma_stream_k.md). Where a grid runs a partial second wave (N > 12288 at
m = 129..256), it gets one block per SM. Each block computes an equal share of all tiles' 128-k pairs:
  * a tile shared by several blocks is finished by the block holding its last pair, which adds the others'
    fp32 partials (workspace ws[block], a flag per block, zeroed by a one-block kernel before the GEMM);
  * 200 tokens went from 0.67-0.84x cuBLAS fp16 to 0.82-0.89x (h200_nibble_bench_run4.md). The rest is
    the pieces' own pipeline fills and epilogues (~9 us) and the finishing blocks' reads of the partials
    (2-6 us).
"""
from __future__ import annotations

import dataclasses
from string import Template

from .template import ATTR, ROWS_ATTR, TemplateRule, indent, signature, split_k_reduce

BK = 64  # k per ring stage: one 128 B swizzle atom of fp16 x per token row
VERSION = 3  # bump when the kernel changes meaning: tuning records of other versions are ignored


@dataclasses.dataclass(frozen=True)
class Config:
    tokens: int = 256  # BT: tokens per block = wgmma n (multiple of 16, <= 256); BT / 2 fp32 acc per thread
    warpgroups: int = 2  # WG: warpgroups per block (they share the x tile)
    m_tiles: int = 1  # MT: 64-row tiles per warpgroup (BN = 64 WG MT W rows per block: x is read once per
    # BN rows, so more rows per block means less x traffic; MT BT / 2 fp32 accumulators per thread)
    stages: int = 4  # S: cp.async ring depth; S - 2 blocks of 64 k in flight beyond the one computed
    split_k: int = 1  # K slices over blockIdx.z (fp32 partials + a reduction kernel) for grids of few blocks
    tma: bool = True  # stage x and W by TMA (one thread, mbarrier per stage) instead of per-thread cp.async
    x_rows: int = 32  # TMA: token rows per small x box. A token tile less than 3/4 full loads its rows < m in
    # small boxes, a fuller one in one box of the whole tile (rows past m: zeros, slow for TMA to fill)
    stream_k: int = 0  # > 0: stream_k blocks per SM, each an equal share of all tiles' 128-k pairs (fp32
    # partials for tiles shared between blocks): no partial last wave where the grid holds few tiles per SM

    @property
    def x_box(self) -> int:
        """Token rows per small x TMA box: x_rows where it divides the tile, else 16 (tokens are a multiple of
        16), so the small boxes of a partial tile stay inside it."""
        return self.x_rows if self.tokens % self.x_rows == 0 else 16

    @property
    def rows(self) -> int:
        return 64 * self.warpgroups * self.m_tiles

    @property
    def partial(self) -> int:
        """Stream-K: fp32 floats of one block's partial, its accumulators (tokens / 2 per m-tile and thread);
        the workspace's size per block and the CUDA's stride between blocks' partials."""
        return self.m_tiles * self.tokens // 2 * 128 * self.warpgroups

    def label(self) -> str:
        return (f"t{self.tokens}w{self.warpgroups}m{self.m_tiles}s{self.stages}"
                + (f"k{self.split_k}" if self.split_k > 1 else "")
                + (f"x{self.x_rows}" if self.tma and self.x_rows != Config.x_rows else "") + ("" if self.tma else "cp")
                + ("sk" if self.stream_k else "") + (str(self.stream_k) if self.stream_k > 1 else ""))

    def check(self) -> str | None:
        if self.tokens % 16 or not 16 <= self.tokens <= 256:
            return "tokens must be a multiple of 16 in [16, 256] (wgmma n; the epilogue stores 16 at a time)"
        if self.warpgroups not in (1, 2, 3, 4) or self.m_tiles not in (1, 2):
            return "warpgroups must be 1..4, m_tiles 1 or 2"
        if self.tma and (self.x_rows % 16 or self.x_rows > 256):
            return "x_rows must be a multiple of 16 up to 256 (whole 1 KiB swizzle atoms per box)"
        if self.stages < 3:
            return "stages must be >= 3"
        if self.split_k < 1:
            return "split_k must be >= 1"
        if not 0 <= self.stream_k <= 7:
            return "stream_k (blocks per SM) must be 0..7"
        if self.stream_k and self.split_k > 1:
            return "stream_k shares K between blocks itself: split_k must be 1"
        regs = self.m_tiles * (self.tokens // 2 + 32) + 40  # accumulators, two A buffers, the rest
        if regs > 255 or self.warpgroups * 128 * regs > 65536:
            return "accumulators exceed the register file"
        return None

    def smem_bytes(self) -> int:
        ring = self.stages * (self.tokens * 128 + self.rows * 32) + (8 * self.stages if self.tma else 0)  # + mbarriers
        return max(ring, self.tokens * _tile_row_bytes(self)) + 1024  # + alignment slack


def _tile_row_bytes(cfg: Config) -> int:
    """Bytes per token row of the epilogue's output tile in shared memory (it reuses the ring): fp16 rows
    + 16 B (stmatrix's 8 rows of 16 B then hit 8 different bank groups), or, split, fp32 rows + 16 B."""
    return cfg.rows * (2 if cfg.split_k == 1 else 4) + 16


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """Per-arch defaults: by the copy's token bound R (compiler/dispatch.py; None = unbounded) and N, the
    tile: ((max R, ((max N, Config), ...)), ...), both by increasing bound. The K split is mostly a rule:
    a bounded copy whose grid at m = R has B < sms blocks splits K into round(sms / B) slices (at most
    split_max), so the grid holds about one block per SM; a table entry's split_k is a floor."""

    by_rows: tuple
    sms: int = 132
    split_max: int = 8


# H200 (bench_linear.py --candidates, WGMMA_VARIANTS; h200_bench_linear_wgmma_split.md), us:
#  * N <= 4096 has few row blocks, so a 128-row tile (2 warpgroups) with the K split filling the SMs:
#    m = 32 4096->4096 10.9 us (32 tokens, split 4) vs 14.1 for the mma.sync GEMM, 11008->4096 22.9 vs 26.1;
#    m = 64 12.8 (64 tokens, split 4) vs 17.5, 27.2 vs 36.1;
#    m = 128 15.8 / 30.9 (128 tokens, split 4) vs 23.3 / 63.2 unsplit 64-row tiles; m = 200 23.2 / 51.2
#    (split 2) vs 26.6 / 68.3.
#  * wider N fills the SMs with row blocks: 64 rows x 32 tokens at m <= 32 (4096->12288 25.9 vs 28.4,
#    4096->22016 32.3 vs 50.1), x 64 at m <= 64 (28.2 vs 46.9, 36.8 vs 85.0), x 128 to m = 256.
#  * m <= 1024: N = 4096 wants 128-token tiles (m = 512: 37.5 vs 52.8 us, 11008->4096 114.9 vs 137.8),
#    wider N the 256-token, 128-row tile (4096->22016: 164.3 vs 232.5).
#  * larger m: 256 tokens x 128 rows (m = 2048: 113.8 us on 4096->4096 vs 153.4 with 128 tokens).
# With TMA staging (h200_wgmma_tma.md, sweep 2) the same tiles held, two splits moved up: m <= 32 on wide N
# splits K in 2 (4096->12288 20.6 vs 27.0 us, 4096->22016 32.2 vs 36.0), m = 129..256 on N = 4096 in 4
# (m = 128 / 200 / 256: 15.4 / 21.3 / 22.4 vs 20.4 / 22.6 / 22.1 us; 11008->4096 28.4 / 43.9 / 45.8 vs
# 45.4 / 52.1 / 48.5).
# m = 129..256 (h200_wgmma_stream_k.md, run of 06:11 UTC; us at m = 160 / 200 / 256): the 256-token, 128-row
# tile. 4096->12288 gives 96 blocks, one wave on 132 SMs: 48.0 / 41.9 / 42.0, against 46.5 / 44.2 / 44.4 by
# stream-K, whose pieces cost more than the idle SMs; wider N runs 1.3 waves (4096->22016: 172 blocks),
# where stream-K (one block per SM, each an equal share of all tiles' K pairs) gives 71.2 / 71.0 / 71.7 against
# 95.8 / 86.6 / 90.9. More, smaller stream-K blocks per SM (one warpgroup, 2-4 per SM) ran slower in every case.
# m = 65..128 has an entry of its own (h200_wgmma_128.md, fifteenth session; us at m = 65 / 96 / 128): the
# 256-token tiles above, which served it until the tuner's run 9 found them 1.27x / 1.16x slower, waste half
# the tile there (4096->12288 43.0 / 43.8 / 47.0, 4096->22016 66.7 / 67.2 / 70.7); the 128-token, 128-row tile
# gives 34.8 / 30.7 / 31.1 and 52.7 / 51.4 / 54.4, within 3% of the best variant on both (K split in 2
# or 4, stream-K, one warpgroup).
_BIG = Config()
_SK256 = Config(stream_k=1)
_H200 = ArchConfig(by_rows=(
    (32, ((4096, Config(tokens=32)), (1 << 30, Config(tokens=32, warpgroups=1, split_k=2)))),
    (64, ((4096, Config(tokens=64)), (1 << 30, Config(tokens=64, warpgroups=1)))),
    (128, ((4096, Config(tokens=128, split_k=4)), (1 << 30, Config(tokens=128)))),
    (256, ((4096, Config(tokens=128, split_k=4)), (12288, _BIG), (1 << 30, _SK256))),
    (1024, ((4096, Config(tokens=128)), (1 << 30, _BIG))),
    (1 << 30, ((1 << 30, _BIG),))))
DEFAULTS = {"sm_90": _H200}


def default_for(arch: ArchConfig, n: int, rows: int | None) -> Config:
    """The untuned Config of the copy serving m <= rows (None: unbounded) of an N-feature linear: the
    tile of by_rows, with the split rule's K slices (at least the entry's)."""
    by_n = next(e for r, e in arch.by_rows if (rows if rows is not None else 1 << 30) <= r)
    cfg = next(c for max_n, c in by_n if n <= max_n)
    if rows is None:
        return cfg
    if cfg.stream_k:  # one block per SM already
        return cfg
    blocks = -(-rows // cfg.tokens) * max(1, n // cfg.rows)
    return dataclasses.replace(cfg, split_k=max(cfg.split_k, min(arch.split_max, round(arch.sms / blocks))))


SPACE = {"tokens": (64, 128, 192, 256), "warpgroups": (1, 2), "m_tiles": (1, 2), "stages": (3, 4, 5),
         "split_k": (1, 2, 4), "x_rows": (16, 32, 64), "stream_k": (0, 1)}
MAX_SMEM = 227 * 1024


def takes(attrs: dict, arch: str | None, cfg: Config | None = None) -> bool:
    """Whether this kernel can serve the int4 spec on arch with cfg (default: the narrowest tile): sm_90
    (wgmma is sm_90a-only), fp16 x, whole 128-k pairs of ring stages inside whole groups, whole blocks of
    cfg.rows rows."""
    cfg = cfg or Config(warpgroups=1)  # the narrowest tile: any config the shape allows
    n, k, g = int(attrs["n"]), int(attrs["k"]), int(attrs["group_size"])
    return (arch == "sm_90" and str(attrs["x_dtype"]) == "float16" and k % (2 * BK) == 0
            and g % BK == 0 and n % cfg.rows == 0 and cfg.check() is None
            and cfg.smem_bytes() <= MAX_SMEM and k // (2 * BK) // cfg.split_k * 2 >= cfg.stages)


_COMMON = r"""
#ifndef NB_WGMMA_COMMON
#define NB_WGMMA_COMMON
__forceinline__ __device__ unsigned nbw_smem(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__forceinline__ __device__ void nbw_cp16(unsigned dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(dst), "l"(src), "r"(bytes) : "memory");
}
__forceinline__ __device__ void nbw_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __forceinline__ __device__ void nbw_wait() {
  asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}
__forceinline__ __device__ void nbw_lds128(unsigned a, unsigned* w) {
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "r"(a) : "memory");
}
// byte `sel` picks of w -> fp16 pair ((lo - z) * s, (hi - z) * s); add = -(1024 + z, 64 + z)
__forceinline__ __device__ unsigned nbw_dq(unsigned w, unsigned sel, half2 add, half2 s) {
  const half2 mul = __halves2half2(__float2half(1.f), __float2half(0.0625f));
  unsigned v = (__byte_perm(w, 0u, sel) & 0x00F0000Fu) | 0x64006400u;
  half2 h = __hmul2(__hfma2(*reinterpret_cast<half2*>(&v), mul, add), s);
  return *reinterpret_cast<unsigned*>(&h);
}
__forceinline__ __device__ unsigned nbw_pack(float lo, float hi) {
  half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
// TMA: one thread arms a stage's mbarrier with its byte count and issues the stage's tensor copies; every
// thread waits for the barrier's phase
__forceinline__ __device__ void nbw_bar_init(unsigned bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar) : "memory");
}
__forceinline__ __device__ void nbw_expect(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__forceinline__ __device__ void nbw_bar_wait(unsigned bar, unsigned parity) {
  unsigned done;
  do {
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
}
__forceinline__ __device__ void nbw_tma2d(unsigned dst, unsigned long long map, int c0, int c1, unsigned bar) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
               :: "r"(dst), "l"(map), "r"(c0), "r"(c1), "r"(bar) : "memory");
}
__forceinline__ __device__ unsigned long long nbw_desc(unsigned addr) {
  // K-major, 128 B swizzle (layout type 1 in bits 62-63), stride 1 KiB between 8-row groups
  return (1ull << 62) | (64ull << 32) | (1ull << 16) | (unsigned long long)((addr >> 4) & 0x3FFF);
}
#endif
"""

_BODY = Template(r"""
__forceinline__ __device__ void $NAME(const half* __restrict__ x, const unsigned* __restrict__ qw,
    const half* __restrict__ sc, const half* __restrict__ zr, const half* __restrict__ bias,
    half* __restrict__ y, void* ws_, void* sk_, unsigned char* smem, long long m, int bx, int by,
    int bz, int tid, unsigned long long xmap, unsigned long long xsmap, unsigned long long wmap) {
  constexpr int K = $K, N = $N, G = $G, NG = K / G, KW = K / 8, BT = $BT, WG = $WG, MT = $MT, SPLIT = $SPLIT;
  constexpr int SKP = $SKP;  // stream-K: the grid's blocks (0: one tile, or K slice, per block)
  int* sk = reinterpret_cast<int*>(sk_);  // stream-K: the start counter, then a flag per block
  constexpr bool TMA = $TMA;  // x and W staged by TMA (the tensor maps' addresses: x in boxes of BT / XR rows,
  constexpr int XR = $XR;    // W), else by cp.async
  constexpr int S = $S, BN = 64 * WG * MT, THREADS = 128 * WG, XST = BT * 128, STAGE = XST + BN * 32;
  constexpr int PAIRS = K / 128, YST = $YST, CH = $CH;  // 128-k pairs of blocks; the out tile's bytes /
  // 16 B chunks per token row
  const unsigned base = (nbw_smem(smem) + 1023u) & ~1023u;  // 1 KiB-aligned swizzle atoms
  const int warp = tid / 32, lane = tid % 32, r = lane / 4, t = lane % 4;
  // this lane's rows in the block, per m-tile mt: lrow + 64 mt and lrow + 64 mt + 8
  const int wrow = warp / 4 * (64 * MT) + warp % 4 * 16, lrow = wrow + r;
  const unsigned bars = base + S * STAGE;  // TMA: one mbarrier per ring stage, after the ring
  if (TMA) {
    if (tid == 0) {
      #pragma unroll
      for (int s = 0; s < S; ++s) nbw_bar_init(bars + 8 * s);
      asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
      asm volatile("prefetch.tensormap [%0];" :: "l"(xmap) : "memory");
      asm volatile("prefetch.tensormap [%0];" :: "l"(xsmap) : "memory");
      asm volatile("prefetch.tensormap [%0];" :: "l"(wmap) : "memory");
    }
    __syncthreads();
  }
  // Stream-K (SKP blocks): the units (token tile x row block = tile, 128-k pair) in tile-major order are
  // cut into SKP equal ranges, one per block in the order the blocks start (a counter, so that a block
  // only ever waits for blocks already running: no deadlock however many fit on the GPU). A block walks
  // its range from the end, a tile's piece at a time (each through its own pipeline fill and epilogue:
  // streaming the next piece's first blocks through the ring during this one's last, with the epilogue's
  // tile in shared memory of its own, ran 1.08-1.15x slower; h200_wgmma_stream_k.md). The piece holding a
  // tile's last pair finishes the tile: it adds the fp32 partials of the blocks before it, which wrote
  // them (their range's last piece) first thing, and stores y; a piece short of the tile's end writes its
  // partial to ws[block] and raises its flag.
  long long ulo = 0, u = 0, units = 0;
  int vid = 0;
  if (SKP) {
    __shared__ int vid_s;
    if (tid == 0) vid_s = atomicAdd(sk, 1);
    __syncthreads();
    vid = vid_s;
    units = (m + BT - 1) / BT * (N / BN) * PAIRS;
    ulo = vid * units / SKP;
    u = (vid + 1) * units / SKP;
    if (u == ulo) return;
  }
  int ib = 0;  // ring index of the piece's first 64-k block: ring slots and mbarrier phases run on
  do {
    long long tile = 0;
    int pbeg, pend;  // this piece's K slice: pairs [pbeg, pend) = 64-k blocks [kbeg, kend)
    if (SKP) {  // the piece ending at unit u
      tile = (u - 1) / PAIRS;
      pbeg = (int)(max(ulo, tile * PAIRS) - tile * PAIRS);
      pend = (int)(u - tile * PAIRS);
      bx = (int)(tile % (N / BN));
      by = (int)(tile / (N / BN));
    } else {  // slices differ by at most one pair; constants without a split: a known trip count and parity
      // keep the step's branches static
      pbeg = SPLIT == 1 ? 0 : bz * PAIRS / SPLIT;
      pend = SPLIT == 1 ? PAIRS : (bz + 1) * PAIRS / SPLIT;
    }
    const int kbeg = 2 * pbeg, kend = 2 * pend;
    const long long row0 = (long long)bx * BN + lrow;
    const long long tok0 = (long long)by * BT;
    // block kb goes to ring index i = ib + kb - kbeg: slot i % S; with TMA its barrier completes phase i / S
    auto load = [&](int i) {  // the copies of ring index i, if this piece has it
      const int kb = kbeg + i - ib;
      if (kb >= kend) return;
      const unsigned st = base + (i % S) * STAGE;
      if (TMA) {
        // x: 64 k of the tile's token rows, landing in the 128 B-swizzled layout above, in one box of BT rows
        // where at least 3/4 of them are < m, else in boxes of XR rows up to m (each box's rows past m read as
        // zeros: TMA fills them slowly, and each issue delays this thread's warp, which also computes;
        // h200_wgmma_tma.md); W: BN rows x 32 B in boxes of at most 256 rows
        if (tid == 0) {
          const unsigned bar = bars + 8 * (i % S);
          const int v = (int)min((long long)BT, m - tok0), small = 4 * v < 3 * BT ? (v + XR - 1) / XR : 0;
          asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the slot's generic reads before
          nbw_expect(bar, (small ? small * XR : BT) * 128 + BN * 32);
          if (!small) nbw_tma2d(st, xmap, kb * 64, (int)tok0, bar);
          for (int j = 0; j < small; ++j) nbw_tma2d(st + j * XR * 128, xsmap, kb * 64, (int)tok0 + j * XR, bar);
          #pragma unroll
          for (int j = 0; j < (BN + 255) / 256; ++j) nbw_tma2d(st + XST + j * 8192, wmap, kb * 8, bx * BN + j * 256, bar);
        }
        return;
      }
      #pragma unroll
      for (int i = 0; i < (BT * 8 + THREADS - 1) / THREADS; ++i) {
        const int c = tid + i * THREADS, n = c / 8, ch = c % 8;
        if ((BT * 8) % THREADS == 0 || c < BT * 8) {
          const bool ok = tok0 + n < m;
          nbw_cp16(st + n * 128 + ((ch ^ (n & 7)) << 4), x + (ok ? tok0 + n : 0) * K + kb * 64 + ch * 8,
                   ok ? 16 : 0);
        }
      }
      #pragma unroll
      for (int i = 0; i < MT; ++i) {  // BN rows x 2 chunks = MT per thread
        const int c = tid + i * THREADS, wr = c / 2, wc = c % 2;
        nbw_cp16(st + XST + wr * 32 + wc * 16, qw + ((long long)bx * BN + wr) * KW + kb * 8 + wc * 4, 16);
      }
    };
    float acc[MT * BT / 2];
    #pragma unroll
    for (int i = 0; i < MT * BT / 2; ++i) acc[i] = 0.f;
    unsigned a[2][MT * 16];
    const unsigned sel = t | 0x40u | (t << 8) | 0x4000u;  // bytes [b_t, 0, b_t, 0]
    #pragma unroll
    for (int i = 0; i < S - 2; ++i) {
      load(ib + i);
      if (!TMA) nbw_commit();
    }
    half2 s0[MT], s8[MT], z0[MT], z8[MT];
    half q0[MT], q8[MT], e0[MT], e8[MT];  // the group's raw scales / zeros, loaded before the barrier
    auto step = [&](int kb, unsigned* ab) {
      // a slice starts at a group boundary unless groups span more than one pair
      const bool new_group = kb % (G / 64) == 0 || (G > 128 && kb == kbeg);
      if (new_group) {
        const int gi = kb * 64 / G;
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const long long ra = row0 + 64 * mt, rb = ra + 8;
          q0[mt] = sc[ra * NG + gi];
          q8[mt] = sc[rb * NG + gi];
          e0[mt] = $Z0;
          e8[mt] = $Z8;
        }
      }
      if (TMA) {
        nbw_bar_wait(bars + 8 * ((ib + kb - kbeg) % S), ((ib + kb - kbeg) / S) & 1);
      } else {
        nbw_wait<S - 3>();
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // wgmma reads what cp.async wrote
      }
      __syncthreads();
      load(ib + kb - kbeg + S - 2);
      if (!TMA) nbw_commit();
      const unsigned st = base + ((ib + kb - kbeg) % S) * STAGE;
      unsigned w0[MT][8], w8[MT][8];  // this lane's two rows' 8 words per m-tile
      #pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const unsigned wa = st + XST + (lrow + 64 * mt) * 32;
        nbw_lds128(wa, w0[mt]);
        nbw_lds128(wa + 16, w0[mt] + 4);
        nbw_lds128(wa + 8 * 32, w8[mt]);
        nbw_lds128(wa + 8 * 32 + 16, w8[mt] + 4);
        if (new_group) {  // -(1024 + z, 64 + z): see nbw_dq
          s0[mt] = __half2half2(q0[mt]);
          s8[mt] = __half2half2(q8[mt]);
          z0[mt] = __halves2half2(__hneg(__hadd(e0[mt], __float2half(1024.f))), __hneg(__hadd(e0[mt], __float2half(64.f))));
          z8[mt] = __halves2half2(__hneg(__hadd(e8[mt], __float2half(1024.f))), __hneg(__hadd(e8[mt], __float2half(64.f))));
        }
      }
      auto decode = [&](int s) {  // the A fragments of k16 step s
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          ab[mt * 16 + 4 * s + 0] = nbw_dq(w0[mt][2 * s], sel, z0[mt], s0[mt]);
          ab[mt * 16 + 4 * s + 1] = nbw_dq(w8[mt][2 * s], sel, z8[mt], s8[mt]);
          ab[mt * 16 + 4 * s + 2] = nbw_dq(w0[mt][2 * s + 1], sel, z0[mt], s0[mt]);
          ab[mt * 16 + 4 * s + 3] = nbw_dq(w8[mt][2 * s + 1], sel, z8[mt], s8[mt]);
        }
      };
      // All four steps decoded before the first wgmma: decoding each step right before its wgmma (one
      // wgmma.fence per step) ran 1.1x slower on the H200 (h200_wgmma_ablation.md).
      #pragma unroll
      for (int s = 0; s < 4; ++s) decode(s);
      asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
      #pragma unroll
      for (int s = 0; s < 4; ++s) {
        const unsigned long long desc = nbw_desc(st + 32 * s);
        #pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          asm volatile($WGMMA);
        }
      }
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
    };
    for (int p = pbeg; p < pend; ++p) {  // two register buffers: constant indices keep them registers
      step(2 * p, a[0]);
      step(2 * p + 1, a[1]);
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    #pragma unroll
    for (int i = 0; i < MT * BT / 2; ++i) asm volatile("" : "+f"(acc[i]) :: "memory");
    ib += kend - kbeg;
    if (SKP) {
      float4* part = reinterpret_cast<float4*>(ws_);  // a block's partial: its accumulators, in register order
      constexpr int PART = $PART / 4;  // float4s of a block's partial (Config.partial floats)
      const long long t0 = tile * PAIRS;
      u = t0 + pbeg;
      if (pend < PAIRS) {  // short of the tile's end: the partial for the block that finishes the tile
        #pragma unroll
        for (int i = 0; i < MT * BT / 8; ++i)
          __stcg(part + (long long)vid * PART + i * THREADS + tid,
                 make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]));
        __threadfence();
        __syncthreads();
        if (tid == 0) asm volatile("st.release.gpu.global.u32 [%0], 1;" :: "l"(sk + 1 + vid) : "memory");
        continue;
      }
      for (int q = vid - 1; pbeg > 0 && q >= 0; --q) {  // the blocks before this one holding pairs of the tile
        const long long aq = q * units / SKP;
        if (aq < (q + 1) * units / SKP) {  // (one with no pairs raised no flag)
          if (tid == 0) {
            unsigned f = 0;
            while (!f) asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(f) : "l"(sk + 1 + q) : "memory");
          }
          __syncthreads();
          #pragma unroll
          for (int i = 0; i < MT * BT / 8; ++i) {
            const float4 v = __ldcg(part + (long long)q * PART + i * THREADS + tid);
            acc[4 * i] += v.x; acc[4 * i + 1] += v.y; acc[4 * i + 2] += v.z; acc[4 * i + 3] += v.w;
          }
        }
        if (aq <= t0) break;
      }
    }
    // Epilogue through shared memory (the ring, now free): the accumulators hold 2 tokens of one W row per
    // register pair, so stored straight they would be scattered 2 B writes; staged as a [token][row] tile
    // they leave as whole 16 B rows of y (or of the split's fp32 partials).
    nbw_wait<0>();
    __syncthreads();
    // the epilogue's thread index from behind an empty asm: otherwise nvcc hoists its addresses above the
    // main loop and holds them there (+28 registers at 128 tokens x 1 warpgroup: 3 -> 2 blocks per SM)
    int etid = tid;
    asm volatile("" : "+r"(etid));
    const int elane = etid % 32, erow = etid / 128 * (64 * MT) + etid / 32 % 4 * 16;  // = lane, wrow
    #pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const float* c = acc + mt * (BT / 2);
$STAGE_OUT
    }
    __syncthreads();
$STORE_OUT
    if (SKP) __syncthreads();  // the tile read out of the ring before the next piece's copies land there
  } while (SKP && u > ulo);
}
""")

# fp16 out: + bias, round, and stmatrix.trans: 8 x 8 matrix j = lane / 8 of the x4 is token block i + j / 2,
# rows + 8 (j % 2); lane's address is its token row (lane % 8) of that matrix; each row stores 8 W rows.
_STAGE_Y = r"""
    const long long ra = row0 + 64 * mt, rb = ra + 8;
    const float b0 = $B0, b8 = $B8;
    const int j = elane / 8;
    const unsigned dst = base + (elane % 8 + 8 * (j / 2)) * YST + (erow + 64 * mt + 8 * (j % 2)) * 2;
    #pragma unroll
    for (int i = 0; i < BT / 8; i += 2) {
      asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};"
                   :: "r"(dst + 8 * i * YST), "r"(nbw_pack(c[4 * i] + b0, c[4 * i + 1] + b0)),
                   "r"(nbw_pack(c[4 * i + 2] + b8, c[4 * i + 3] + b8)),
                   "r"(nbw_pack(c[4 * i + 4] + b0, c[4 * i + 5] + b0)),
                   "r"(nbw_pack(c[4 * i + 6] + b8, c[4 * i + 7] + b8)) : "memory");
    }
"""
# split: the slice's fp32 partial (no bias: the reduction adds it), one 4 B store per accumulator (banks
# 8 t + r: a row of the tile is BN + 4 words), then float4 rows of ws[m, SPLIT, N]
_STAGE_WS = r"""
    #pragma unroll
    for (int i = 0; i < BT / 8; ++i) {
      #pragma unroll
      for (int e = 0; e < 2; ++e) {
        const unsigned at = base + (8 * i + elane % 4 * 2 + e) * YST + (erow + elane / 4 + 64 * mt) * 4;
        asm volatile("st.shared.f32 [%0], %1;" :: "r"(at), "f"(c[4 * i + e]) : "memory");
        asm volatile("st.shared.f32 [%0], %1;" :: "r"(at + 32), "f"(c[4 * i + 2 + e]) : "memory");
      }
    }
"""
# the tile's 16 B chunks (CH per token row) to $DST, tokens < m only
_STORE = r"""
  #pragma unroll
  for (int i = 0; i < BT * CH / THREADS; ++i) {
    const int c = etid + i * THREADS, n = c / CH, ch = c % CH;
    if (tok0 + n < m) {
      unsigned v[4];
      nbw_lds128(base + n * YST + ch * 16, v);
      *reinterpret_cast<uint4*>($DST) = make_uint4(v[0], v[1], v[2], v[3]);
    }
  }
"""


def _wgmma_asm(bt: int) -> str:
    """The asm statement (string and operands) of one m64n{bt}k16 wgmma on m-tile mt: acc += A(regs) x
    B(desc)."""
    nd = bt // 2
    regs = ", ".join(f"%{i}" for i in range(nd))
    text = (f'"wgmma.mma_async.sync.aligned.m64n{bt}k16.f32.f16.f16 {{{regs}}}, '
            f'{{%{nd}, %{nd + 1}, %{nd + 2}, %{nd + 3}}}, %{nd + 4}, 1, 1, 1, 0;"')
    outs = ", ".join(f'"+f"(acc[mt * {nd} + {i}])' for i in range(nd))
    ins = ", ".join(f'"r"(ab[mt * 16 + 4 * s + {j}])' for j in range(4)) + ', "l"(desc)'
    return f'{text}\n      : {outs}\n      : {ins} : "memory"'


def kernel_source(attrs: dict, cfg: Config, sms: int = 132) -> tuple[str, str]:
    """(helper name, CUDA source) of the kernel body for one int4 spec and config (sms: the GPU's SMs, for
    stream-K's grid)."""
    n, k, g = int(attrs["n"]), int(attrs["k"]), int(attrs["group_size"])
    sym, bias = bool(attrs["symmetric"]), bool(attrs["has_bias"])
    name = f"nb_wgmma_n{n}_k{k}_g{g}_{cfg.label()}{'' if sym else '_z'}{'_b' if bias else ''}"
    zero = "__float2half(8.f)" if sym else None
    split = cfg.split_k > 1
    stage = Template(_STAGE_WS if split else _STAGE_Y).substitute(
        B0="__half2float(bias[ra])" if bias else "0.f", B8="__half2float(bias[rb])" if bias else "0.f")
    body = _BODY.substitute(
        NAME=name, K=k, N=n, G=g, SKP=sms * cfg.stream_k, PART=cfg.partial, TMA=int(cfg.tma), XR=cfg.x_box, BT=cfg.tokens, WG=cfg.warpgroups, MT=cfg.m_tiles, S=cfg.stages,
        SPLIT=cfg.split_k, YST=_tile_row_bytes(cfg), WGMMA=_wgmma_asm(cfg.tokens),
        Z0=zero or "zr[ra * NG + gi]", Z8=zero or "zr[rb * NG + gi]",
        CH=cfg.rows * (4 if split else 2) // 16, STAGE_OUT=stage.strip("\n"),
        STORE_OUT=Template(_STORE).substitute(DST=(
            "reinterpret_cast<float*>(ws_) + ((tok0 + n) * SPLIT + bz) * N + (long long)bx * BN + ch * 4" if split
            else "y + (tok0 + n) * N + (long long)bx * BN + ch * 8")).strip("\n"))
    return name, _COMMON + body


_KERNEL = Template('''
$SIGNATURE
$WS
$MAPS
    for bz in T.thread_binding($SPLIT, thread="blockIdx.z"):
        for by in T.thread_binding($GRID_Y, thread="blockIdx.y"):
            for bx in T.thread_binding($NBLK, thread="blockIdx.x"):
                for tx in T.thread_binding($THREADS, thread="threadIdx.x"):
                    smem = T.alloc_buffer(($SMEM,), "uint8", scope="shared.dyn")
                    T.evaluate(T.cuda.func_call(
                        "$NAME", x.access_ptr("r"), qweight.access_ptr("r"), scales.access_ptr("r"),
                        $ZPTR, $BPTR, y.access_ptr("w"), $WSPTR, $SKPTR, smem.access_ptr("rw"), m, bx, by, bz, tx,
                        $MAPARGS, source_code=$SRC))
$REDUCE
''')

# TMA's tensor maps, encoded on the host at each call (the driver's cuTensorMapEncodeTiled): x [m, K] fp16 in
# boxes of 64 k x BT (xmap) or x_box (xsmap) tokens with the 128 B swizzle (out-of-range token rows read as
# zeros), the packed W
# [N, K/8] words in boxes of 8 words x up to 256 rows; both passed to the kernel as __grid_constant__
_MAPS = Template('''
xmap = T.Var("xmap", ty=T.handle("tensormap").ty)
T.Bind(T.tvm_stack_alloca("tensormap", 1), var=xmap)
T.tensormap_encode_tiled(xmap, x.data, T.int64($K), m, T.int64($K2), 64, $BT, 1, 1,
                         descriptor_dtype="float16", rank=2, swizzle=3, l2_promotion=2)
xsmap = T.Var("xsmap", ty=T.handle("tensormap").ty)
T.Bind(T.tvm_stack_alloca("tensormap", 1), var=xsmap)
T.tensormap_encode_tiled(xsmap, x.data, T.int64($K), m, T.int64($K2), 64, $XR, 1, 1,
                         descriptor_dtype="float16", rank=2, swizzle=3, l2_promotion=2)
wmap = T.Var("wmap", ty=T.handle("tensormap").ty)
T.Bind(T.tvm_stack_alloca("tensormap", 1), var=wmap)
T.tensormap_encode_tiled(wmap, qweight.data, T.int64($KW), T.int64($N), T.int64($KW4), 8, $WBOX, 1, 1,
                         descriptor_dtype="uint32", rank=2, l2_promotion=2)
''')


# stream-K's workspace: each block's fp32 partial (Config.partial floats), and the start counter and
# the blocks' flags, zeroed by a one-block kernel before the GEMM (TVM's workspace pool does not clear them)
_STREAM_K = Template('''
ws = T.alloc_buffer(($P * $PART,), "float32", scope="global")
sk = T.alloc_buffer(($P1,), "int32", scope="global")
for zb in T.thread_binding(1, thread="blockIdx.x"):
    for zt in T.thread_binding($P1, thread="threadIdx.x"):
        sk[zt] = 0
''')


def gemm_wgmma_func(attrs: dict, cfg: Config, arch: str = "sm_90"):
    """The wgmma GEMM PrimFunc for one int4 spec, or None where it does not take it."""
    if not takes(attrs, arch, cfg):
        return None
    n, k, g = int(attrs["n"]), int(attrs["k"]), int(attrs["group_size"])
    sym, bias = bool(attrs["symmetric"]), bool(attrs["has_bias"])
    sms = DEFAULTS.get(arch, _H200).sms
    name, src = kernel_source(attrs, cfg, sms)
    null = 'scales.access_ptr("r")'  # stands in for absent zeros / bias (never read)
    ws, reduce = split_k_reduce(n, cfg.split_k, bias) if cfg.split_k > 1 else ("", "")
    if cfg.stream_k:
        ws = _STREAM_K.substitute(P=sms * cfg.stream_k, P1=sms * cfg.stream_k + 1, PART=cfg.partial)
    maps = _MAPS.substitute(K=k, K2=2 * k, KW=k // 8, KW4=k // 2, N=n, BT=cfg.tokens, XR=cfg.x_box, WBOX=min(cfg.rows, 256))
    text = _KERNEL.substitute(
        MAPS=indent(maps.strip("\n"), 4) if cfg.tma else "",
        MAPARGS=("T.address_of(xmap), T.address_of(xsmap), T.address_of(wmap)" if cfg.tma
                 else "T.uint64(0), T.uint64(0), T.uint64(0)"),
        SIGNATURE=signature("gemm_wgmma", attrs), BT=cfg.tokens, SPLIT=cfg.split_k,
        NBLK=sms * cfg.stream_k if cfg.stream_k else n // cfg.rows,
        GRID_Y="1" if cfg.stream_k else f"(m + T.int64({cfg.tokens - 1})) // T.int64({cfg.tokens})",
        SKPTR='sk.access_ptr("rw")' if cfg.stream_k else null,
        THREADS=128 * cfg.warpgroups, SMEM=cfg.smem_bytes(), NAME=name, SRC=repr(src),
        ZPTR=null if sym else 'zeros.access_ptr("r")', BPTR='bias.access_ptr("r")' if bias else null,
        WS=indent(ws, 4), WSPTR='ws.access_ptr("w")' if ws else 'y.access_ptr("w")', REDUCE=indent(reduce, 4))
    import tvm
    from tvm.script import tirx as T  # noqa: F401  (the template's T)

    return tvm.script.from_source(text)


class GEMMWGMMA(TemplateRule):
    """dlight-style rule: the "wgmma"-tagged copies of our int4 kernel -> the Hopper GEMM above."""

    kind = "wgmma"

    def __init__(self, config: Config | None = None):
        self.config = config  # replaces the per-arch default (benchmarks, tests)

    def build(self, func, attrs, target):
        from compiler.tuning import config_from

        arch = str(target.attrs.get("arch", "")) or None
        cfg = config_from(func, Config, self.config or default_config(target, func))  # a tuned record wins
        return gemm_wgmma_func(attrs[ATTR], cfg, arch)


def rule():
    return GEMMWGMMA()


def default_config(target, func=None) -> Config:
    """The untuned config of a copy on a target (what tuning measures first and must beat)."""
    arch = DEFAULTS.get(str(target.attrs.get("arch", "")) if target is not None else "", _H200)
    if func is None or func.attrs is None or ATTR not in func.attrs:
        return _BIG
    rows = int(func.attrs[ROWS_ATTR]) if ROWS_ATTR in func.attrs else None
    cfg = default_for(arch, int(func.attrs[ATTR]["n"]), rows)
    # where the shape refuses it: unsplit, then one warpgroup (64-row blocks divide any N takes allows)
    tries = (cfg, dataclasses.replace(cfg, split_k=1), Config(tokens=cfg.tokens, warpgroups=1, stages=cfg.stages))
    return next((c for c in tries if takes(func.attrs[ATTR], "sm_90", c)), tries[-1])
