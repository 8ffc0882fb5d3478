"""The tuner's search: meta-schedule's evolutionary search and XGBoost cost model over a template's knobs.

A schedule template (schedules/*.py) names its knobs in `SPACE` ({knob: (values...)}) and emits its own
PrimFunc from a Config, so meta-schedule cannot reach the kernel with schedule primitives. What it can
search is the knobs themselves, as sampled decisions:
  * the design space is a `ScheduleFn` that, for each knob in SPACE order, calls `sample_categorical` over
    the indices of its values and annotates the PrimFunc's root block with the result ("nibble.knob.<name>").
    A trace of that space is exactly one Config;
  * `EvolutionarySearch` samples, mutates (`Resample`: one knob's decision re-drawn) and picks candidates,
    ranked by `XGBModel` on `KnobFeatures` (one column per knob: its value's index in SPACE);
  * `Refuse`, a postproc, drops the knob combinations the template's `Config.check` refuses (checked with
    the Config class defaults for fields outside SPACE);
  * candidates are measured by compiler/tuning.py (template build, weights rotated past the L2), which feeds
    the times back as meta-schedule's runner results and records them in a `MemoryDatabase`.
The workload meta-schedule sees is the task's int4 PrimFunc with m fixed to the token count it is tuned at
(meta-schedule's argument info needs constant shapes); the kernel built is the task's own copy, symbolic m.
"""
from __future__ import annotations

import math
import random

import numpy as np

KNOB = "nibble.knob."  # root-block annotation prefix: the index of a knob's value in SPACE[knob]


def _derived(cls):
    """meta-schedule's Py* extension classes must be wrapped so the C++ side can call them (TVM's
    derived_object); imported here so importing this module does not import tvm."""
    from tvm.ir.utils import derived_object

    return derived_object(cls)


def _knobs(mod, space: dict) -> dict:
    """The Config fields a scheduled workload's root-block annotations encode."""
    block = mod["main"].body.block
    return {name: space[name][int(block.annotations[KNOB + name])] for name in space}


def features(cfg: dict, space: dict) -> list[float]:
    """The cost model's inputs for a config: per searched knob, its value's index in SPACE (the values are
    listed in increasing order, so the index keeps their order; log2 of the value made stream_k's 0 and 1,
    and gemm's split_k 0 = auto and 1, the same number), -1 for a value outside SPACE. Fields beyond the
    space (e.g. gemv_mma's `loads`) are left out, so every row has the same columns."""
    return [float(i) for i in _indices(cfg, space)]


def _indices(cfg: dict, space: dict) -> list[int]:
    """Per searched knob, the index of cfg's value in SPACE, -1 where it has none there."""
    return [space[n].index(cfg[n]) if cfg.get(n) in space[n] else -1 for n in space]


def _classes():
    """The meta-schedule extension classes (built on first use: tvm imports stay out of module import)."""
    from tvm.s_tir import meta_schedule as ms

    @_derived
    class Resample(ms.mutator.PyMutator):
        """Re-draws one knob: a different value for one sample_categorical decision of the trace."""

        def __init__(self, seed: int = 0):
            self.rng = random.Random(seed)

        def _initialize_with_tune_context(self, context) -> None:
            pass

        def apply(self, trace, _):
            insts = [i for i in trace.insts if i.kind.name == "SampleCategorical" and len(i.attrs[0]) > 1]
            if not insts:
                return None
            inst = self.rng.choice(insts)
            old = int(trace.decisions[inst])
            new = self.rng.choice([i for i in range(len(inst.attrs[0])) if i != old])
            return trace.with_decision(inst, new, remove_postproc=True)

        def clone(self):
            return Resample(self.rng.randrange(1 << 30))

    @_derived
    class Refuse(ms.postproc.PyPostproc):
        """Drops the knob combinations the template's Config.check refuses (e.g. stream-K with a K split)."""

        def __init__(self, space: dict, config=None):
            self.space, self.config = space, config

        def _initialize_with_tune_context(self, context) -> None:
            pass

        def apply(self, sch) -> bool:
            check = getattr(self.config, "check", None)
            return check is None or check(self.config(**_knobs(sch.mod, self.space))) is None

        def clone(self):
            return Refuse(self.space, self.config)

    @_derived
    class KnobFeatures(ms.feature_extractor.PyFeatureExtractor):
        """One feature row per candidate: its knob values (features())."""

        def __init__(self, space: dict):
            self.space = space

        def extract_from(self, context, candidates):
            import tvm

            return [tvm.runtime.tensor(np.array([features(_knobs(c.sch.mod, self.space), self.space)], "float32"))
                    for c in candidates]

    return Resample, Refuse, KnobFeatures


class Search:
    """meta-schedule's evolutionary search over one task's knobs. `propose()` gives the next unmeasured
    configs (dicts of SPACE's knobs), `tell()` takes their times (us; inf = failed) back."""

    def __init__(self, workload, space: dict, config_cls, target, batch: int, seed: int = 0):
        from tvm.s_tir import meta_schedule as ms
        from tvm.s_tir.meta_schedule.cost_model.xgb_model import XGBConfig

        Resample, Refuse, KnobFeatures = _classes()
        self.space = {k: tuple(v) for k, v in space.items()}
        self.mod = workload
        size = math.prod(len(v) for v in self.space.values())
        gen = ms.space_generator.ScheduleFn(self._sample, sch_rules=[], postprocs=[Refuse(self.space, config_cls)],
                                            mutator_probs={Resample(seed): 1.0})
        # spaces are small (18 configs for gemv_mma, 864 for gemm_wgmma, 6480 for gemm, before Config.check)
        # and trials few (8 a task): a small population, and a quarter of each batch picked at random, as
        # the model only knows what it has seen
        strategy = ms.search_strategy.EvolutionarySearch(
            population_size=min(64, 2 * size), init_measured_ratio=0.25, init_min_unmeasured=batch,
            max_fail_count=3, genetic_num_iters=3, genetic_mutate_prob=0.85, eps_greedy=0.25)
        self.ctx = ms.TuneContext(workload, target=target, space_generator=gen, search_strategy=strategy,
                                  task_name="nibble", rand_state=seed, num_threads=1)
        self.db = ms.database.MemoryDatabase()
        # nthread given: XGBModel otherwise asks psutil for the core count; 4 samples before it ranks
        self.model = ms.cost_model.XGBModel(extractor=KnobFeatures(self.space), config=XGBConfig(max_depth=3, nthread=1),
                                            num_warmup_samples=4, adaptive_training=False, num_tuning_cores=1)
        self.workload = self.db.commit_workload(workload)
        # the search stops itself after max_trials candidates; tune() stops it first (its trial budget, or
        # propose() finding the space spent), but re-proposed known configs count as candidates too
        self.ctx.pre_tuning(max_trials=4 * size,
                            num_trials_per_iter=batch, design_spaces=self.ctx.generate_design_space(),
                            database=self.db, cost_model=self.model)
        self.known: dict[tuple, float] = {}  # knob indices -> us, every config measured so far
        self.pending: tuple = ([], [], [])  # the last propose(): its candidates, their configs, the new ones
        self.done = False

    def _sample(self, sch, decisions: dict | None = None) -> None:
        """The design space: one sample_categorical per knob, its index annotated on the root block."""
        root = sch.get_sblock("root")
        for name, values in self.space.items():
            d = None if decisions is None else decisions[name]
            v = sch.sample_categorical(list(range(len(values))), [1.0 / len(values)] * len(values), decision=d)
            sch.annotate(root, KNOB + name, v)

    def key(self, cfg: dict) -> tuple | None:
        """A config's knob indices, or None where a knob's value is not in the space."""
        idx = _indices(cfg, self.space)
        return None if -1 in idx else tuple(idx)

    def seed(self, measured: list[tuple[dict, float]]) -> None:
        """Configs measured before the search (the template default, a resumed log's records): into the
        database and the cost model, so the search starts from them; they are never proposed again."""
        from tvm.s_tir import Schedule
        from tvm.s_tir.meta_schedule.arg_info import ArgInfo
        from tvm.s_tir.meta_schedule.search_strategy import MeasureCandidate

        cands, times = [], []
        for cfg, us in measured:
            idx = self.key(cfg)
            if idx is None or idx in self.known:
                continue
            sch = Schedule(self.mod)
            self._sample(sch, dict(zip(self.space, idx)))
            cands.append(MeasureCandidate(sch, ArgInfo.from_entry_func(self.mod)))
            times.append(us)
            self.known[idx] = us
        if cands:
            self._record(cands, times, new=[True] * len(cands))

    def propose(self) -> list[dict]:
        """The next unmeasured candidates (at most `batch`), or [] when the search has nothing new. The
        evolutionary search can re-propose a config measured outside it (seed()): such a candidate is
        answered with its known time and not returned."""
        for _ in range(8):
            if self.done:
                return []
            cands = self.ctx.generate_measure_candidates()
            if not cands:
                self.done = True
                return []
            cfgs = [_knobs(c.sch.mod, self.space) for c in cands]
            new, seen = [], set()
            for i, cfg in enumerate(cfgs):
                idx = self.key(cfg)
                if idx not in self.known and idx not in seen:
                    new.append(i)
                    seen.add(idx)
            if new:
                self.pending = (cands, cfgs, new)
                return [cfgs[i] for i in new]
            self._record(cands, [self.known[self.key(c)] for c in cfgs], new=[False] * len(cands))
        self.done = True  # only known configs, batch after batch: the space is spent
        return []

    def tell(self, times_us: list[float]) -> None:
        """The times (us; inf: failed to build or run) of the first len(times_us) configs of the last
        propose(), in order. Candidates left unmeasured (a spent trial budget) are not reported, and the
        evolutionary search does not propose them again: tune() only truncates a task's last batch."""
        cands, cfgs, new = self.pending
        self.pending = ([], [], [])
        for i, us in zip(new, times_us):
            self.known[self.key(cfgs[i])] = us
        measured = {i for i in new[: len(times_us)]}
        keep = [i for i, c in enumerate(cfgs) if i in measured or (i not in new and self.key(c) in self.known)]
        self._record([cands[i] for i in keep], [self.known[self.key(cfgs[i])] for i in keep],
                     new=[i in measured for i in keep])

    def _record(self, cands, times_us, new: list[bool]) -> None:
        """Feed times back to the search's bookkeeping (every candidate: so it counts them as measured), and
        the new measurements to the database and the cost model (a re-proposed known config once only)."""
        from tvm.s_tir import meta_schedule as ms

        results = [ms.runner.RunnerResult(run_secs=[us * 1e-6], error_msg=None) if math.isfinite(us)
                   else ms.runner.RunnerResult(run_secs=None, error_msg="failed to build or run") for us in times_us]
        for c, r, n in zip(cands, results, new):
            if n and r.run_secs is not None:
                self.db.commit_tuning_record(ms.database.TuningRecord(c.sch.trace, self.workload, r.run_secs,
                                                                      self.ctx.target, c.args_info))
        fresh = [i for i, n in enumerate(new) if n]
        if fresh:
            self.model.update(self.ctx, [cands[i] for i in fresh], [results[i] for i in fresh])
        self.ctx.notify_runner_results(cands, results)
