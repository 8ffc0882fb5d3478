"""Can a decode step's idle DRAM time feed the next GEMV? Weights prefetched into L2 by the kernel before it.

    python benchmarks/l2_prefetch.py [--out DIR]

A decode step runs kernels that barely touch DRAM (attention reads 4 MB in 7-8 us at 256 keys, add +
RMSNorm and the RoPE kernel ~2 us each) between int4 GEMVs that are latency-bound at 2.4-2.7 TB/s
(h200_gemv_read_patterns.md). If the kernel before a GEMV issued `cp.async.bulk.prefetch.L2` over that
GEMV's weights and scales (fire and forget: the TMA unit fetches while the kernel does its own work), the
GEMV would read L2 instead of HBM. This measures what that could gain, before any compiler work, for
nibble's mma8 GEMV (M = 1, default config) on the four Llama-2-7B linears:
  cold        the GEMV alone, weights rotated past the L2 (what the benchmarks report)
  warm        the GEMV on one weight copy again and again (L2-resident where it fits)
  idleT       a stand-in for the kernel before it (32 blocks that spin T us, like the attention's 32 heads),
              then the GEMV: their sum
  idleT_pf    the same, the spinning blocks first prefetching the GEMV's weights and scales into L2
              (each block one share, in PF_CHUNK pieces): their sum
gain = idleT - idleT_pf is what a real kernel of T us could hand the GEMV. CUDA-graph medians of 24
launches (pairs), weights rotated over > 3 L2s. Writes l2_prefetch.json / .md to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]  # Llama-2-7B (K, N)
IDLE_US = (0, 2, 4, 8)  # the stand-in kernel's length
IDLE_BLOCKS = 32  # the decode attention's grid at 256 keys (one block per head)
PF_CHUNK = 32 << 10  # bytes per cp.async.bulk.prefetch.L2

SRC = r"""
#include <cstdint>
__device__ __forceinline__ unsigned long long now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void prefetch(const uint8_t* p, long long bytes, int chunk) {
  // this block's share of [p, p + bytes), 16-byte aligned, in chunk-byte bulk prefetches
  long long per = ((bytes + gridDim.x - 1) / gridDim.x + 15) & ~15ll;
  long long beg = (long long)blockIdx.x * per, end = min(bytes, beg + per);
  for (long long o = beg; o < end; o += chunk) {
    const unsigned sz = (unsigned)min((long long)chunk, end - o);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p + o), "r"(sz) : "memory");
  }
}
// spin ns nanoseconds; thread 0 first prefetches [a, a + na) and [b, b + nb) (na = nb = 0: no prefetch)
extern "C" __global__ void idle_pf(const uint8_t* a, long long na, const uint8_t* b, long long nb,
                                   long long ns, int chunk) {
  const unsigned long long t0 = now();
  if (threadIdx.x == 0) {
    if (na) prefetch(a, na, chunk);
    if (nb) prefetch(b, nb, chunk);
  }
  while (now() - t0 < (unsigned long long)ns) {}
}
"""


def main():
    import torch
    import tvm

    from bench_linear import ROTATE_BYTES, graph_time
    from gemv_read_patterns import Driver, Long, nibble_gemv

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    (tmp / "pf.cu").write_text(SRC)
    subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-O3", "-o", str(tmp / "pf.cubin"), str(tmp / "pf.cu")],
                   check=True)
    drv = Driver((tmp / "pf.cubin").read_bytes())
    t_ = tvm.runtime.from_dlpack
    rows = []
    for k, n in SHAPES:
        q0 = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda").view(torch.uint32)
        sc0 = (torch.rand(n, k // 128, device="cuda") * 0.004 + 0.001).half()
        wbytes, sbytes = q0.numel() * 4, sc0.numel() * 2
        copies = max(2, math.ceil(ROTATE_BYTES / wbytes))
        ws = [(q0.clone(), sc0.clone()) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        y = torch.empty(1, n, device="cuda", dtype=torch.float16)
        f = nibble_gemv(n, k, tmp)
        targs = [(t_(x), t_(q), t_(s), t_(y)) for q, s in ws]
        rot = list(range(copies)) * (24 // copies + 1)

        def idle(i, us, pf):
            q, s = ws[i]
            drv.launch("idle_pf", IDLE_BLOCKS, 128,
                       [q, Long(wbytes if pf else 0), s, Long(sbytes if pf else 0), Long(us * 1000), PF_CHUNK])

        row = {"K": k, "N": n, "weight_MB": (wbytes + sbytes) / 1e6}
        row["cold"] = graph_time([lambda i=i: f(*targs[i]) for i in rot[:24]]) * 1e6
        row["warm"] = graph_time([lambda: f(*targs[0])] * 24) * 1e6
        for us in IDLE_US:
            for pf in (False, True):
                label = f"idle{us}" + ("_pf" if pf else "")
                row[label] = graph_time([lambda i=i, us=us, pf=pf: (idle(i, us, pf), f(*targs[i]))
                                         for i in rot[:24]]) * 1e6
        row["pf_alone"] = graph_time([lambda i=i: idle(i, 0, True) for i in rot[:24]]) * 1e6
        print(json.dumps({c: round(v, 2) if isinstance(v, float) else v for c, v in row.items()}), flush=True)
        rows.append(row)
        del ws, targs
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tvm": tvm.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "idle_blocks": IDLE_BLOCKS, "pf_chunk": PF_CHUNK}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "l2_prefetch.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = [f"# Decode GEMV after a kernel that prefetches its weights into L2: {meta['device']} ({meta['date']}, "
          f"torch {meta['torch']}, TVM {meta['tvm']})", "",
          "us per call (a pair where idle): CUDA-graph medians, weights rotated past the L2; gain = idleT - idleT_pf", "",
          "| K->N | MB | cold | warm | pf alone | " + " | ".join(f"idle{u} / _pf (gain)" for u in IDLE_US) + " |",
          "|" + "---|" * (5 + len(IDLE_US))]
    for r in rows:
        cells = [f"{r[f'idle{u}']:.2f} / {r[f'idle{u}_pf']:.2f} ({r[f'idle{u}'] - r[f'idle{u}_pf']:+.2f})"
                 for u in IDLE_US]
        md.append(f"| {r['K']}->{r['N']} | {r['weight_MB']:.1f} | {r['cold']:.2f} | {r['warm']:.2f} | "
                  f"{r['pf_alone']:.2f} | " + " | ".join(cells) + " |")
    (out / "l2_prefetch.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
