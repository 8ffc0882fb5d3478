"""One int4 (W4A16, group 128, fp16 scales) linear on the GPU: nibble vs the alternatives, per shape and M.

    python benchmarks/bench_linear.py [--out DIR] [--shapes 4096x4096,...] [--ms 1,2,...]
    python benchmarks/bench_linear.py --candidates [--out DIR]     # every bucket copy at every M

Columns (median of CUDA-graph replays, each launch on its own weight copy so weights come from HBM:
enough copies rotate to exceed 3x the 60 MiB L2):
  copy     a device-to-device copy moving the same bytes as the int4 kernel (read + write counted =
           qweight + scales + x + y), timed the same way: the floor the targets are measured against
  nibble   our build: the bucket copy compiler/dispatch.py runs at this M (column "kernel": gemv4,
           gemm16, ..., gemm = the unbounded copy)
  dlight   TVM's stock dlight rules on the same PrimFunc, m made static (its best case; not with
           --candidates: its first tensor-core schedule costs 30+ s and it has been measured)
  cublas   torch F.linear with the fp16 weight (4x the bytes)
  tinygemm torch._weight_int4pack_mm (torch's int4 kernel; bf16 activations, as it requires)
--candidates (default M = 1,2,4,8,16,32,200) also times, at each M, every copy of
dispatch.CANDIDATES that can serve it (GEMV buckets 1..16, GEMM buckets 16..256, the unbounded GEMM),
and the smallest GEMM bucket serving M with each split_k of --splits (its tile fixed): the data that
sets dispatch.ROUTES and schedules/gemm.py's split rule. It also checks every candidate copy at every M
on a 4096->4096 linear with zero points and bias.
Before timing, every kernel is checked on fresh random inputs with a NaN-poisoned output against
x @ W^T in fp32 with W the exact dequantized weight (rel. L2 error; the issue's bound is 2e-3); the
exit status is 1 if any nibble kernel misses it. Weights are random packed nibbles and scales made on
the GPU. Kernels for the shapes are compiled in parallel worker processes (--jobs). Writes
bench_linear.json / .md (--candidates: bench_linear_candidates.*) to --out, after every shape.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]  # Llama-2-7B (K, N)
MS = [1, 2, 4, 8, 16, 32, 200, 2048]
CANDIDATE_MS = [1, 2, 4, 8, 16, 32, 200]
SPLITS = (1, 2, 4, 8, 16)  # split_k values timed for the GEMM buckets with --candidates
GROUP = 128
L2_BYTES = 60 * 2**20
ROTATE_BYTES = 3 * L2_BYTES  # weight copies in rotation exceed this, so each launch reads HBM
# GEMV config variants timed beside the default (name -> Config overrides), at the M's of VARIANT_MS
VARIANTS = {"ts2": dict(rows_per_thread=2), "ts8": dict(rows_per_thread=8)}
VARIANT_MS = (1, 4)
# Tensor-core GEMV (schedules/gemv_mma.py) config variants timed with --candidates beside each "mma"
# copy at every M it serves (name suffix -> Config overrides)
MMA_VARIANTS = {f"w{w}u{u}": dict(warps=w, chunks=u) for w in (4, 8, 16) for u in (1, 2, 4)}
MMA_VARIANTS.update({f"w{w}u{u}r2": dict(warps=w, chunks=u, row_tiles=2) for w, u in ((8, 2), (4, 2), (4, 4), (16, 1), (16, 2))})
# weight loads with cache qualifiers (gemv_mma.Config.loads), on each copy's per-N default config
MMA_VARIANTS.update({"plain": dict(loads=""), "nc": dict(loads="nc.L1::no_allocate"), "p256": dict(loads="L2::256B")})
# Hopper wgmma GEMM (schedules/gemm_wgmma.py) variants, timed with --candidates beside each "wgmma" copy:
# t = tokens per block (wgmma n), w = warpgroups (64 W rows each), m = 64-row tiles per warpgroup,
# s = ring stages, k = K slices (on the unbounded copy only: a variant replaces the per-bucket default whole)
WGMMA_VARIANTS = {f"t{t}w{w}m1s4" + (f"k{k}" if k > 1 else ""): dict(tokens=t, warpgroups=w, split_k=k)
                  for t, w, k in ((16, 1, 1), (16, 1, 2), (16, 2, 4), (32, 1, 1), (32, 1, 2), (32, 2, 4),
                                  (64, 1, 1), (64, 1, 2), (64, 1, 4), (64, 2, 1), (64, 2, 2), (64, 2, 4),
                                  (128, 1, 1), (128, 1, 2), (128, 2, 1), (128, 2, 2), (128, 2, 4), (128, 2, 8),
                                  (256, 2, 2), (256, 2, 4))}
# one token tile for a whole ~200-token prompt (208 = 13 x 16 tokens; or 256) with its ring depth s, so that
# each W row block is read once there: 128-token tiles read it twice at m = 200
WGMMA_VARIANTS.update({f"t{t}w{w}m1s{s}" + (f"k{k}" if k > 1 else ""): dict(tokens=t, warpgroups=w, stages=s, split_k=k)
                       for t, w, s, k in ((208, 1, 4, 1), (208, 1, 4, 2), (208, 1, 3, 1), (208, 2, 3, 1),
                                          (208, 2, 4, 1), (208, 2, 4, 2), (256, 1, 4, 1), (256, 1, 4, 2),
                                          (256, 2, 4, 1))})
# the per-thread cp.async staging of x and W (Config.tma=False, the kernel before TMA) on the defaults' tiles
# and TMA with one x box for the whole token tile (x{tokens}: the box's rows past m zero-filled by TMA)
WGMMA_VARIANTS.update({"t256w2m1s4cp": dict(tma=False), "t128w1m1s4cp": dict(tokens=128, warpgroups=1, tma=False),
                       "t128w2m1s4k2cp": dict(tokens=128, split_k=2, tma=False),
                       "t256w2m1s4x256": dict(x_rows=256), "t128w1m1s4x128": dict(tokens=128, warpgroups=1, x_rows=128),
                       "t128w2m1s4k4": dict(tokens=128, split_k=4), "t64w2m1s4k2": dict(tokens=64, split_k=2)})
# 16-token tiles for the 9-16-token bucket (the tensor-core GEMV's mma16 now), with deeper rings: W streams in
# by TMA, so more stages keep more of it in flight without registers
WGMMA_VARIANTS.update({f"t16w{w}m1s{s}" + (f"k{k}" if k > 1 else ""): dict(tokens=16, warpgroups=w, stages=s, split_k=k)
                       for w, s, k in ((1, 4, 4), (1, 6, 2), (1, 8, 1), (1, 8, 2), (1, 8, 4), (2, 8, 2), (2, 8, 4))})
# stream-K (one block per SM sharing all tiles' K pairs) with token tiles near a ~200-token prompt's size
# (sk: one block per SM; skB: B blocks per SM, for tiles small enough that B fit)
WGMMA_VARIANTS.update({f"t{t}w{w}m1s{s}sk" + (str(b) if b > 1 else ""): dict(tokens=t, warpgroups=w, stages=s, stream_k=b)
                       for t, w, s, b in ((256, 2, 4, 1), (256, 2, 3, 1), (224, 2, 4, 1), (208, 2, 4, 1), (192, 2, 4, 1),
                                          (128, 2, 4, 1), (128, 1, 4, 1), (128, 1, 4, 3), (128, 1, 3, 3), (128, 2, 4, 2),
                                          (208, 1, 3, 2), (256, 1, 3, 2), (192, 1, 3, 2), (64, 1, 4, 4))})
VARIANT_SETS = {"mma": MMA_VARIANTS, "wgmma": WGMMA_VARIANTS}  # per copy kind
VARIANTS_ENV = "NIBBLE_BENCH_VARIANTS"  # --variants, for the compile workers


def _keep_variants():
    if os.environ.get(VARIANTS_ENV) is not None:
        keep = set(os.environ[VARIANTS_ENV].split(","))
        for variants in VARIANT_SETS.values():
            for name in [v for v in variants if v not in keep]:
                del variants[name]


_keep_variants()
LAUNCHES = 24  # launches captured per CUDA graph (at least one pass over the copies)
ERR_MAX = 2e-3  # issue 3's bound on the relative error at K = 4096
CHECK = (4096, 4096)  # (K, N) of the zero points + bias check with --candidates
DEVICE = "cuda"  # torch device of every tensor (a CPU smoke test of this script swaps it)


# -- building (in worker processes) -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
    """One module to compile: the kernels of one linear shape."""

    k: int
    n: int
    ms: tuple  # token counts that will be measured
    candidates: bool  # every dispatch candidate copy + split variants (else: the routed copies)
    splits: tuple = ()
    dlight: bool = True
    symmetric: bool = True
    bias: bool = False
    numerics_only: bool = False  # the zero points + bias check: copies only, no variants
    only_splits: bool = False  # just the split_k variants (a module of their own: builds in parallel)


def split_variant_copies(m: int) -> str | None:
    """The GEMM bucket whose split variants are timed at m: the smallest GEMM candidate serving it."""
    from compiler.dispatch import CANDIDATES

    return next((f"gemm{r}" for r, kind in CANDIDATES if kind == "gemm" and r is not None and m <= r), None)


def kernel_funcs(job: Job, target) -> dict:
    """{global symbol: tagged or static-m PrimFunc} for one job (what dispatch would make, and more)."""
    from compiler.dispatch import CANDIDATES, bucket_copy, candidates_for, kernel_for
    from compiler.int4_kernel import int4_matmul_func
    from compiler.quantize import QuantConfig
    from compiler.tuning import CONFIG_ATTR
    from schedules import gemm

    base = int4_matmul_func(job.n, job.k, QuantConfig(GROUP, job.symmetric), has_bias=job.bias)
    names = {kernel_for(m) for m in job.ms}
    if job.candidates:
        names |= {c for m in job.ms for c in candidates_for(m)}
    bounds = {f"{kind}{'' if r is None else r}": (r, kind) for r, kind in CANDIDATES}
    bounds.update({kernel_for(m): _bound(kernel_for(m)) for m in job.ms})
    funcs = {name: bucket_copy(base, name, *bounds[name]) for name in sorted(names)}
    if job.only_splits:
        copies, funcs = funcs, {}
    else:
        copies = funcs
    if job.candidates and job.splits and not job.numerics_only:
        arch = gemm.config_for(target)
        attrs = dict(base.attrs["nibble.int4"])
        for copy in sorted({split_variant_copies(m) for m in job.ms} - {None}):
            rows = bounds[copy][0]
            tile = gemm.tile_for(arch, job.n, rows)
            auto = gemm.checked_plan(attrs, arch, rows)
            for s in job.splits:
                tuned = dataclasses.replace(tile, split_k=s)
                if auto is None or s == auto[1] or gemm.checked_plan(attrs, arch, rows, tuned) is None:
                    continue
                name = f"{copy}_s{s}"
                funcs[name] = copies[copy].with_attr({"global_symbol": name,
                                                      CONFIG_ATTR: dataclasses.asdict(tuned)})
    if job.candidates and not job.numerics_only and not job.only_splits:
        for copy in [c for c in copies if _bound(c)[1] == "mma" or c == "wgmma"]:
            for vname, over in VARIANT_SETS[_bound(copy)[1]].items():
                name = f"{copy}_{vname}"
                funcs[name] = copies[copy].with_attr({"global_symbol": name, CONFIG_ATTR: over})
    if not job.candidates and not job.only_splits:
        from schedules.gemv import GEMV, config_for

        for vname, over in VARIANTS.items():
            rule = GEMV(dataclasses.replace(config_for(target), **over))
            for m in VARIANT_MS:
                copy = kernel_for(m)
                if m in job.ms and copy.startswith("gemv"):
                    sch = rule.apply(funcs[copy], target, False)
                    if sch is not None:
                        funcs[f"{copy}_{vname}"] = sch.mod["main"].with_attr(
                            {"global_symbol": f"{copy}_{vname}", "tirx.is_scheduled": True})
    if job.dlight and not job.only_splits:
        for m in job.ms:
            funcs[f"dlight_m{m}"] = _static_m(job.n, job.k, m).with_attr(
                {"global_symbol": f"dlight_m{m}", "nibble.stock": True})
    return funcs


def _bound(copy: str):
    from compiler.dispatch import parse_copy

    return parse_copy(copy)


def build(job: Job, out_dir: str) -> tuple[str, list[str], dict]:
    """Compile a job's kernels into a shared library in out_dir: (path, kernel names, labels)."""
    import tvm
    from tvm.s_tir import dlight as dl

    from compiler.cuda import ensure_cuda_runtime, register_nvcc_callback
    from compiler.target import resolve, tvm_target
    from compiler.tuning import CONFIG_ATTR, config_from
    from schedules import gemm, gpu_rules

    ensure_cuda_runtime()
    register_nvcc_callback("sm_90")
    target = tvm_target(resolve("cuda", "sm_90"))
    funcs = kernel_funcs(job, target)
    if not funcs:
        return None, [], {}
    labels = {}  # what each GEMM copy runs: tile and split (for the tables)
    arch = gemm.config_for(target)
    for name, f in funcs.items():
        if str(f.attrs.get("nibble.kernel", "")) == "gemm":
            attrs = f.attrs["nibble.int4"]
            rows = int(f.attrs["nibble.rows"]) if "nibble.rows" in f.attrs else None
            tile = gemm.tile_for(arch, int(attrs["n"]), rows)
            tuned = config_from(f, gemm.Config, tile) if CONFIG_ATTR in f.attrs else None
            plan = gemm.checked_plan(attrs, arch, rows, tuned)
            labels[name] = f"{plan[0].label()} split {plan[1]}" if plan else "dlight"
        elif str(f.attrs.get("nibble.kernel", "")) == "wgmma":
            from schedules import gemm_wgmma

            c = config_from(f, gemm_wgmma.Config, gemm_wgmma.default_config(target, f))
            labels[name] = c.label()
    stock = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    ours = tvm.IRModule({k: f for k, f in funcs.items() if "nibble.stock" not in f.attrs})
    theirs = tvm.IRModule({k: f.without_attr("nibble.stock") for k, f in funcs.items() if "nibble.stock" in f.attrs})
    with target:
        ours = dl.ApplyDefaultSchedule(*gpu_rules(target))(ours)
        if len(theirs.functions_items()):
            theirs = dl.ApplyDefaultSchedule(*stock)(theirs)
    mod = tvm.IRModule({**dict(ours.functions_items()), **dict(theirs.functions_items())})
    lib = tvm.compile(mod, target=target)
    path = str(Path(out_dir) / (f"k{job.k}_n{job.n}{'' if job.symmetric else '_asym'}"
                                f"{'_bias' if job.bias else ''}{'_splits' if job.only_splits else ''}.so"))
    lib.export_library(path)
    return path, sorted(funcs), labels


def build_all(jobs: list[Job], workers: int) -> list:
    """build() every job, `workers` processes at once (spawned, not forked: a fork of a process with
    TVM's thread pools loaded can deadlock; the parent has not touched the GPU yet)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    out = tempfile.mkdtemp(prefix="nibble-bench-")
    if workers <= 1:
        return [build(j, out) for j in jobs]
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(build, jobs, [out] * len(jobs)))


def _static_m(n, k, m):
    """The same PrimFunc with m a constant (stock dlight then picks its GEMV for m=1: its best case)."""
    from compiler.int4_kernel import int4_matmul_func
    from compiler.quantize import QuantConfig

    return int4_matmul_func(n, k, QuantConfig(GROUP, True), m=m)


# -- measuring -------------------------------------------------------------------------------------

def random_weights(n, k, symmetric=True, bias=False, seed=0):
    """Random packed int4 weights made on the GPU (torch): {qweight, scales[, zeros][, bias]} and the
    exact fp32 W[N, K] they dequantize to ((nibble - zero) * scale, as compiler.quantize.dequantize)."""
    import torch

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device=DEVICE, generator=g)
    s = (torch.rand(n, k // GROUP, device=DEVICE, generator=g) * 0.004 + 0.001).half()
    parts = {"qweight": q.view(torch.uint32), "scales": s}
    z = torch.full_like(s, 8.0)
    if not symmetric:
        z = torch.randint(0, 16, s.shape, device=DEVICE, generator=g).half()
        parts["zeros"] = z
    if bias:
        parts["bias"] = torch.randn(n, device=DEVICE, generator=g).half()
    shifts = torch.arange(0, 32, 4, device=DEVICE, dtype=torch.int32)
    nib = ((q[:, :, None] >> shifts) & 15).reshape(n, k)
    w = (nib.float() - z.float().repeat_interleave(GROUP, 1)) * s.float().repeat_interleave(GROUP, 1)
    return parts, w, nib


def graph_time(fn_list, torch=None, reps=15):
    from compiler.timing import graph_time as _graph_time

    return _graph_time(fn_list, reps)


def rel_err(y, ref):
    y = y.float()
    if not bool(y.isfinite().all()):
        return float("nan")
    return float((y - ref).norm() / ref.norm())


def nibble_kernel_for(m):
    from compiler.dispatch import kernel_for

    return kernel_for(m)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES))
    ap.add_argument("--ms", default=None, help=f"default {MS}; with --candidates {CANDIDATE_MS}")
    ap.add_argument("--candidates", action="store_true",
                    help="time every dispatch candidate copy at every M (and GEMM split_k variants)")
    ap.add_argument("--variants", default=None,
                    help="with --candidates: only these MMA_VARIANTS / WGMMA_VARIANTS names (comma-separated)")
    ap.add_argument("--splits", default=",".join(map(str, SPLITS)), help="split_k variants with --candidates")
    ap.add_argument("--no-dlight", action="store_true", help="skip stock dlight (implied by --candidates)")
    ap.add_argument("--name", default=None, help="output file stem (default bench_linear, with "
                    "--candidates bench_linear_candidates): NAME.json / NAME.md in --out")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 2),
                    help="parallel compile processes (at most one per module)")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in (args.ms or ",".join(map(str, CANDIDATE_MS if args.candidates else MS))).split(",")]
    splits = tuple(int(v) for v in args.splits.split(",") if v) if args.candidates else ()
    dlight = not (args.no_dlight or args.candidates)
    if args.variants is not None:  # the spawned compile workers filter on import: through the environment
        os.environ[VARIANTS_ENV] = args.variants
        _keep_variants()
    out = Path(args.out)
    stem = args.name or ("bench_linear_candidates" if args.candidates else "bench_linear")

    t_start = time.time()
    # one module per shape (its split variants in a second one), compiled in parallel: nvcc dominates
    jobs = [Job(k, n, tuple(ms), args.candidates, (), dlight) for k, n in shapes]
    if splits:
        jobs += [Job(k, n, tuple(ms), True, splits, False, only_splits=True) for k, n in shapes]
    if args.candidates:
        jobs.append(Job(*CHECK, tuple(ms), True, (), False, symmetric=False, bias=True, numerics_only=True))
    workers = min(args.jobs, len(jobs))
    built = build_all(jobs, workers)  # before torch takes the GPU: plain CPU processes
    t_built = time.time() - t_start
    print(f"compiled {len(jobs)} modules ({sum(len(b[1]) for b in built)} kernels) in {t_built:.0f} s "
          f"with {workers} processes", flush=True)

    import torch
    import tvm

    from compiler.cuda import ensure_cuda_runtime

    ensure_cuda_runtime()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32, not TF32
    meta = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tvm": tvm.__version__,
        "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": platform.node(), "mode": "candidates" if args.candidates else "default",
        "compile_s": round(t_built, 1), "method": "median of 15 CUDA-graph replays of %d launches, "
        "weights rotated over > %d MiB" % (LAUNCHES, ROTATE_BYTES >> 20)}
    print(json.dumps(meta), flush=True)
    rows, checks = [], []
    for job, (path, names, labels) in zip(jobs, built):
        if job.only_splits:
            continue  # measured with its shape's copies
        libs = [tvm.runtime.load_module(path)]
        kernels = {name: libs[0][name] for name in names}
        for other, (opath, onames, olabels) in zip(jobs, built):
            if (other.only_splits and opath and (other.k, other.n) == (job.k, job.n)
                    and not job.numerics_only):
                libs.append(tvm.runtime.load_module(opath))
                kernels.update({name: libs[-1][name] for name in onames})
                labels = {**labels, **olabels}
        if job.numerics_only:
            checks += check_numerics(job, kernels, labels)
        else:
            rows += measure_shape(job, kernels, labels, meta)
        write(out, meta, rows, checks, stem)  # after every shape: a run cut short keeps what it measured
        del kernels, libs
        torch.cuda.empty_cache()
    meta["total_s"] = round(time.time() - t_start, 1)
    write(out, meta, rows, checks, stem)
    print((out / f"{stem}.md").read_text())
    bad = [(r["K"], r["N"], r["M"], name, err) for r in rows for name, err in _nibble_errs(r)
           if not err <= ERR_MAX]
    bad += [(c["K"], c["N"], c["M"], c["kernel"] + " asym+bias", c["err"]) for c in checks if not c["err"] <= ERR_MAX]
    for b in bad:
        print("NUMERICS FAILED (K, N, M, kernel, rel. error):", b)
    return 1 if bad else 0


def check_numerics(job: Job, kernels: dict, labels: dict) -> list[dict]:
    """Every compiled copy at every M it serves (zero points + bias): rel. error vs fp32."""
    import torch
    import tvm

    from compiler.dispatch import candidates_for

    parts, w, _ = random_weights(job.n, job.k, job.symmetric, job.bias, seed=1)
    order = [p for p in ("qweight", "scales", "zeros", "bias") if p in parts]
    wargs = [tvm.runtime.from_dlpack(parts[p]) for p in order]
    out = []
    for m in job.ms:
        x = torch.randn(m, job.k, device=DEVICE, dtype=torch.float16)
        ref = x.float() @ w.t() + (parts["bias"].float() if job.bias else 0)
        for name in candidates_for(m):
            if name not in kernels:
                continue
            y = torch.full((m, job.n), float("nan"), device=DEVICE, dtype=torch.float16)
            kernels[name](tvm.runtime.from_dlpack(x), *wargs, tvm.runtime.from_dlpack(y))
            torch.cuda.synchronize()
            out.append({"K": job.k, "N": job.n, "M": m, "kernel": name, "what": "asym+bias",
                        "config": labels.get(name, ""), "err": rel_err(y, ref)})
        print(f"check K={job.k} N={job.n} asym+bias M={m}: " + " ".join(
            f"{c['kernel']} {c['err']:.1e}" for c in out if c["M"] == m), flush=True)
    return out


def measure_shape(job: Job, kernels: dict, labels: dict, meta: dict) -> list[dict]:
    """Numerics, then times of every kernel of one shape at every M (one row per M)."""
    import torch
    import torch.nn.functional as F
    import tvm

    from compiler.dispatch import candidates_for, kernel_for

    k, n = job.k, job.n
    t0 = time.time()
    parts, w_deq, nib = random_weights(n, k)
    q, sc = parts["qweight"], parts["scales"]
    wbytes = q.numel() * 4 + sc.numel() * 2
    copies = max(2, math.ceil(ROTATE_BYTES / wbytes))
    wargs = [(tvm.runtime.from_dlpack(q), tvm.runtime.from_dlpack(sc))]
    keep = [(q, sc)]  # the torch tensors behind the TVM views stay alive
    for _ in range(copies - 1):
        keep.append((q.clone(), sc.clone()))
        wargs.append((tvm.runtime.from_dlpack(keep[-1][0]), tvm.runtime.from_dlpack(keep[-1][1])))
    w16 = w_deq.half()
    w16s = [w16] + [w16.clone() for _ in range(max(2, math.ceil(ROTATE_BYTES / (w16.numel() * 2))) - 1)]
    tiny = None  # torch's int4 kernel: uint8 [N, K/2] (two nibbles per byte, even k in the high nibble)
    try:
        packed_u8 = ((nib[:, ::2] << 4) | nib[:, 1::2]).to(torch.uint8)
        wp = torch._convert_weight_to_int4pack(packed_u8, 8)
        s_bf = sc.to(torch.bfloat16).t().contiguous()  # [K/G, N]
        sz = torch.stack([s_bf, torch.zeros_like(s_bf)], dim=2)  # w = (q - 8) * s + 0
        tiny = [(wp.clone(), sz.clone()) for _ in range(max(2, math.ceil(ROTATE_BYTES / (wp.numel() * wp.element_size()))))]
    except Exception as e:  # noqa: BLE001
        print(f"tinygemm unavailable: {e!r}"[:300], flush=True)
    del nib
    print(f"K={k} N={n}: weights made in {time.time() - t0:.1f} s; {copies} weight copies", flush=True)
    to_tvm = tvm.runtime.from_dlpack
    sel = lambda lst: [lst[i % len(lst)] for i in range(LAUNCHES)]  # noqa: E731
    rows = []
    for m in job.ms:
        route = kernel_for(m)
        row = {"K": k, "N": n, "M": m, "kernel": route, "config": labels.get(route, "")}
        x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
        ref = x.float() @ w_deq.t()
        y = torch.full((m, n), float("nan"), device=DEVICE, dtype=torch.float16)
        tx, ty = to_tvm(x), to_tvm(y)

        def run(fn):  # numerics (fresh inputs, poisoned output), then the time
            y.fill_(float("nan"))
            fn(tx, wargs[0][0], wargs[0][1], ty)
            torch.cuda.synchronize()
            err = rel_err(y, ref)
            return err, graph_time([lambda a=a: fn(tx, a[0], a[1], ty) for a in sel(wargs)], torch)

        row["err_nibble"], row["t_nibble"] = run(kernels[route])
        if f"dlight_m{m}" in kernels:
            row["err_dlight"], row["t_dlight"] = run(kernels[f"dlight_m{m}"])
        row["err_cublas"] = rel_err(F.linear(x, w16), ref)
        xb = x.to(torch.bfloat16)
        if tiny is not None:
            try:
                row["err_tinygemm"] = rel_err(torch._weight_int4pack_mm(xb, tiny[0][0], GROUP, tiny[0][1]), ref)
            except Exception as e:  # noqa: BLE001
                print(f"tinygemm failed: {e!r}"[:300], flush=True)
                tiny = None
        mbytes = wbytes + (m * k + m * n) * 2
        half = mbytes // 2 // 2  # fp16 elements: a copy reading + writing mbytes in total
        cps = max(2, math.ceil(ROTATE_BYTES / (2 * half)))
        srcs = [torch.randn(half, device=DEVICE, dtype=torch.float16) for _ in range(cps)]
        dsts = [torch.empty_like(s) for s in srcs]
        row["t_copy"] = graph_time([lambda s=s, d=d: d.copy_(s) for s, d in sel(list(zip(srcs, dsts)))], torch)
        del srcs, dsts
        row["t_cublas"] = graph_time([lambda w_=w_: F.linear(x, w_) for w_ in sel(w16s)], torch)
        if tiny is not None:
            row["t_tinygemm"] = graph_time(
                [lambda t=t: torch._weight_int4pack_mm(xb, t[0], GROUP, t[1]) for t in sel(tiny)], torch)
        for vname in VARIANTS:  # GEMV config variants (default mode)
            if f"{route}_{vname}" in kernels and m in VARIANT_MS:
                row[f"err_{vname}"], row[f"t_{vname}"] = run(kernels[f"{route}_{vname}"])
        if job.candidates:
            row["cand"] = {}
            for name in candidates_for(m):
                if name in kernels:
                    err, t = (row["err_nibble"], row["t_nibble"]) if name == route else run(kernels[name])
                    row["cand"][name] = {"us": t * 1e6, "err": err, "config": labels.get(name, "")}
            copy = split_variant_copies(m)
            row["splits"] = {}
            for name in sorted(kernels):
                if copy and name.startswith(copy + "_s"):
                    err, t = run(kernels[name])
                    row["splits"][name] = {"us": t * 1e6, "err": err, "config": labels.get(name, "")}
            if copy in row["cand"]:
                row["splits"][copy] = dict(row["cand"][copy])  # the auto split, for comparison
            row["variants"] = {}  # tensor-core GEMV config variants of the mma copies serving m
            for c in row["cand"]:
                for name in sorted(kernels):
                    if _bound(c)[1] in VARIANT_SETS and name.startswith(c + "_"):
                        err, t = run(kernels[name])
                        row["variants"][name] = {"us": t * 1e6, "err": err, "config": name[len(c) + 1:]}
        row["bytes"] = mbytes
        row["GBps_nibble"] = mbytes / row["t_nibble"] / 1e9
        row["TFLOPs_nibble"] = 2 * m * n * k / row["t_nibble"] / 1e12
        rows.append(row)
        print(_line(row), flush=True)
    del w16s, tiny, wargs, keep
    return rows


# -- reporting -------------------------------------------------------------------------------------

def write(out, meta, rows, checks=(), stem="bench_linear"):
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "checks": list(checks)},
                                                      indent=1))
    md = [f"# int4 linear on {meta['device']} ({meta['date']})", "",
          f"torch {meta['torch']}, CUDA {meta['cuda']}, TVM {meta['tvm']}; {meta['method']}.", "",
          "us per call; x copy = time / same-bytes copy time; cuBLAS/nibble = speedup over cuBLAS fp16; "
          "kernel = the copy compiler/dispatch.py runs at this M", "",
          "| K->N | M | kernel | copy us | nibble us | nibble x copy | GB/s | TFLOP/s | cuBLAS us | cuBLAS/nibble | "
          "tinygemm us | dlight us | err nibble |", "|" + "---|" * 13]
    md += [_md(r) for r in rows]
    cand_rows = [r for r in rows if r.get("cand")]
    if cand_rows:
        names = []
        for r in cand_rows:
            names += [c for c in r["cand"] if c not in names]
        md += ["", "## Every bucket copy that can serve M (us; * = the routed copy; best vs cuBLAS fp16)", "",
               "| K->N | M | cuBLAS us | " + " | ".join(names) + " | best | best/cuBLAS |",
               "|" + "---|" * (len(names) + 5)]
        for r in cand_rows:
            best = min(r["cand"], key=lambda c: r["cand"][c]["us"])
            cells = [(f"{r['cand'][c]['us']:.1f}" + ("*" if c == r["kernel"] else "")) if c in r["cand"] else ""
                     for c in names]
            md.append(f"| {r['K']}->{r['N']} | {r['M']} | {r['t_cublas'] * 1e6:.1f} | " + " | ".join(cells)
                      + f" | {best} | {r['t_cublas'] * 1e6 / r['cand'][best]['us']:.2f} |")
        md += ["", "Best copy per M, summed over the shapes (what dispatch.ROUTES should say):", ""]
        for m in sorted({r["M"] for r in cand_rows}):
            tot = {}
            for r in cand_rows:
                if r["M"] == m:
                    for c, v in r["cand"].items():
                        tot.setdefault(c, []).append(v["us"])
            full = {c: sum(v) for c, v in tot.items() if len(v) == max(map(len, tot.values()))}
            ranked = sorted(full, key=full.get)
            md.append(f"- M={m}: " + ", ".join(f"{c} {full[c]:.1f} us" for c in ranked[:4])
                      + f" (routed: {next(r['kernel'] for r in cand_rows if r['M'] == m)})")
        md += ["", "GEMM copies (tile, K split) per shape:", ""]
        for shape in sorted({(r["K"], r["N"]) for r in cand_rows}):
            cfgs = {c: v["config"] for r in cand_rows if (r["K"], r["N"]) == shape for c, v in r["cand"].items()
                    if v["config"]}
            md.append(f"- {shape[0]}->{shape[1]}: " + "; ".join(f"{c} {cfgs[c]}" for c in sorted(cfgs, key=_order)))
        split_rows = [r for r in cand_rows if r.get("splits")]
        if split_rows:
            md += ["", "## split_k of the smallest GEMM bucket serving M (us; tile fixed; * = the auto split)", "",
                   "| K->N | M | copy | " + " | ".join(f"split {s}" for s in SPLITS) + " |",
                   "|" + "---|" * (len(SPLITS) + 3)]
            for r in split_rows:
                copy = split_variant_copies(r["M"])
                by_split = {}
                for name, v in r["splits"].items():
                    s = int(v["config"].rsplit("split ", 1)[1]) if "split " in v["config"] else None
                    by_split[s] = f"{v['us']:.1f}" + ("*" if name == copy else "")
                md.append(f"| {r['K']}->{r['N']} | {r['M']} | {copy} ({r['cand'].get(copy, {}).get('config', '')}) | "
                          + " | ".join(by_split.get(s, "") for s in SPLITS) + " |")
    var_rows = [r for r in rows if r.get("variants")]
    if var_rows:
        names = sorted({n for r in var_rows for n in r["variants"]}, key=lambda n: (_order(n.split("_")[0]), n))
        bases = sorted({n.split("_")[0] for n in names}, key=_order)
        md += ["", "## Config variants of the tensor-core GEMV (mma) and the wgmma GEMM (us; bench_linear."
               "MMA_VARIANTS, WGMMA_VARIANTS)", "",
               "| K->N | M | cuBLAS us | " + " | ".join(bases + names) + " |", "|" + "---|" * (len(bases + names) + 3)]
        for r in var_rows:
            cells = [f"{r['t_cublas'] * 1e6:.1f}"] + [f"{r['cand'][c]['us']:.1f}" if c in r["cand"] else "" for c in bases]
            cells += [f"{r['variants'][n]['us']:.1f}" if n in r["variants"] else "" for n in names]
            md.append(f"| {r['K']}->{r['N']} | {r['M']} | " + " | ".join(cells) + " |")
    errs = [err for r in rows for _, err in _nibble_errs(r)]
    if errs:
        worst = max(errs, key=lambda e: math.inf if math.isnan(e) else e)
        md += ["", f"Numerics: max rel. error of every nibble kernel timed above {worst:.1e} "
               f"(bound {ERR_MAX:g}; NaN counts as a miss)."]
    if checks:
        md += ["", "## Zero points + bias: every bucket copy at every M it serves (rel. error)", "",
               "| K->N | M | " + " | ".join(sorted({c["kernel"] for c in checks}, key=_order)) + " |",
               "|" + "---|" * (2 + len({c["kernel"] for c in checks}))]
        for m in sorted({c["M"] for c in checks}):
            got = {c["kernel"]: c["err"] for c in checks if c["M"] == m}
            md.append(f"| {checks[0]['K']}->{checks[0]['N']} | {m} | " + " | ".join(
                _fmt(got.get(name), "{:.1e}") if name in got else "" for name in
                sorted({c["kernel"] for c in checks}, key=_order)) + " |")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")


def _nibble_errs(r) -> list:
    """(kernel, rel. error) of every nibble kernel run for a row (not cuBLAS, tinygemm or dlight)."""
    out = [(r["kernel"], r["err_nibble"])] + [(v, r[f"err_{v}"]) for v in VARIANTS if f"err_{v}" in r]
    return out + [(c, v["err"]) for key in ("cand", "splits", "variants") for c, v in r.get(key, {}).items()]


def _order(name):
    rows, kind = _bound(name)
    return (kind == "gemm", rows if rows is not None else 1 << 30)


def _fmt(v, f="{:.1f}"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f.format(v)


def _line(r):
    us = lambda key: _fmt(r.get(key) and r[key] * 1e6)  # noqa: E731
    s = (f"K={r['K']:5d} N={r['N']:5d} M={r['M']:4d} copy {us('t_copy')} nibble[{r['kernel']}] {us('t_nibble')} "
         f"dlight {us('t_dlight')} cublas {us('t_cublas')} tinygemm {us('t_tinygemm')} | err nibble "
         f"{r['err_nibble']:.1e} cublas {r['err_cublas']:.1e} tiny {_fmt(r.get('err_tinygemm'), '{:.1e}')}"
         + "".join(f" | {v} {us('t_' + v)} ({r['err_' + v]:.0e})" for v in VARIANTS if "t_" + v in r))
    for key in ("cand", "splits", "variants"):
        if r.get(key):
            s += f"\n    {key}: " + "  ".join(f"{c} {v['us']:.1f} ({v['err']:.0e})" for c, v in r[key].items())
    return s


def _md(r):
    us = lambda key: _fmt(r.get(key) and r[key] * 1e6)  # noqa: E731
    return (f"| {r['K']}->{r['N']} | {r['M']} | {r['kernel']} | {us('t_copy')} | {us('t_nibble')} | "
            f"{r['t_nibble'] / r['t_copy']:.2f} | {r['GBps_nibble']:.0f} | {r['TFLOPs_nibble']:.1f} | "
            f"{us('t_cublas')} | {r['t_cublas'] / r['t_nibble']:.2f} | {us('t_tinygemm')} | {us('t_dlight')} | "
            f"{r['err_nibble']:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
