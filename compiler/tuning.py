"""Tuning: search each int4 and decode attention kernel's knobs on the real device; keep the best in tuning_logs/.

What is searched. Every schedule template in schedules/ names its knobs in a frozen `Config` dataclass
and their candidate values in `SPACE` ({field: (values...)}); a rule reads a per-function override from
the PrimFunc attr "nibble.config" (a dict of Config fields). A task is one kernel copy (a GEMV or GEMM
token bucket serving m = L..R, timed at both ends and scored by the sum, since a config that wins at R
can lose at L: run 5 in benchmarks/results/h200_tune.md; the unbounded GEMM, at PREFILL_M; or the CPU
kernel); its space is the product of SPACE's values. The decode attention kernels are tasks too: built by
their pass from TVMScript rather than scheduled by a rule, they are rebuilt with a config
(schedules/attention.py `rebuild`), timed at two cache lengths with the cache rotated past the L2.

How it is searched (compiler/search.py): with meta-schedule's pieces. The knobs are sampled decisions
(`sample_categorical` in a `ScheduleFn`, annotated on the PrimFunc's root block), `EvolutionarySearch`
proposes candidates ranked by its `XGBModel` cost model (features: each knob's value index), and every candidate
is a real build of our template timed on the device by `measure` (weights rotated past the L2, which
meta-schedule's runner does not do). Not meta-schedule's generic schedule rules: their space for a
1x4096x4096 int4 GEMV measured 2636 us on the H200 (hundreds of times dlight), and our decode GEMV's
dequantize trick cannot be reached with schedule primitives; the templates emit their own PrimFunc.

Records: one JSON object per line in tuning_logs/<arch>.jsonl, appended under an exclusive file lock
with a single write, so an interrupted tune loses at most the candidate in flight and two tunes on one
log never interleave partial lines. Loading skips corrupt lines (with a warning) and records for another
arch or an older template version (with a note). Not meta-schedule's JSONDatabase: its workload lines
are ~50 KB each (a base64 PrimFunc; ~5 MB for the Llama set), its records point at workload line numbers
in a second file and are appended without a lock, and it keeps no template version or default mark,
which MARGIN needs.
"""
from __future__ import annotations

import dataclasses
import fcntl
import importlib
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np

from .dispatch import KERNEL_ATTR, ROWS_ATTR, base_name
from .errors import NibbleError
from .int4_kernel import ATTR

CONFIG_ATTR = "nibble.config"  # PrimFunc attr: the Config fields a rule must use for this function
TEMPLATES = {"gemv": "schedules.gemv", "mma": "schedules.gemv_mma", "gemm": "schedules.gemm",
             "wgmma": "schedules.gemm_wgmma", "cpu": "schedules.cpu", "attention": "schedules.attention"}
DEFAULT_DIR = Path(os.environ.get("NIBBLE_TUNING_LOGS", Path(__file__).resolve().parents[1] / "tuning_logs"))
# token count the unbounded GEMM copy is tuned at (bucket copies: at their bound). It serves m > 1024 on
# sm_90 (> 256 on the fallback routes): at 512 the tuner once picked for 11008->4096 a 4-way K split of
# 192-token tiles that ran 0.74x the default's speed at 2048 tokens (benchmarks/results/h200_tune.md).
PREFILL_M = 2048
CPU_M = 16
FAILED_US = 1e29  # records at or above this time mark candidates that failed or were declined
# A candidate replaces the template default only if it measured at least this much faster than the default
# did: two copies of one kernel, timed in one run, read up to 5% apart on the H200 (an A/A run:
# benchmarks/results/h200_tune_run7_aa.md), so smaller wins are not evidence, and taking them made "tuned"
# read slower than the default (runs 5-6).
MARGIN = 0.05
L2_BYTES = 60 << 20  # H200/H100 L2; tuning measurements rotate more weight bytes than 3x this
MAX_COPIES = 1024  # ... in at most this many copies (one launch each in the timed graph)


@dataclasses.dataclass
class Task:
    key: str  # stable name: "<kernel>:<kind>[:[<low>-]<rows>]" (a bounded copy's token range; attention:
    # the key counts timed, attention_task)
    func: object  # tirx.PrimFunc (symbolic m)
    kind: str  # "gemv" | "mma" | "gemm" | "wgmma" | "cpu" | "attention"
    m: int  # token count measured at (a bounded copy: its bound R; attention: keys in the cache)
    calls: int = 1  # how often one model run calls it (its weight in the ETA and summary)
    low: int | None = None  # a bounded copy's smallest m (the previous bucket's bound + 1)

    @property
    def ms(self) -> tuple:
        """The token counts a candidate is timed at (its score: the sum)."""
        return (self.low, self.m) if self.low is not None and self.low < self.m else (self.m,)

    @property
    def template(self):
        return importlib.import_module(TEMPLATES[self.kind])

    @property
    def space(self) -> dict:
        """The knobs searched and their values: the template's SPACE (attention: by kernel variant)."""
        return self.template.space_for(self.func) if hasattr(self.template, "space_for") else self.template.SPACE

    @property
    def rebuilt(self) -> bool:
        """Whether a config is applied by building the kernel again (attention: a TVMScript kernel made
        by its pass) rather than by the "nibble.config" attr its schedule rule reads."""
        return hasattr(self.template, "rebuild")

    def with_config(self, config: dict):
        """The task's PrimFunc made to use `config`."""
        return self.template.rebuild(self.func, config) if self.rebuilt else self.func.with_attr(CONFIG_ATTR, config)

    def default(self, spec: dict | None = None) -> dict:
        """The config the template uses untuned for this target (its measured per-arch default)."""
        cfg = self.template.Config()
        if spec is not None and hasattr(self.template, "default_config"):
            from .target import tvm_target

            cfg = self.template.default_config(tvm_target(spec), self.func)
        return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(self.template.Config)}


def _kind(func, spec) -> str | None:
    if KERNEL_ATTR in func.attrs and str(func.attrs[KERNEL_ATTR]) == "attention":
        return "attention"
    if spec["kind"] == "llvm":
        return "cpu"
    return str(func.attrs[KERNEL_ATTR]) if KERNEL_ATTR in func.attrs else None


def extract_tasks(mod, spec: dict) -> list[Task]:
    """The tunable kernels of a module after the int4 pass (and, for CUDA, the dispatch pass): the int4
    kernels' copies and the decode attention kernels (compiler/fuse_attention.py)."""
    from tvm import relax, tirx

    from schedules.attention import ARGS_ATTR

    calls: dict[str, int] = {}  # callee -> calls in one run of the entry that calls it most
    for _, f in mod.functions_items():  # the entries (main, main_new_kv): a model run calls one of them
        if not (isinstance(f, relax.Function) and f.attrs is not None and "global_symbol" in f.attrs):
            continue
        here: dict[str, int] = {}

        def count(e, here=here):
            if isinstance(e, relax.Call) and hasattr(e.op, "name_hint"):
                here[e.op.name_hint] = here.get(e.op.name_hint, 0) + 1
            if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir":
                here[e.args[0].name_hint] = here.get(e.args[0].name_hint, 0) + 1

        relax.analysis.post_order_visit(f.body, count)
        for name, n in here.items():
            calls[name] = max(calls.get(name, 0), n)
    funcs = [(gv, f) for gv, f in mod.functions_items()
             if isinstance(f, tirx.PrimFunc) and f.attrs is not None and (ATTR in f.attrs or ARGS_ATTR in f.attrs)]
    bounds: dict[str, list[int]] = {}  # base kernel -> the bounds of its bucket copies
    for gv, func in funcs:
        if ROWS_ATTR in func.attrs:
            bounds.setdefault(base_name(gv.name_hint), []).append(int(func.attrs[ROWS_ATTR]))
    tasks = []
    for gv, func in funcs:
        kind = _kind(func, spec)
        if kind not in TEMPLATES:
            continue
        if kind == "attention":  # called by its dispatch function (one-block or split by the keys)
            tasks.append(attention_task(func, calls.get(gv.name_hint.removesuffix("_split") + "_dispatch", 1)))
            continue
        base = base_name(gv.name_hint)
        n = calls.get(base + "_dispatch", calls.get(gv.name_hint, 1))
        rows = int(func.attrs[ROWS_ATTR]) if ROWS_ATTR in func.attrs else None
        if kind in ("gemv", "mma", "gemm", "wgmma") and rows is not None:
            low = max((b for b in bounds[base] if b < rows), default=0) + 1
            span = f"{low}-{rows}" if low < rows else f"{rows}"
            tasks.append(Task(f"{base}:{kind}:{span}", func, kind, rows, n, low))
        elif kind in ("gemm", "wgmma"):
            tasks.append(Task(f"{base}:{kind}", func, kind, PREFILL_M, n))
        else:
            tasks.append(Task(f"{base}:cpu", func, kind, CPU_M, n))
    return sorted(tasks, key=lambda t: t.key)


def attention_task(func, calls: int = 1) -> Task:
    """The task of a decode attention kernel (schedules/attention.py), keyed by every argument that builds a
    different kernel but the scale (the pass's function names carry a counter), and the key counts it is
    timed at: "attention_h32_d128_f16f16f32f16_maskb1s_kv2_bshd_early:attention:257-2048" is main_new_kv's
    split kernel for fp16 q / cache / output and an fp32 [b, 1, s, T] mask."""
    from schedules.attention import TUNE_KEYS, _args, is_split

    a = _args(func)
    short = {"float16": "f16", "float32": "f32", "bfloat16": "bf16"}
    dt = "".join(short.get(a["dtypes"][x], a["dtypes"][x]) for x in ("q", "kv", "bias", "out"))
    name = (f"attention_h{a['heads']}_d{a['head_dim']}_{dt}_mask{''.join(map(str, a['bias_dims']))}"
            + ("_kv2" if a["two_source"] else "") + f"_{a['out_layout']}" + ("_early" if a["early_loads"] else ""))
    low, keys = TUNE_KEYS[is_split(func)]
    return Task(f"{name}:attention:{low}-{keys}", func, "attention", keys, calls, low)


# -- records -----------------------------------------------------------------------------------------

def _arch(spec: dict) -> str:
    return spec.get("arch") or spec.get("mcpu") or spec["kind"]


class TuningLog:
    """Append-only JSONL records of measured candidates for one arch."""

    def __init__(self, path: Path, spec: dict):
        self.path, self.arch = Path(path), _arch(spec)

    @classmethod
    def default(cls, spec: dict) -> "TuningLog":
        return cls(DEFAULT_DIR / f"{_arch(spec)}.jsonl", spec)

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one writer at a time, whole lines only
            os.write(fd, line)
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def records(self, versions: dict[str, int] | None = None, log=print) -> list[dict]:
        """Valid records for this arch (and current template versions), in file order."""
        if not self.path.exists():
            return []
        out, other = [], {}
        for i, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                r["key"], r["config"], r["us"], r["arch"]  # noqa: B018  (the fields we rely on)
            except (json.JSONDecodeError, KeyError, TypeError):
                warnings.warn(f"{self.path}:{i}: corrupt tuning record skipped")
                continue
            if r["arch"] != self.arch:
                other[r["arch"]] = other.get(r["arch"], 0) + 1
                continue
            if versions and r.get("version") != versions.get(r.get("kind")):
                what = f"{r.get('kind')} template v{r.get('version')}"
                other[what] = other.get(what, 0) + 1
                continue
            out.append(r)
        for what, n in other.items():
            log(f"note: {self.path.name}: ignored {n} record(s) for {what} (building for {self.arch})")
        return out

    def best(self, log=print) -> dict[str, dict]:
        """key -> the winning valid record: the fastest, unless the key's template-default record
        ("default": true) is within MARGIN of it, then that default."""
        by_key: dict[str, list[dict]] = {}
        for r in self.records(template_versions(), log):
            if r["us"] < FAILED_US:
                by_key.setdefault(r["key"], []).append(r)
        out = {}
        for key, recs in by_key.items():
            times = {i: r["us"] for i, r in enumerate(recs)}
            default = min((i for i, r in enumerate(recs) if r.get("default")), key=times.get, default=None)
            out[key] = recs[_winner(times, default)]
        return out


def template_versions() -> dict[str, int]:
    out = {}
    for kind, modname in TEMPLATES.items():
        try:
            out[kind] = getattr(importlib.import_module(modname), "VERSION", 1)
        except ImportError:
            pass
    return out


def apply_records(mod, spec: dict, log_: TuningLog | None, log=print):
    """Annotate every task's PrimFunc with its best recorded Config; returns (mod, {key: record})."""
    if log_ is None:
        return mod, {}
    best = log_.best(log)
    applied = {}
    for task in extract_tasks(mod, spec):
        r = best.get(task.key)
        if r is None:
            continue
        gv = next(g for g, f in mod.functions_items() if f.same_as(task.func))
        mod[gv] = task.with_config(r["config"])
        applied[task.key] = r
    return mod, applied


def config_from(func, Config, default):
    """The Config a rule should use for func: its "nibble.config" attr if tuned, else default."""
    if func.attrs is None or CONFIG_ATTR not in func.attrs:
        return default
    py = lambda v: v.value if hasattr(v, "value") else v  # IntImm / FloatImm -> int / float
    given = {str(k): py(v) for k, v in dict(func.attrs[CONFIG_ATTR]).items()}
    return dataclasses.replace(default, **{k: v for k, v in given.items() if k in {f.name for f in dataclasses.fields(Config)}})


# -- measuring ---------------------------------------------------------------------------------------

def _shape(buf, m: int, sizes: dict) -> list[int]:
    """buf's shape with its symbolic dims given values: by name from `sizes`, else m."""
    from tvm import sym, tirx

    ana = sym.Analyzer()
    for v in {v for d in buf.shape for v in tirx.analysis.undefined_vars(d)}:
        ana.bind(v, tirx.IntImm(str(v.ty.dtype), sizes.get(v.name, m)))
    return [int(ana.simplify(d)) for d in buf.shape]


def _random_arg(buf, m: int, rng, sizes: dict | None = None) -> np.ndarray:
    """Random data for one kernel argument at m tokens (weights random bits, small scales, zeros = 8)."""
    shape = _shape(buf, m, sizes or {})
    dt = str(buf.dtype)
    if dt == "uint32":
        return rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32)
    if buf.name == "zeros":
        return np.full(shape, 8, dt)
    return (rng.standard_normal(shape) * (0.02 if buf.name == "scales" else 1.0)).astype(dt)


def measure(task: Task, config: dict, spec: dict, dev, repeat: int = 7, sets: dict | None = None) -> float:
    """The task's score for `config`: median microseconds of one call of its kernel, summed over the
    token counts task.ms (built once). `sets`: the caller's cache of this task's weight copies, kept
    across its candidates (random data: making 3x the L2 of it took longer than timing a candidate)."""
    import tvm
    from tvm.s_tir import dlight as dl

    from .target import tvm_target

    target = tvm_target(spec)
    mod = tvm.IRModule({"main": task.with_config(config).with_attr("global_symbol", "main")})
    if not task.rebuilt:  # our schedule rule, reading the config from the attr
        rule = task.template.rule() if hasattr(task.template, "rule") else None
        if rule is None:
            raise NibbleError(f"schedule template {TEMPLATES[task.kind]} has no rule() to tune")
        with target:
            mod = dl.ApplyDefaultSchedule(rule)(mod)
    if not (mod["main"].attrs and mod["main"].attrs.get("tirx.is_scheduled")):
        return float("inf")  # the template declined this config
    lib = tvm.compile(mod, target=target)
    params = list(mod["main"].params)  # TVM 0.27: typed buffers (name, shape, dtype)
    rng = np.random.default_rng(0)
    rotate = getattr(task.template, "ROTATE", _WEIGHTS)
    sizes = task.template.sizes if hasattr(task.template, "sizes") else (lambda m: {})
    # weights: independent of m, made once for every m of task.ms; a KV cache grows with m (its keys)
    fixed = all(not tvm.tirx.analysis.undefined_vars(d) for p in params if p.name in rotate for d in p.shape)
    sets = {} if sets is None else sets
    total = 0.0
    for m in task.ms:
        key = None if fixed else m
        if key not in sets:
            sets[key] = _weight_sets(params, rotate, m, sizes(m), spec, dev, rng)
        total += _time_at(lib, params, sets[key], m, sizes(m), spec, dev, repeat, rng)
    return total


_WEIGHTS = ("qweight", "scales", "zeros")  # the int4 kernels' params timed with copies rotated past the L2


def _weight_sets(params, rotate, m: int, sizes: dict, spec: dict, dev, rng) -> list[dict]:
    """The arguments named in `rotate` ({param index: device tensor}): one set, or on the GPU enough copies
    to exceed 3x the L2, so that each launch of a timed graph reads them from HBM as in a model."""
    import tvm

    idx = [i for i, p in enumerate(params) if p.name in rotate]
    host = {i: _random_arg(params[i], m, rng, sizes) for i in idx}
    per_copy = sum(h.nbytes for h in host.values())
    # (capped: a 64-key cache of a small model would take thousands of copies; 1024 still exceed the L2)
    n = min(MAX_COPIES, max(1, -(-3 * L2_BYTES // per_copy))) if spec["kind"] == "cuda" and per_copy else 1
    return [{i: tvm.runtime.tensor(h if c == 0 else _random_arg(params[i], m, rng, sizes), dev)
             for i, h in host.items()}
            for c in range(n)]


def _time_at(lib, params, sets: list[dict], m: int, sizes: dict, spec: dict, dev, repeat: int, rng) -> float:
    """Median microseconds of one call of lib's "main" at m tokens (weights from `sets`)."""
    import tvm

    args = [None if i in sets[0] else tvm.runtime.tensor(_random_arg(p, m, rng, sizes), dev)
            for i, p in enumerate(params)]
    copies = [[s.get(i, a) for i, a in enumerate(args)] for s in sets]
    if spec["kind"] != "cuda":
        ev = lib.mod.time_evaluator("main", dev, number=1, repeat=repeat)
        return float(np.median(ev(*copies[0]).results)) * 1e6
    # GPU: launches captured in a CUDA graph, each on its own copy of the weights (more than 3x the L2
    # in all) so the kernel reads HBM as in a model; see compiler/timing.py for why not a host loop. At
    # least 24, and one per copy: 24 copies of a small KV cache would fit in the L2 together
    from .timing import graph_time

    f = lib["main"]
    return graph_time([lambda c=copies[i % len(copies)]: f(*c) for i in range(max(24, len(copies)))], reps=repeat) * 1e6


# -- search ------------------------------------------------------------------------------------------

def _fastest(measured: dict[str, float]) -> str | None:
    """The measured config (its JSON key) with the lowest time that did not fail, or None."""
    ok = {k: v for k, v in measured.items() if v < FAILED_US}
    return min(ok, key=ok.get) if ok else None


def _winner(measured: dict, default=None):
    """The fastest measured key, or `default` (the template default's key, if measured) unless the
    fastest beats it by MARGIN."""
    best = _fastest(measured)
    if best is not None and default in measured and measured[default] < FAILED_US \
            and measured[best] > measured[default] * (1 - MARGIN):
        return default
    return best


def _workload(task: Task):
    """The IRModule meta-schedule searches for a task: its int4 PrimFunc with m fixed to the token count it
    is tuned at (meta-schedule's argument info needs constant shapes); an attention kernel at that many
    keys, its body under a root block (where the search annotates its knobs)."""
    import tvm

    if task.rebuilt:
        from tvm.s_tir.stmt import SBlock, SBlockRealize

        f = task.template.rebuild(task.func, {}, task.template.sizes(task.m))
        f = f.with_body(SBlockRealize([], True, SBlock([], [], [], "root", f.body)))
        return tvm.IRModule({"main": f.with_attr("global_symbol", "main")})

    from schedules.template import is_swiglu

    from .int4_kernel import int4_matmul_func
    from .quantize import QuantConfig

    a = task.func.attrs[ATTR]
    f = int4_matmul_func(int(a["n"]), int(a["k"]), QuantConfig(int(a["group_size"]), bool(a["symmetric"])),
                         str(a["x_dtype"]), bool(a["has_bias"]), is_swiglu(a), m=task.m)
    return tvm.IRModule({"main": f.with_attr("global_symbol", "main")})


def _budgets(tasks: list[Task], trials: int) -> dict[str, int]:
    """Trials per task: one each (the template default), then the rest of `trials` split by call weight
    (largest remainders rounded up), at most a task's space size (what a task cannot use goes to the
    others). They add up to `trials` unless there are more tasks than trials or too few configs."""
    size = {t.key: math.prod(len(v) for v in t.space.values()) for t in tasks}
    out = {t.key: 1 for t in tasks}
    left, pending = trials - len(tasks), [t for t in tasks if size[t.key] > 1]
    while left > 0 and pending:
        w = sum(t.calls for t in pending) or 1
        share = {t.key: left * t.calls / w for t in pending}
        full = [t for t in pending if out[t.key] + share[t.key] >= size[t.key]]
        for t in full:  # a space within its share: measured whole, the rest shared again
            left -= size[t.key] - out[t.key]
            out[t.key] = size[t.key]
            pending.remove(t)
        if full:
            continue
        add = {k: int(v) for k, v in share.items()}
        calls = {t.key: t.calls for t in pending}  # ties in the remainders: the more-called first
        ranked = sorted(share, key=lambda k: (round(share[k] - add[k], 9), calls[k]), reverse=True)
        for k in ranked[: left - sum(add.values())]:
            add[k] += 1
        for k, v in add.items():
            out[k] += v
        break
    return out


def tune(tasks: list[Task], spec: dict, log_: TuningLog, trials: int, resume: bool = False,
         batch: int = 4, out=print, seed: int = 0) -> dict[str, dict]:
    """Tune every task with up to `trials` candidates in total (split by call weight); returns the best
    record per task. With resume, measured candidates already in the log count and are not re-run."""
    from .runtime import _device
    from .search import Search
    from .target import tvm_target

    dev = _device("cuda" if spec["kind"] == "cuda" else "cpu")
    if spec["kind"] == "cuda":
        from .cuda import ensure_cuda_runtime, register_nvcc_callback

        ensure_cuda_runtime()
        register_nvcc_callback(spec["arch"])
    versions = template_versions()
    previous: dict[str, dict[str, float]] = {}
    for r in log_.records(versions, out) if resume else []:
        previous.setdefault(r["key"], {})[json.dumps(r["config"], sort_keys=True)] = r["us"]
    budget = _budgets(tasks, trials)
    total = sum(budget.values())
    best: dict[str, dict] = {}
    t_start, done_trials = time.perf_counter(), 0
    for ti, task in enumerate(tasks, 1):
        sets: dict = {}  # this task's weight copies, for all its candidates (freed with the next task)
        measured = dict(previous.get(task.key, {}))
        default = task.default(spec)
        search = Search(_workload(task), task.space, task.template.Config, tvm_target(spec), batch, seed)
        # a resumed log's failed candidates (recorded as >= FAILED_US) go to the search as failures
        search.seed([(json.loads(k), us if us < FAILED_US else float("inf")) for k, us in measured.items()])
        first = [default] if json.dumps(default, sort_keys=True) not in measured else []
        n_new = 0
        while n_new < budget[task.key]:
            cands, proposed = (first, False) if first else (search.propose(), True)
            first = []
            if not cands:
                break
            times = []
            for cfg in cands[: budget[task.key] - n_new]:
                try:
                    us = measure(task, cfg, spec, dev, sets=sets)
                except Exception as e:  # a candidate that fails to build or run is a dead end, not fatal
                    out(f"  {task.key} {cfg}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                    us = float("inf")
                key = json.dumps(cfg, sort_keys=True)
                measured[key] = us
                times.append(us)
                log_.append({"key": task.key, "kind": task.kind, "version": versions.get(task.kind, 1),
                             "arch": log_.arch, "m": task.m, "ms": list(task.ms), "config": cfg, "us": us if math.isfinite(us) else 10 * FAILED_US,
                             "default": cfg == default, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
                n_new += 1
                done_trials += 1
                bk = _fastest(measured)
                eta = (time.perf_counter() - t_start) / done_trials * max(total - done_trials, 0)
                status = f"best {measured[bk]:.2f} us {bk}  ETA {eta:.0f} s" if bk else "no valid config yet"
                filled = 20 * min(done_trials, total) // total
                bar = "#" * filled + "-" * (20 - filled)
                out(f"|{bar}| {done_trials}/{total}  [{ti}/{len(tasks)}] {task.key}  "
                    f"trial {n_new}/{budget[task.key]}  {status}")
            if proposed:
                search.tell(times)
            else:  # the template default, measured first: the search starts from it
                search.seed(list(zip(cands, times)))
        dk = json.dumps(default, sort_keys=True)
        bk = _winner(measured, dk)
        if bk:
            default_us = measured.get(dk)
            best[task.key] = {"config": json.loads(bk), "us": measured[bk], "default_us": default_us}
    return best
