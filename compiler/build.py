"""compile_model: import -> int4 pass -> merge of int4 linears sharing an input -> TVM build (our schedules
first, dlight after) -> artifact."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from . import artifact
from .errors import NibbleError
from .quantize import QuantConfig
from .target import resolve, tvm_target


@dataclasses.dataclass
class BuildOptions:
    target: str = "cuda"
    arch: str | None = None
    quantize: bool = True
    quant: QuantConfig = dataclasses.field(default_factory=QuantConfig)
    skip: tuple[str, ...] = ()
    min_size: int = 0
    merge: bool = True  # one int4 call per group of linears reading the same input (compiler/merge_linears.py)
    shapes: dict | None = None
    max_length: int | None = None  # tokens the model can attend to (recorded for generate's checks)
    tuning: str | bool | None = None  # a tuning log path; None: tuning_logs/<arch>.jsonl if present; False: none


def relax_pipeline(target):
    """TVM's default CUDA pipeline with our int4 schedule rules ahead of dlight's."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    from schedules import gpu_rules

    from .unfuse_scalars import unfuse_scalar_param_funcs

    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        unfuse_scalar_param_funcs,  # TVM 0.27's FuseTIR fails on scalar params (HF decoders have them)
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dl.ApplyDefaultSchedule(*gpu_rules(target)),
    ]
    passes = (cuda.library_dispatch_passes(target) + legalize + cuda.dataflow_lower_passes(target)
              + cuda.finalize_passes(target))

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def prepare(mod, spec: dict, tuning=None, log=print):
    """The target-specific rewrites before the build: token-count dispatch (CUDA), tuned configs.
    Returns (mod, {task key: applied record or None}) covering every tunable kernel."""
    from .tuning import apply_records, extract_tasks

    if spec["kind"] == "cuda":
        from .dispatch import dispatch_small_m
        from .fuse_add_rmsnorm import fuse_add_rmsnorm
        from .fuse_attention import fuse_decode_attention
        from .fuse_qkv_rope import fuse_qkv_rope
        from .fuse_rmsnorm import fuse_rmsnorm
        from .fuse_swiglu import fuse_swiglu

        mod, norms = fuse_rmsnorm(mod)  # RMSNorm: one kernel instead of two
        mod, add_norms = fuse_add_rmsnorm(mod)  # and the residual add before it in the same kernel
        mod, fused = fuse_decode_attention(mod)  # decode attention: one kernel (schedules/attention.py)
        mod, heads = fuse_qkv_rope(mod)  # q, k, v heads (RoPE, transposes): one kernel per projection
        if fused or norms:
            log(f"{fused} attention blocks fused for decode, {norms} RMSNorms made one op")
        if heads:
            log(f"{heads} q/k/v projections split into rotated heads by one kernel each")
        if add_norms:
            log(f"{add_norms} residual adds fused into the RMSNorm that follows")
        mod, swiglus = fuse_swiglu(mod, spec["arch"])  # SwiGLU: written by its gate/up projection's GEMV
        if swiglus:
            log(f"{swiglus} SwiGLUs computed by their gate/up projection's decode GEMV")
        mod = dispatch_small_m(mod, arch=spec["arch"])  # int4 kernels: a copy per token bucket
    mod, applied = apply_records(mod, spec, tuning, log)
    return mod, {t.key: applied.get(t.key) for t in extract_tasks(mod, spec)}


def build_module(mod, spec: dict, tuning=None, log=print, kernels: dict | None = None):
    """Relax module -> TVM VM executable for the resolved target spec. `tuning`: a TuningLog whose
    best records configure our schedules; `kernels` (a dict) receives prepare()'s per-kernel report."""
    import tvm

    target = tvm_target(spec)
    mod, report = prepare(mod, spec, tuning, log)
    if kernels is not None:
        kernels.update(report)
    if spec["kind"] == "cuda":
        from .cuda import ensure_cuda_runtime, register_nvcc_callback

        ensure_cuda_runtime()
        register_nvcc_callback(spec["arch"])
        return tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
    from tvm.s_tir import dlight as dl

    from schedules.cpu import Int4MatmulCPU

    with target:
        mod = dl.ApplyDefaultSchedule(Int4MatmulCPU())(mod)
    return tvm.compile(mod, target=target)


def tuning_log_for(opts: "BuildOptions", spec: dict, log=print):
    """The TuningLog a compile uses: --tuning-log PATH, none with --no-tuning, else the default one."""
    from .tuning import TuningLog

    if opts.tuning is False:
        return None
    if opts.tuning:
        path = Path(opts.tuning)
        if not path.exists():
            raise NibbleError(f"--tuning-log {path}: no such file")
        return TuningLog(path, spec)
    default = TuningLog.default(spec)
    return default if default.path.exists() else None


def quantize(mod, params: dict, opts: BuildOptions, log=print):
    """The int4 pass, then (opts.merge) one int4 call per group of linears that read the same input.
    Returns (mod, params, PassReport); the report's merged layers carry a note saying so."""
    from .int4_pass import quantize_linears
    from .merge_linears import int4_calls, merge_linears

    mod, params, report = quantize_linears(mod, params, opts.quant, opts.skip, opts.min_size)
    log(report.summary())
    for layer in report.layers:
        if layer.why:
            log(f"  {layer.name} [{layer.n}x{layer.k}]: {layer.why}")
    if opts.merge and report.quantized:
        before = int4_calls(mod)
        mod, params, merged = merge_linears(mod, params, report)
        if merged:
            after = int4_calls(mod)
            log(f"merged {merged} int4 linears that share an input into {after - (before - merged)} calls "
                f"({before} -> {after} int4 calls)")
    return mod, params, report


def lower(imp, opts: BuildOptions, log=print):
    """An imported model as compile hands it to build_module (which adds prepare()'s target rewrites):
    the int4 pass unless opts.quantize is off, then, for a decoder with past, the main_new_kv entry.
    `nibble tune` starts from the same module, so it tunes the kernels compile builds. Returns (mod,
    params, PassReport, the present outputs main_new_kv cuts: 0 without that entry)."""
    from .int4_pass import PassReport
    from .new_kv_entry import ENTRY as NEW_KV, add_new_kv_entry

    mod, params = imp.mod, imp.params
    if opts.quantize:
        mod, params, report = quantize(mod, params, opts, log)
    else:
        report = PassReport()
        log("--no-quantize: linear layers kept as imported")
    mod, cut = add_new_kv_entry(mod)  # decoders with past: an entry returning only the new cache slots
    if cut:
        log(f"entry {NEW_KV}: main with its {cut} present outputs cut to the new tokens' slots")
    return mod, params, report, cut


def compile_model(source, example_inputs=None, output: str | os.PathLike | None = None,
                  options: BuildOptions | None = None, log=print, **kw) -> Path:
    """Compile an .onnx/.pt2 path, nn.Module or ExportedProgram into an artifact folder; returns its path.

    Keyword arguments are BuildOptions fields (target="cuda", arch="sm_90", group_size=128, ...).
    """
    if "group_size" in kw or "symmetric" in kw:
        kw["quant"] = QuantConfig(kw.pop("group_size", 128), kw.pop("symmetric", True))
    opts = options or BuildOptions(**kw)
    spec = resolve(opts.target, opts.arch)  # before the slow import, so a bad target fails at once
    from frontends import import_model

    from .new_kv_entry import ENTRY as NEW_KV

    t0 = time.perf_counter()
    imp = import_model(source, example_inputs, opts.shapes)
    log(f"imported {imp.source} in {time.perf_counter() - t0:.1f} s")
    inputs = artifact.describe_inputs(imp.mod, imp.input_names)
    mod, params, report, cut = lower(imp, opts, log)
    entries = {"main": "main", **({"new_kv": NEW_KV} if cut else {})}
    t0 = time.perf_counter()
    tuning, kernels = tuning_log_for(opts, spec, log), {}
    ex = build_module(mod, spec, tuning, log, kernels)
    tuned = sum(r is not None for r in kernels.values())
    if kernels:
        log(f"{tuned} of {len(kernels)} kernels tuned" + (f" (records from {tuning.path})" if tuning else
                                                          " (no tuning log: template defaults)"))
    log(f"built for {spec['kind']}{' ' + spec['arch'] if 'arch' in spec else ''} in "
        f"{time.perf_counter() - t0:.1f} s")
    if output is None:
        stem = Path(source).stem if isinstance(source, (str, Path)) else type(source).__name__.lower()
        output = Path(f"{stem}.nibble")
    manifest = artifact.manifest(imp, mod, spec, opts, report, inputs)
    manifest["max_length"] = opts.max_length
    manifest["entries"] = entries
    manifest["kernels"] = {k: ({"tuned": True, "config": r["config"], "us": r["us"]} if r else {"tuned": False})
                           for k, r in kernels.items()}
    if spec["kind"] == "cuda" and int(spec["arch"][3:]) >= 90:  # resolve() gives "sm_XX"
        # the kernels a CUDA-graph decode may launch early (compiler/cuda_graph.py): Hopper and later
        # (before sm_90 the wait compiles to nothing and graphs take no programmatic edges)
        from .cuda_graph import waiting_kernels

        manifest["graph_wait_kernels"] = waiting_kernels(ex)
    path = artifact.write(Path(output), ex, params, manifest)
    log(f"wrote {path}")
    return path
