"""How fast can the decode GEMV's weights be read? Load-only kernels over the same bytes, beside the real GEMV.

    python benchmarks/gemv_read_patterns.py [--out DIR] [--no-patterns]
    python benchmarks/gemv_read_patterns.py --profile 4096x12288[:ABLATION]    # under ncu: 5 untimed launches

The tensor-core GEMV (schedules/gemv_mma.py) reads an int4 linear at 1.7-2.7 TB/s (h200_nibble_bench.md),
well below the H200's ~4 TB/s, and neither loads in flight, L1 traffic nor the scale loads explained it
(h200_gemv_loads.md). Here every kernel reads the weight bytes a GEMV block reads (16 rows x K/2 bytes,
one block per 16 rows) and XORs them, with no decode and no math, so only the read pattern differs:
  gemv      the GEMV's own pattern: lane (r, t) loads 16 B of rows r and r + 8 at k = 128 c + 32 t,
            chunk c to warp c % W, U chunks per pipeline step, double-buffered, same qualifiers
            (ld.global.nc.L1::no_allocate.L2::256B); W and U as the GEMV's M = 1 defaults
  linear    the same loads per lane, but each warp load reads 512 contiguous bytes of the block's region
  bulk      TMA bulk copies (cp.async.bulk, one per stage) of the block's contiguous region into a
            ring of S shared-memory stages with mbarriers, then read from shared memory
  bulkrow   the same, one bulk copy per row and stage (a stage = 16 rows x sb/16 bytes: what an mma
            GEMV needs, the 16 rows of one tile at the same k)
  stream    a grid-stride read of the whole tensor (4 blocks of 256 threads per SM): the read ceiling
and, in the same run, nibble's GEMV itself (mma8 default config, M = 1), that GEMV with one part of its
work removed at a time (ABLATIONS: edits of its generated CUDA; results wrong on purpose, only the time
means something) and a device copy of the same bytes (read + write counted, as bench_linear.py's
`copy`). Each load-only kernel is first checked: the XOR of what each block read equals the XOR of its
16 rows. Weights rotate past the L2; CUDA-graph medians.
The CUDA source is compiled with nvcc at run time and launched through the driver API (ctypes).
Writes gemv_read_patterns.json / .md to --out. Results and what they mean: results/h200_gemv_read_patterns.md.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]  # Llama-2-7B (K, N)
_MMA = re.compile(r"(nb_mma_16816\(float\* c, [^{]*\{).*?\n\}", re.S)
_DQ = re.compile(r"(void nb_mma_dq\([^{]*\{).*?\n\}", re.S)
_CHUNK = re.compile(r"(void nb_mma_chunk\([^{]*\{).*?\n\}", re.S)
ABLATIONS = {
    # mma.sync -> one FADD of its operands (decode and x loads stay)
    "no_mma": lambda s: _MMA.sub(r"\1\n  c[0] += __uint_as_float(a0 ^ a1 ^ a2 ^ a3 ^ b0 ^ b1);\n}", s),
    # x from registers instead of global / L1
    "no_x": lambda s: s.replace("const uint4 xv = *reinterpret_cast<const uint4*>((j ? x1 : x0) + 8 * u);",
                                "const uint4 xv = make_uint4(a[0], a[1], b[2], b[3]);"),
    # the group scales: a constant instead of a 2-byte global load per row and chunk
    "no_scales": lambda s: re.sub(r"sc_ptr\[(\d+)\] = scales_ptr\[[^;]*\];", r"sc_ptr[\1] = __float2half_rn(1.f);", s),
    # the decode's four fp16 ops per word (HSUB2 / HFMA2 of the magic-number trick): the bias-1024 pairs as is
    "no_sub": lambda s: _DQ.sub(r"\1\n  const unsigned w2 = w >> 8;\n  a[0] = (w & 0x000F000Fu) | 0x64006400u;\n"
                                r"  a[1] = (w & 0x00F000F0u) | 0x64006400u;\n  a[2] = (w2 & 0x000F000Fu) | 0x64006400u;\n"
                                r"  a[3] = (w2 & 0x00F000F0u) | 0x64006400u;\n}", s),
    # the whole decode: the word itself in all four registers
    "no_dq": lambda s: _DQ.sub(r"\1\n  a[0] = w; a[1] = w; a[2] = w; a[3] = w;\n}", s),
    # the byte permutes that pair x's halves in the order of the weight pairs
    "no_perm": lambda s: s.replace("__byte_perm(xv.x, xv.z, 0x5410), __byte_perm(xv.x, xv.z, 0x7632)", "xv.x, xv.z")
                          .replace("__byte_perm(xv.y, xv.w, 0x5410), __byte_perm(xv.y, xv.w, 0x7632)", "xv.y, xv.w"),
    # the chunk's whole math -> an XOR of its 8 words (what is left: loads, scales, the reduction)
    "loads_only": lambda s: _CHUNK.sub(r"\1\n  acc[0] += __uint_as_float(w0[0] ^ w0[1] ^ w0[2] ^ w0[3] ^ w8[0] ^ w8[1] ^ "
                                       r"w8[2] ^ w8[3]) * __half2float(s0);\n}", s),
    # not a removal: the two mmas of a word accumulate into separate fragments (a chain of 4, not 8)
    "two_chains": lambda s: s.replace("float t[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};",
                                      "float t[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, t2[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};")
                              .replace("nb_mma_16816(t + 4 * j, a[2], b[2]", "nb_mma_16816(t2 + 4 * j, a[2], b[2]")
                              .replace("const float f0 = __half2float(s0)",
                                       "for (int i = 0; i < 8; ++i) t[i] += t2[i];\n  const float f0 = __half2float(s0)"),
}

SRC = r"""
#include <cstdint>
#include <cuda_fp16.h>
#define DEV __device__ __forceinline__

DEV uint4 ldw(const uint32_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
DEV uint32_t x4(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// PAT 0: the GEMV's pattern; PAT 1: 512 contiguous bytes per warp load. Chunk c = 16 rows x 64 B.
template <int U, int PAT>
DEV void load(uint4 (&b)[U][2], const uint32_t* base, int kw, int it, int W, int warp, int C, int lane) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int c = (it * U + u) * W + warp;
    if (c < C) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (PAT == 0) b[u][h] = ldw(base + (size_t)(lane / 4 + 8 * h) * kw + c * 16 + (lane % 4) * 4);
        else b[u][h] = ldw(base + (size_t)c * 256 + h * 128 + lane * 4);
      }
    }
  }
}
template <int U>
DEV uint32_t consume(const uint4 (&b)[U][2], int it, int W, int warp, int C) {
  uint32_t a = 0;
#pragma unroll
  for (int u = 0; u < U; ++u)
    if ((it * U + u) * W + warp < C) a ^= x4(b[u][0]) ^ x4(b[u][1]);
  return a;
}
template <int U, int PAT>
DEV void read_tile(const uint32_t* q, int kw, uint32_t* out) {
  const int W = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int C = kw / 16;  // 128-k chunks per row
  const uint32_t* base = q + (size_t)blockIdx.x * 16 * kw;
  const int iters = (C + U * W - 1) / (U * W);
  uint4 a[U][2], b[U][2];
  uint32_t acc = 0;
  load<U, PAT>(a, base, kw, 0, W, warp, C, lane);
  for (int it = 0; it < iters; it += 2) {
    if (it + 1 < iters) load<U, PAT>(b, base, kw, it + 1, W, warp, C, lane);
    acc ^= consume<U>(a, it, W, warp, C);
    if (it + 1 >= iters) break;
    if (it + 2 < iters) load<U, PAT>(a, base, kw, it + 2, W, warp, C, lane);
    acc ^= consume<U>(b, it + 1, W, warp, C);
  }
  out[(size_t)blockIdx.x * blockDim.x + threadIdx.x] = acc;
}
extern "C" __global__ void gemv_u2(const uint32_t* q, int kw, uint32_t* out) { read_tile<2, 0>(q, kw, out); }
extern "C" __global__ void gemv_u4(const uint32_t* q, int kw, uint32_t* out) { read_tile<4, 0>(q, kw, out); }
extern "C" __global__ void linear_u2(const uint32_t* q, int kw, uint32_t* out) { read_tile<2, 1>(q, kw, out); }
extern "C" __global__ void linear_u4(const uint32_t* q, int kw, uint32_t* out) { read_tile<4, 1>(q, kw, out); }

DEV uint32_t smem(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
DEV void expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem(bar)), "r"(bytes) : "memory");
}
DEV void bulk(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(smem(dst)), "l"(src), "r"(bytes), "r"(smem(bar)) : "memory");
}
DEV void wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done)
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(smem(bar)), "r"(parity) : "memory");
}
// A ring of S stages of sb bytes. ROW 0: stage i = bytes [i sb, (i+1) sb) of the block's 16-row region,
// one bulk copy. ROW 1: stage i = bytes [i sb/16, (i+1) sb/16) of each of the 16 rows, 16 bulk copies.
template <int S, int ROW>
DEV void bulk_tile(const uint32_t* q, int kw, int sb, uint32_t* out) {
  extern __shared__ __align__(128) uint8_t sm[];
  __shared__ __align__(8) uint64_t bar[S];
  const int tid = threadIdx.x, lane = tid % 32;
  const int rowb = kw * 4, total = 16 * rowb, sbr = sb / 16;
  const char* base = reinterpret_cast<const char*>(q + (size_t)blockIdx.x * 16 * kw);
  const int nst = ROW ? (rowb + sbr - 1) / sbr : (total + sb - 1) / sb;
  if (tid == 0) {
    for (int s = 0; s < S; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem(bar + s)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  auto issue = [&](int i) {  // warp 0
    const int slot = i % S;
    if (ROW) {
      const int off = i * sbr, bytes = min(sbr, rowb - off);
      if (lane == 0) expect_tx(bar + slot, 16 * bytes);
      __syncwarp();
      if (lane < 16) bulk(sm + slot * sb + lane * sbr, base + (size_t)lane * rowb + off, bytes, bar + slot);
    } else if (lane == 0) {
      const int off = i * sb, bytes = min(sb, total - off);
      expect_tx(bar + slot, bytes);
      bulk(sm + slot * sb, base + off, bytes, bar + slot);
    }
  };
  if (tid < 32)
    for (int i = 0; i < S && i < nst; ++i) issue(i);
  uint32_t acc = 0;
  for (int i = 0; i < nst; ++i) {
    const int slot = i % S;
    wait(bar + slot, (i / S) & 1);
    const uint4* p = reinterpret_cast<const uint4*>(sm + slot * sb);
    if (ROW) {
      const int valid = min(sbr, rowb - i * sbr) / 16, per = sbr / 16;
      for (int j = tid; j < 16 * per; j += blockDim.x)
        if (j % per < valid) acc ^= x4(p[j]);
    } else {
      const int valid = min(sb, total - i * sb) / 16;
      for (int j = tid; j < valid; j += blockDim.x) acc ^= x4(p[j]);
    }
    __syncthreads();
    if (tid < 32 && i + S < nst) issue(i + S);
  }
  out[(size_t)blockIdx.x * blockDim.x + tid] = acc;
}
extern "C" __global__ void bulk_s2(const uint32_t* q, int kw, int sb, uint32_t* out) { bulk_tile<2, 0>(q, kw, sb, out); }
extern "C" __global__ void bulk_s4(const uint32_t* q, int kw, int sb, uint32_t* out) { bulk_tile<4, 0>(q, kw, sb, out); }
extern "C" __global__ void bulk_s8(const uint32_t* q, int kw, int sb, uint32_t* out) { bulk_tile<8, 0>(q, kw, sb, out); }
extern "C" __global__ void bulkrow_s4(const uint32_t* q, int kw, int sb, uint32_t* out) { bulk_tile<4, 1>(q, kw, sb, out); }
extern "C" __global__ void bulkrow_s8(const uint32_t* q, int kw, int sb, uint32_t* out) { bulk_tile<8, 1>(q, kw, sb, out); }

// Warp-specialized GEMV prototype (M = 1, symmetric, group 128): one producer warp streams the block's 16
// rows through a ring of S stages (CS chunks of 128 k each: [16 rows][CS * 64 B + 64 B pad] weights, then
// [16][CS] scales) with cp.async, tracked by mbarriers (full: the producer's 32 lanes arrive when their
// copies land; empty: each of the NC consumer warps arrives when done with a stage); the NC consumer
// warps run gemv_mma's chunk math (nb_mma_chunk) on the stages and reduce through shared memory.
DEV void cp16(void* d, const void* s) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" :: "r"(smem(d)), "l"(s) : "memory");
}
DEV void cp4(void* d, const void* s) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" :: "r"(smem(d)), "l"(s) : "memory");
}
DEV void cp_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(smem(bar)) : "memory");
}
DEV void arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem(bar)) : "memory");
}
template <int NC, int S, int CS, int TMA>
DEV void ws_gemv(const uint32_t* __restrict__ qw, const half* __restrict__ sc, const half* __restrict__ x,
                 half* __restrict__ y, int K) {
  constexpr int ROWB = CS * 64 + 64, WB = 16 * ROWB, STB = WB + 16 * CS * 2;
  extern __shared__ __align__(128) uint8_t sm[];
  __shared__ __align__(8) uint64_t full[S], empty[S];
  __shared__ float red[NC * 128];
  const int kw = K / 8, C = K / 128, nst = (C + CS - 1) / CS;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const size_t row0 = (size_t)blockIdx.x * 16;
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem(full + s)), "r"(TMA ? 1 : 32) : "memory");
      asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem(empty + s)), "r"(NC) : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp == NC) {  // the producer
    for (int i = 0; i < nst; ++i) {
      const int slot = i % S, cs = min(CS, C - i * CS);
      if (i >= S) wait(empty + slot, (i / S - 1) & 1);
      uint8_t* st = sm + slot * STB;
      if (TMA) {  // one bulk copy per row of weights (the consumers read the scales from global)
        if (lane == 0) expect_tx(full + slot, 16 * cs * 64);
        __syncwarp();
        if (lane < 16) bulk(st + lane * ROWB, qw + (row0 + lane) * kw + (size_t)i * CS * 16, cs * 64, full + slot);
      } else {
        for (int p = lane; p < 16 * cs * 4; p += 32) {
          const int row = p / (cs * 4), off = p % (cs * 4);
          cp16(st + row * ROWB + off * 16, qw + (row0 + row) * kw + (size_t)i * CS * 16 + off * 4);
        }
        for (int p = lane; p < 16 * cs / 2; p += 32) {
          const int row = p / (cs / 2), off = p % (cs / 2);
          cp4(st + WB + (row * CS + off * 2) * 2, sc + (row0 + row) * C + i * CS + off * 2);
        }
        cp_arrive(full + slot);
      }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    return;
  }
  const int r = lane / 4, t = lane % 4;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  const half z = __float2half(8.f);
  for (int i = 0; i < nst; ++i) {
    const int slot = i % S, cs = min(CS, C - i * CS);
    wait(full + slot, (i / S) & 1);
    const uint8_t* st = sm + slot * STB;
    const half* ss = reinterpret_cast<const half*>(st + WB);
    for (int cl = warp; cl < cs; cl += NC) {
      const uint4 w0 = *reinterpret_cast<const uint4*>(st + r * ROWB + cl * 64 + t * 16);
      const uint4 w8 = *reinterpret_cast<const uint4*>(st + (r + 8) * ROWB + cl * 64 + t * 16);
      const half* xp = x + (i * CS + cl) * 128 + t * 32;
      const int c = i * CS + cl;
      const half s0 = TMA ? sc[(row0 + r) * C + c] : ss[r * CS + cl], s8 = TMA ? sc[(row0 + r + 8) * C + c] : ss[(r + 8) * CS + cl];
      nb_mma_chunk(acc, &w0.x, &w8.x, xp, xp, 1, s0, s8, z, z);
    }
    __syncwarp();
    if (lane == 0) arrive(empty + slot);
  }
  // fragment i of a lane: row r + 8 (i / 2), token 2 t + i % 2
  for (int i = 0; i < 4; ++i) red[warp * 128 + (r + i / 2 * 8) * 8 + t * 2 + i % 2] = acc[i];
  asm volatile("bar.sync 1, %0;" :: "n"(NC * 32) : "memory");
  if (threadIdx.x < 16) {
    float s = 0.f;
    for (int w = 0; w < NC; ++w) s += red[w * 128 + threadIdx.x * 8];
    y[row0 + threadIdx.x] = __float2half(s);
  }
}
#define WS(NC, S, CS, TMA) extern "C" __global__ void __launch_bounds__((NC + 1) * 32) \
    ws##TMA##_##NC##_##S##_##CS(const uint32_t* qw, const half* sc, const half* x, half* y, int K) { \
    ws_gemv<NC, S, CS, TMA>(qw, sc, x, y, K); }
WS(4, 4, 8, 0) WS(8, 4, 8, 0) WS(2, 4, 8, 0) WS(4, 6, 4, 0) WS(4, 2, 16, 0) WS(8, 2, 16, 0) WS(4, 3, 8, 0)
WS(4, 4, 8, 1) WS(8, 4, 8, 1) WS(2, 4, 8, 1) WS(4, 6, 4, 1) WS(4, 2, 16, 1) WS(8, 2, 16, 1) WS(4, 3, 8, 1)

extern "C" __global__ void stream(const uint4* q, long long n16, uint32_t* out) {
  uint32_t acc = 0;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n16; i += 4 * stride) {
    const uint4 a = ldw(reinterpret_cast<const uint32_t*>(q + i)), b = ldw(reinterpret_cast<const uint32_t*>(q + i + stride));
    const uint4 c = ldw(reinterpret_cast<const uint32_t*>(q + i + 2 * stride)), d = ldw(reinterpret_cast<const uint32_t*>(q + i + 3 * stride));
    acc ^= x4(a) ^ x4(b) ^ x4(c) ^ x4(d);
  }
  for (; i < n16; i += stride) acc ^= x4(ldw(reinterpret_cast<const uint32_t*>(q + i)));
  out[(long long)blockIdx.x * blockDim.x + threadIdx.x] = acc;
}
"""


def gemv_warps(n):
    """The mma8 copy's default warps for N (schedules/gemv_mma.py's H200 table)."""
    from schedules.gemv_mma import _H200, default_for

    return default_for(_H200, n, 1).warps


class Driver:
    """The few CUDA driver calls needed to run a cubin on torch's current stream."""

    def __init__(self, cubin: bytes):
        import torch

        torch.cuda.init()
        torch.zeros(1, device="cuda")  # torch makes the primary context current
        self.cu = ctypes.CDLL("libcuda.so.1")
        self.mod = ctypes.c_void_p()
        self._check(self.cu.cuModuleLoadData(ctypes.byref(self.mod), ctypes.c_char_p(cubin)), "cuModuleLoadData")
        self.funcs = {}

    def _check(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed: CUresult {rc}")

    def launch(self, name, grid, block, args, smem=0):
        import torch

        if name not in self.funcs:
            f = ctypes.c_void_p()
            self._check(self.cu.cuModuleGetFunction(ctypes.byref(f), self.mod, name.encode()), name)
            self.funcs[name] = f
        vals = [ctypes.c_void_p(a.data_ptr()) if hasattr(a, "data_ptr") else
                (ctypes.c_longlong(a) if isinstance(a, Long) else ctypes.c_int(a)) for a in args]
        ptrs = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.byref(v), ctypes.c_void_p) for v in vals])
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        self._check(self.cu.cuLaunchKernel(self.funcs[name], grid, 1, 1, block, 1, 1, smem, stream, ptrs, None),
                    name)


class Long(int):
    """A 64-bit kernel argument."""


WS_CONFIGS = [(tma, nc, s, cs) for tma in (0, 1)  # (TMA bulk copies?, NC, S, CS)
              for nc, s, cs in ((4, 4, 8), (8, 4, 8), (2, 4, 8), (4, 6, 4), (4, 2, 16), (8, 2, 16), (4, 3, 8))]


def ws_smem(s, cs):
    return s * (16 * (cs * 64 + 64) + 16 * cs * 2)


def compile_cubin(tmp: Path) -> bytes:
    from schedules.gemv_mma import _HELPERS

    (tmp / "reads.cu").write_text(SRC.replace("#include <cuda_fp16.h>", "#include <cuda_fp16.h>\n" + _HELPERS
                                              + "\n#define DEV __device__ __forceinline__\n"
                                              "DEV uint32_t smem(const void* p);\n"
                                              "DEV void wait(uint64_t* bar, uint32_t parity);", 1))
    subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-O3", "-std=c++17", "-o", str(tmp / "reads.cubin"),
                    str(tmp / "reads.cu")], check=True)
    return (tmp / "reads.cubin").read_bytes()


def kernels(n, k):
    """name -> (function, grid, block, extra args before `out`, dynamic smem), for the N x K/8 words."""
    blocks, w = n // 16, gemv_warps(n)
    ks = {"gemv": ("gemv_u2", blocks, 32 * w, [], 0), "gemv_u4": ("gemv_u4", blocks, 32 * w, [], 0),
          "linear": ("linear_u2", blocks, 32 * w, [], 0), "linear_u4": ("linear_u4", blocks, 32 * w, [], 0)}
    for s, sb in ((2, 16384), (4, 8192), (8, 4096)):
        ks[f"bulk_s{s}x{sb // 1024}k"] = (f"bulk_s{s}", blocks, 128, [sb], s * sb)
    for s, sb in ((4, 8192), (8, 4096)):
        ks[f"bulkrow_s{s}x{sb // 1024}k"] = (f"bulkrow_s{s}", blocks, 128, [sb], s * sb)
    ks["stream"] = ("stream", 132 * 4, 256, [Long(n * k // 32)], 0)
    return ks


def xor_rows(q, blocks):
    a = q.cpu().numpy().view(np.uint32).reshape(blocks, -1)
    return np.bitwise_xor.reduce(a, axis=1)


def nibble_gemv(n, k, tmp, ablation=None):
    """nibble's mma8 copy (default config) for the shape, compiled for sm_90 (its CUDA edited by
    ABLATIONS[ablation]): a function of (x, q, s, y)."""
    import tvm
    import tvm_ffi

    from compiler.cuda import ensure_cuda_runtime, register_nvcc_callback
    from compiler.int4_kernel import int4_matmul_func
    from compiler.quantize import QuantConfig
    from compiler.target import resolve, tvm_target
    from schedules import gemv_mma

    ensure_cuda_runtime()
    register_nvcc_callback("sm_90")
    nvcc = tvm_ffi.get_global_func("tvm_callback_cuda_compile")

    def edited(code, *rest):
        new = ABLATIONS[ablation](code)
        assert new != code, ablation
        return nvcc(new, *rest)

    if ablation:
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", edited, override=True)
    attrs = dict(int4_matmul_func(n, k, QuantConfig(128)).attrs["nibble.int4"])
    func = gemv_mma.gemv_mma_func(attrs, 8, gemv_mma.default_for(gemv_mma._H200, n, 8))
    lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm_target(resolve("cuda", "sm_90")))
    path = str(tmp / f"gemv_{k}_{n}_{ablation}.so")
    lib.export_library(path)  # runs the callback
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", nvcc, override=True)
    return tvm.runtime.load_module(path)["gemv_mma"]


def main():
    import torch
    import tvm

    from bench_linear import ROTATE_BYTES, graph_time

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--no-patterns", action="store_true", help="only nibble's GEMV, its ablations and the copy")
    ap.add_argument("--no-ablations", action="store_true", help="nibble's GEMV without its ablations")
    ap.add_argument("--ws", action="store_true", help="also the warp-specialized GEMV prototype (WS_CONFIGS)")
    ap.add_argument("--profile", default=None, metavar="KxN[:ABLATION]",
                    help="only run nibble's GEMV (or an ablation) on one shape 5 times, untimed: for Nsight Compute")
    args = ap.parse_args()
    if args.profile:
        shape, _, ab = args.profile.partition(":")
        k, n = map(int, shape.split("x"))
        f = nibble_gemv(n, k, Path(tempfile.mkdtemp()), ab or None)
        t_ = tvm.runtime.from_dlpack
        q = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda").view(torch.uint32)
        sc = (torch.rand(n, k // 128, device="cuda") * 0.004 + 0.001).half()
        x, y = torch.randn(1, k, device="cuda", dtype=torch.float16), torch.empty(1, n, device="cuda", dtype=torch.float16)
        for _ in range(5):
            f(t_(x), t_(q), t_(sc), t_(y))
        torch.cuda.synchronize()
        return
    tmp = Path(tempfile.mkdtemp())
    drv = Driver(compile_cubin(tmp))
    rows = []
    for k, n in SHAPES:
        q0 = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
        sc0 = (torch.rand(n, k // 128, device="cuda") * 0.004 + 0.001).half()
        wbytes = q0.numel() * 4
        copies = max(2, math.ceil(ROTATE_BYTES / wbytes))
        qs = [q0.clone() for _ in range(copies)]
        scs = [sc0.clone() for _ in range(copies)]
        ref = xor_rows(q0, n // 16)
        row = {"K": k, "N": n, "weight_MB": wbytes / 1e6, "warps": gemv_warps(n)}
        for label, (fn, grid, block, extra, smem) in ([] if args.no_patterns else kernels(n, k).items()):
            out = torch.empty(grid * block, dtype=torch.int32, device="cuda")
            head = (lambda q: [q]) if fn == "stream" else (lambda q: [q, k // 8])  # the kernel's leading args
            drv.launch(fn, grid, block, head(q0) + extra + [out], smem)
            torch.cuda.synchronize()
            got = out.cpu().numpy().view(np.uint32)
            if fn == "stream":
                ok = np.bitwise_xor.reduce(got) == np.bitwise_xor.reduce(ref)
            else:
                ok = bool((np.bitwise_xor.reduce(got.reshape(grid, block), axis=1) == ref).all())
            if not ok:
                raise SystemExit(f"{label} on {k}->{n}: the bytes read are not the block's rows")
            calls = [(lambda q=q, fn=fn, grid=grid, block=block, extra=extra, smem=smem, out=out, head=head:
                      drv.launch(fn, grid, block, head(q) + extra + [out], smem))
                     for q in (qs * 24)[:24]]
            t = graph_time(calls)
            row[label] = t * 1e6
            print(f"{k}->{n} {label}: {t * 1e6:.2f} us, {wbytes / t / 1e12:.2f} TB/s", flush=True)
        # nibble's GEMV and the same-bytes copy (as bench_linear.py) in the same run
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        y = torch.empty(1, n, device="cuda", dtype=torch.float16)
        t_ = tvm.runtime.from_dlpack
        targs = [(t_(x), t_(q.view(torch.uint32)), t_(s), t_(y)) for q, s in zip(qs, scs)]
        for ab in [None, *([] if args.no_ablations else ABLATIONS)]:
            f = nibble_gemv(n, k, tmp, ab)
            row["nibble_mma8" + (f"_{ab}" if ab else "")] = graph_time([lambda a=a: f(*a) for a in (targs * 24)[:24]]) * 1e6
        if args.ws:  # the warp-specialized prototype, checked against nibble's GEMV on the same inputs
            f = nibble_gemv(n, k, tmp)
            ref = torch.empty_like(y)
            f(t_(x), t_(q0.view(torch.uint32)), t_(sc0), t_(ref))
            for tma, nc, st, cs in WS_CONFIGS:
                name, block, smem = f"ws{tma}_{nc}_{st}_{cs}", (nc + 1) * 32, ws_smem(st, cs)
                got = torch.full_like(y, float("nan"))
                drv.launch(name, n // 16, block, [q0, sc0, x, got, k], smem)
                torch.cuda.synchronize()
                err = float((got.float() - ref.float()).norm() / ref.float().norm())
                if not err < 1e-3:
                    raise SystemExit(f"{name} on {k}->{n}: rel. difference {err} from nibble's GEMV")
                row[name] = graph_time([lambda q=q, sc=sc: drv.launch(name, n // 16, block, [q, sc, x, y, k], smem)
                                        for q, sc in (list(zip(qs, scs)) * 24)[:24]]) * 1e6
                print(f"{k}->{n} {name}: {row[name]:.2f} us (nibble {row['nibble_mma8']:.2f}), diff {err:.1e}",
                      flush=True)
        half = (wbytes + sc0.numel() * 2 + 2 * k + 2 * n) // 2
        src = [torch.empty(half, dtype=torch.uint8, device="cuda") for _ in range(copies)]
        dst = torch.empty(half, dtype=torch.uint8, device="cuda")
        row["copy"] = graph_time([lambda s=s: dst.copy_(s) for s in (src * 24)[:24]]) * 1e6
        print(f"{k}->{n} nibble_mma8 {row['nibble_mma8']:.2f} us, copy {row['copy']:.2f} us", flush=True)
        rows.append(row)
        del qs, scs, src
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tvm": tvm.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv_read_patterns.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = [c for c in rows[0] if c not in ("K", "N", "weight_MB", "warps")]
    md = [f"# Decode GEMV weight reads on {meta['device']} ({meta['date']}, torch {meta['torch']}, "
          f"TVM {meta['tvm']})", "", "us per call (TB/s of int4 weight bytes); CUDA-graph medians, weights from HBM", "",
          "| K->N | MB | W | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 3)]
    for r in rows:
        cells = [f"{r[c]:.2f} ({r['weight_MB'] / r[c]:.2f})" for c in cols]
        md.append(f"| {r['K']}->{r['N']} | {r['weight_MB']:.1f} | {r['warps']} | " + " | ".join(cells) + " |")
    (out / "gemv_read_patterns.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
