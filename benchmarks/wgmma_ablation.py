"""What limits the wgmma GEMM (schedules/gemm_wgmma.py): time it with one part of its work removed at a time.

    python benchmarks/wgmma_ablation.py [--out DIR] [--configs t256w2m1s4cp,...] [--cases K,N,M;...]
                                        [--ablations full,no_x,...]

Each variant edits the generated CUDA of the default kernel (results are wrong on purpose; only the time
means something): no_decode feeds the packed words to wgmma undecoded, no_wgmma replaces the tensor-core
instructions by one FADD, no_x drops the copies of x into shared memory, no_sync drops the per-k-block
barrier, no_store drops the epilogue's stores. If removing a part barely moves the time, that part is
not what limits the kernel. direct_store is an A/B rather than a removal: the epilogue of VERSION 1,
scattered 2 B stores straight from the accumulators instead of the shared-memory tile. For stream-K
configs ("sk"): no_fixup skips the finishing block's wait for and adding of the partials, no_partial the
partial's stores (its flag still raised). Weights rotate past the L2 as in bench_linear.py; CUDA-graph
medians, and the GPU time of each of the call's kernels (torch.profiler: the stream-K flag zeroing
kernel apart from the GEMM).
Writes wgmma_ablation.json / .md to --out.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CASES = [(4096, 4096, 2048), (4096, 22016, 2048), (11008, 4096, 2048), (4096, 4096, 512)]  # (K, N, M)
_WGMMA = re.compile(r'asm volatile\("wgmma\.mma_async.*?: "memory"\);', re.S)
_DIRECT = r"""#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const long long ra = row0 + 64 * mt, rb = ra + 8;
#pragma unroll
    for (int i = 0; i < BT / 8; ++i) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const long long tok = tok0 + 8 * i + 2 * t + e;
        if (tok < m) {
          y[tok * N + ra] = __float2half(acc[mt * (BT / 2) + 4 * i + e]);
          y[tok * N + rb] = __float2half(acc[mt * (BT / 2) + 4 * i + 2 + e]);
        }
      }
    }
  }
"""
ABLATIONS = {
    "full": lambda s: s,
    "no_decode": lambda s: re.sub(r"nbw_dq\(([^,]+), sel, [^;]*\);", r"\1;", s),
    "no_wgmma": lambda s: _WGMMA.sub("acc[s] += __uint_as_float(ab[mt * 16 + 4 * s] ^ ab[4 * s + 3]) + (float)desc;",
                                     s),
    "no_x": lambda s: s.replace("nbw_cp16(st + n * 128", "if (0) nbw_cp16(st + n * 128"),
    "no_sync": lambda s: re.sub(r"__syncthreads\(\);\n( *)load\(ib \+ kb", r"\n\1load(ib + kb", s),
    "no_store": lambda s: s.replace("if (tok0 + n < m) {", "if (tok0 + n < 0) {"),
    # not a removal: the epilogue before the shared-memory tile (scattered 2 B stores from the accumulators)
    "direct_store": lambda s: re.sub(r" *nbw_wait<0>\(\);\n *__syncthreads\(\);\n *// the epilogue.*?\n(?=  \} while)",
                                     _DIRECT, s, flags=re.S),
    "no_fixup": lambda s: s.replace("pbeg > 0 && q >= 0; --q", "false; --q"),
    "no_partial": lambda s: re.sub(r"__stcg\(part \+ \(long long\)vid[^;]*;", ";", s),
}


def parse_config(text):
    """"t256w2m1s4" (optionally "k2": K slices, "x16": small x boxes, "cp": cp.async staging) ->
    gemm_wgmma.Config: the inverse of Config.label."""
    from schedules.gemm_wgmma import Config

    t, w, mt, s, k, x, cp, sk, skn = re.fullmatch(r"t(\d+)w(\d+)m(\d+)s(\d+)(?:k(\d+))?(?:x(\d+))?(cp)?(sk(\d*))?",
                                             text).groups()
    return Config(tokens=int(t), warpgroups=int(w), m_tiles=int(mt), stages=int(s), split_k=int(k or 1),
                  x_rows=int(x or Config.x_rows), tma=not cp, stream_k=int(skn or 1) if sk else 0)


def build(k, n, ablation, out_dir, config="t256w2m1s4cp"):
    import tvm

    from compiler.cuda import ensure_cuda_runtime, register_nvcc_callback
    from compiler.int4_kernel import int4_matmul_func
    from compiler.quantize import QuantConfig
    from compiler.target import resolve, tvm_target
    from schedules import gemm_wgmma

    ensure_cuda_runtime()
    register_nvcc_callback("sm_90")
    orig = gemm_wgmma.kernel_source

    def edited(attrs, cfg, *rest):
        name, src = orig(attrs, cfg, *rest)
        new = ABLATIONS[ablation](src)
        assert ablation == "full" or new != src, ablation
        return name, new

    gemm_wgmma.kernel_source = edited
    try:
        attrs = dict(int4_matmul_func(n, k, QuantConfig(128)).attrs["nibble.int4"])
        func = gemm_wgmma.gemm_wgmma_func(attrs, parse_config(config))
    finally:
        gemm_wgmma.kernel_source = orig
    lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm_target(resolve("cuda", "sm_90")))
    path = str(Path(out_dir) / f"{ablation}_{config}_{k}_{n}.so")
    lib.export_library(path)
    return path


def kernel_times(calls, reps=5):
    """{kernel name: mean GPU us per call} over reps passes of calls (compiler.timing.kernel_times)."""
    from compiler.timing import kernel_times as per_pass

    times = per_pass(lambda: [c() for c in calls], reps, warmup=1)
    return {name: us / len(calls) for name, (_, us) in times.items()}


def main():
    import torch
    import tvm

    from bench_linear import ROTATE_BYTES, graph_time, random_weights

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--configs", default="t256w2m1s4cp", help="comma-separated configs, e.g. t128w2m2s4 (the "
                    "ablations edit the cp.async staging: 'cp' configs, as measured in h200_wgmma_ablation.md)")
    ap.add_argument("--cases", default=None, help="K,N,M;... (default: CASES)")
    ap.add_argument("--ablations", default=None, help="comma-separated subset of ABLATIONS")
    args = ap.parse_args()
    cases = [tuple(map(int, c.split(","))) for c in args.cases.split(";")] if args.cases else CASES
    ablations = args.ablations.split(",") if args.ablations else list(ABLATIONS)
    tmp = tempfile.mkdtemp()
    rows = []
    for (k, n, m), config in [(c, cfg) for c in cases for cfg in args.configs.split(",")]:
        parts, _, _ = random_weights(n, k)
        q, sc = parts["qweight"], parts["scales"]
        copies = max(2, math.ceil(ROTATE_BYTES / (q.numel() * 4)))
        ws = [(q.clone(), sc.clone()) for _ in range(copies)]
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        y = torch.empty(m, n, device="cuda", dtype=torch.float16)
        w16 = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(2)]
        t_cublas = graph_time([lambda w=w: torch.nn.functional.linear(x, w) for w in w16 * 12], torch)
        row = {"K": k, "N": n, "M": m, "config": config, "cublas_us": t_cublas * 1e6}
        for ab in ablations:
            if ab in ("no_fixup", "no_partial") and "sk" not in config:
                continue
            f = tvm.runtime.load_module(build(k, n, ab, tmp, config))["gemm_wgmma"]
            t = tvm.runtime.from_dlpack
            args_ = [(t(x), t(a), t(b), t(y)) for a, b in ws]
            calls = [lambda a=a: f(*a) for a in (args_ * 24)[:24]]
            row[ab] = graph_time(calls, torch) * 1e6
            if ab == "full":
                row["kernels_us"] = kernel_times(calls)
        rows.append(row)
        print(row, flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "wgmma_ablation.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    md = [f"# wgmma GEMM ablation on {meta['device']} ({meta['date']}, torch {meta['torch']})", "",
          "us per call (config: tokens t, warpgroups w, m-tiles m, stages s); each column removes one part "
          "of the kernel's work", "",
          "| K->N | M | config | cuBLAS | " + " | ".join(ABLATIONS) + " |", "|" + "---|" * (len(ABLATIONS) + 4)]
    md += [f"| {r['K']}->{r['N']} | {r['M']} | {r['config']} | {r['cublas_us']:.1f} | "
           + " | ".join(f"{r[a]:.1f}" if a in r else "" for a in ABLATIONS) + " |" for r in rows]
    md += ["", "GPU us per call of each kernel of the full variant (torch.profiler; the graph time above also "
           "holds the gaps between kernels)", ""]
    md += [f"- {r['K']}->{r['N']} M={r['M']} {r['config']}: "
           + ", ".join(f"{name} {us:.1f}" for name, us in r.get("kernels_us", {}).items()) for r in rows]
    (out / "wgmma_ablation.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
