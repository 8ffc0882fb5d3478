"""Tuning on the CPU (llvm) with a handful of trials: records written, reloaded, applied, resumed."""
import dataclasses
import json
import multiprocessing
import warnings

import pytest

import nibble
from compiler.target import resolve
from compiler.tuning import CONFIG_ATTR, MARGIN, TuningLog, apply_records, extract_tasks
from nibble.cli import main
from tests import models

SPEC = resolve("llvm")


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    d = tmp_path_factory.mktemp("tune")
    models.onnx_mlp(d / "mlp.onnx", k=64, hidden=256)
    return d / "mlp.onnx"


def _lines(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_tune_writes_records_and_compile_applies_them(mlp, tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    assert main(["tune", str(mlp), "--target", "llvm", "--trials", "6", "--log", str(log)]) == 0
    out = capsys.readouterr().out
    assert "2 tasks" in out and "best per task" in out
    recs = _lines(log)
    assert len(recs) == 6 and {r["arch"] for r in recs} == {SPEC["mcpu"]}
    assert {r["key"].split(":")[-1] for r in recs} == {"cpu"}
    best = TuningLog(log, SPEC).best()
    assert set(best) == {r["key"] for r in recs}
    for key, rec in best.items():  # the fastest, or the default (one per key) where within MARGIN of it
        mine = [r for r in recs if r["key"] == key]
        fastest, (default,) = min(r["us"] for r in mine), [r for r in mine if r["default"]]
        assert rec["us"] == (default["us"] if fastest > default["us"] * (1 - MARGIN) else fastest)

    assert main(["compile", str(mlp), "--target", "llvm", "--tuning-log", str(log), "-o", str(tmp_path / "t.nibble")]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 kernels tuned" in out
    m = nibble.load(tmp_path / "t.nibble")
    assert all(v["tuned"] for v in m.manifest["kernels"].values())
    assert main(["inspect", str(tmp_path / "t.nibble")]) == 0
    assert "kernels: 2 of 2 tuned" in capsys.readouterr().out
    assert main(["compile", str(mlp), "--target", "llvm", "--no-tuning", "-o", str(tmp_path / "d.nibble")]) == 0
    assert "0 of 2 kernels tuned" in capsys.readouterr().out


def test_applied_config_changes_the_schedule(mlp):
    from tvm.s_tir import dlight as dl

    from compiler.int4_pass import quantize_linears
    from compiler.target import tvm_target
    from frontends import import_model
    from schedules.cpu import Int4MatmulCPU

    imp = import_model(mlp)
    mod, _, _ = quantize_linears(imp.mod, imp.params)
    task = extract_tasks(mod, SPEC)[0]
    scheduled = {}
    for n_chunk in (8, 64):
        func = task.func.with_attr(CONFIG_ATTR, {"n_chunk": n_chunk, "k_split": 1})
        import tvm

        with tvm_target(SPEC):
            out = dl.ApplyDefaultSchedule(Int4MatmulCPU())(tvm.IRModule({"main": func}))
        scheduled[n_chunk] = out["main"].script()
    n = task.func.attrs["nibble.int4"]["n"]
    assert f"T.parallel({n // 8})" in scheduled[8] or f"T.parallel(T.int64({n // 8}))" in scheduled[8]
    assert scheduled[8] != scheduled[64]


def test_resume_continues_without_repeating(mlp, tmp_path, capsys):
    log = tmp_path / "r.jsonl"
    args = ["tune", str(mlp), "--target", "llvm", "--trials", "4", "--log", str(log)]
    assert main(args) == 0
    first = _lines(log)
    assert main(args + ["--resume"]) == 0
    capsys.readouterr()
    recs = _lines(log)
    assert len(recs) == 8
    seen = [(r["key"], json.dumps(r["config"], sort_keys=True)) for r in recs]
    assert len(set(seen)) == 8, "resume re-measured a candidate"
    assert recs[:4] == first


def test_corrupt_line_skipped_and_other_arch_ignored(tmp_path):
    log = tmp_path / "mixed.jsonl"
    good = {"key": "a:cpu", "kind": "cpu", "version": 1, "arch": SPEC["mcpu"], "m": 16,
            "config": {"n_chunk": 16, "k_split": 1}, "us": 5.0}
    other = dict(good, arch="sm_80", us=1.0)
    log.write_text(json.dumps(good) + "\n" + '{"key": "a:cpu", "us": 3' + "\n" + json.dumps(other) + "\n")
    notes = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        best = TuningLog(log, SPEC).best(log=notes.append)
    assert best["a:cpu"]["us"] == 5.0  # the faster sm_80 record is not used
    assert any("mixed.jsonl:2: corrupt tuning record skipped" in str(x.message) for x in w)
    assert any("ignored 1 record(s) for sm_80" in n for n in notes)


def _append_many(path, tag):
    log = TuningLog(path, SPEC)
    for i in range(200):
        log.append({"key": f"{tag}:{i}", "kind": "cpu", "version": 1, "arch": SPEC["mcpu"], "m": 1,
                    "config": {"pad": "x" * 3000}, "us": float(i)})


def test_concurrent_tunes_never_interleave_lines(tmp_path):
    path = tmp_path / "c.jsonl"
    procs = [multiprocessing.Process(target=_append_many, args=(path, t)) for t in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    recs = _lines(path)  # every line parses
    assert len(recs) == 400


def test_apply_records_without_log_is_a_no_op(mlp):
    from compiler.int4_pass import quantize_linears
    from frontends import import_model

    imp = import_model(mlp)
    mod, _, _ = quantize_linears(imp.mod, imp.params)
    same, applied = apply_records(mod, SPEC, None)
    assert same is mod and applied == {}


def test_failed_candidates_are_never_applied(tmp_path):
    log = tmp_path / "f.jsonl"
    rec = {"key": "a:cpu", "kind": "cpu", "version": 1, "arch": SPEC["mcpu"], "m": 16,
           "config": {"n_chunk": 16, "k_split": 1}, "us": 1e30}
    log.write_text(json.dumps(rec) + "\n")
    assert TuningLog(log, SPEC).best() == {}


@pytest.mark.parametrize("cand_us,wins", [(9.6, False), (9.4, True)])
def test_a_candidate_must_beat_the_default_by_the_margin(tmp_path, cand_us, wins):
    """Within MARGIN (5%: the spread of two copies of one kernel) of the default's time, the default's
    record wins; past it, the candidate's. Records without a default among them: the fastest."""
    assert MARGIN == 0.05
    log = tmp_path / "m.jsonl"
    base = {"key": "a:cpu", "kind": "cpu", "version": 1, "arch": SPEC["mcpu"], "m": 16}
    default = dict(base, config={"n_chunk": 16, "k_split": 1}, us=10.0, default=True)
    cand = dict(base, config={"n_chunk": 32, "k_split": 2}, us=cand_us, default=False)
    other = dict(base, key="b:cpu", config={"n_chunk": 8, "k_split": 1}, us=3.0)  # no default measured
    log.write_text("".join(json.dumps(r) + "\n" for r in (default, cand, other, dict(other, us=2.9))))
    best = TuningLog(log, SPEC).best()
    assert best["a:cpu"]["config"] == (cand if wins else default)["config"]
    assert best["b:cpu"]["us"] == 2.9


def test_search_proposes_new_configs_of_searched_knobs_only():
    """meta-schedule's evolutionary search (compiler/search.py) over gemv_mma's knobs: it starts from the
    measured template default, a dict of every Config field, strings included (`loads`: a str field once
    stopped every mma task at its fifth trial), proposes only unmeasured configs of SPACE's knobs, never
    one that Config.check refuses, and runs until the space is spent."""
    import itertools

    import tvm

    from compiler.int4_kernel import int4_matmul_func
    from compiler.quantize import QuantConfig
    from compiler.search import Search, features
    from schedules import gemm_wgmma, gemv_mma

    mod = tvm.IRModule({"main": int4_matmul_func(512, 4096, QuantConfig(), m=16).with_attr("global_symbol", "main")})
    llvm = tvm.target.Target({"kind": "llvm"})
    default = dataclasses.asdict(gemv_mma.Config())
    search = Search(mod, gemv_mma.SPACE, gemv_mma.Config, llvm, batch=4)
    search.seed([(default, 10.0)])
    seen = []
    while picks := search.propose():
        assert 1 <= len(picks) <= 4 and all(set(p) == set(gemv_mma.SPACE) for p in picks)
        seen += picks
        search.tell([11.0 + i for i in range(len(picks))])
    every = [dict(zip(gemv_mma.SPACE, v)) for v in itertools.product(*gemv_mma.SPACE.values())]
    knobs = {k: default[k] for k in gemv_mma.SPACE}
    assert sorted(map(str, seen)) == sorted(str(c) for c in every if c != knobs)  # each once, the default never
    assert len(features(default, gemv_mma.SPACE)) == len(gemv_mma.SPACE)  # `loads` is not a feature

    search = Search(mod, gemm_wgmma.SPACE, gemm_wgmma.Config, llvm, batch=4, seed=1)
    for _ in range(5):
        picks = search.propose()
        assert all(gemm_wgmma.Config(**p).check() is None for p in picks)  # stream-K with a K split: never
        search.tell([5.0] * len(picks))


def test_tuning_starts_from_the_templates_arch_default():
    """The baseline a tune must beat is what compile uses untuned: the per-arch default."""
    from compiler.int4_kernel import int4_matmul_func
    from compiler.quantize import QuantConfig
    from compiler.target import tvm_target
    from compiler.tuning import Task
    from schedules import gemm, gemm_wgmma, gemv_mma

    cuda = resolve("cuda", "sm_90")
    task = Task("k:gemm", int4_matmul_func(256, 256, QuantConfig()), "gemm", 512)
    assert task.default(cuda) == vars(gemm.config_for(tvm_target(cuda)).large)


def test_a_bucket_task_is_scored_over_its_range(monkeypatch):
    """A bucket copy serving m = L..R is timed at L and at R, built once, and scored by the sum (a config
    that wins at R alone lost up to 12% at L on the H200); records say which token counts they summed."""
    from compiler import tuning
    from compiler.int4_kernel import int4_matmul_func
    from compiler.quantize import QuantConfig

    timed = []
    monkeypatch.setattr(tuning, "_time_at", lambda lib, params, sets, m, *a: timed.append(m) or float(m))
    task = tuning.Task("k:cpu:3-4", int4_matmul_func(64, 256, QuantConfig()), "cpu", 4, low=3)
    assert task.ms == (3, 4) and tuning.Task("k:cpu", task.func, "cpu", 16).ms == (16,)
    cfg = task.default(SPEC)
    assert tuning.measure(task, cfg, SPEC, None) == 7.0 and timed == [3, 4]


def test_gemm_bucket_copies_are_tasks_of_their_own():
    """Each bucket copy of the dispatch is a task timed at both ends of its range, whose baseline is its own config
    (GEMM: its tile, 32 rows for m <= 32, ...; tensor-core GEMV: its default by N and token tiles); the
    unbounded copy (the wgmma GEMM on sm_90) is measured at PREFILL_M with its per-arch default."""
    import tvm
    from tvm import relax

    from compiler.dispatch import ROUTES, dispatch_small_m
    from compiler.int4_kernel import int4_matmul_func
    from compiler.quantize import QuantConfig
    from compiler.target import tvm_target
    from compiler.tuning import PREFILL_M, Task
    from schedules import gemm, gemm_wgmma, gemv_mma

    cuda = resolve("cuda", "sm_90")
    bb = relax.BlockBuilder()
    m = tvm.tirx.Var("m", "int64")
    x = relax.Var("x", relax.TensorType([m, 512], "float16"))
    q = relax.Var("q", relax.TensorType([256, 64], "uint32"))
    s = relax.Var("s", relax.TensorType([256, 4], "float16"))
    with bb.function("main", [x, q, s]):
        with bb.dataflow():
            gv = bb.add_func(int4_matmul_func(256, 512, QuantConfig()), "k")
            y = bb.emit_output(relax.call_tir(gv, [x, q, s], relax.TensorType([m, 256], "float16")))
        bb.emit_func_output(y)
    tasks = {t.key: t for t in extract_tasks(dispatch_small_m(bb.get(), arch="sm_90"), cuda)}
    arch = gemm.config_for(tvm_target(cuda))
    for (prev, _), (rows, kind) in zip(((0, None),) + ROUTES, ROUTES[:-1]):
        task = tasks[f"k:{kind}:{prev + 1}-{rows}"]  # the bucket serves m = prev + 1 .. rows
        assert task.m == rows and task.ms == (prev + 1, rows) and task.calls == 1
        if kind == "gemm":
            assert task.default(cuda) == vars(gemm.tile_for(arch, 256, rows))
        elif kind == "wgmma":
            want = gemm_wgmma.default_for(gemm_wgmma.DEFAULTS["sm_90"], 256, rows)
            assert task.default(cuda) == vars(dataclasses.replace(want, split_k=1))  # K = 512: too short to split
        else:
            assert task.default(cuda) == vars(gemv_mma.default_for(gemv_mma.config_for(tvm_target(cuda)), 256, rows))
    assert tasks["k:wgmma:17-32"].default(cuda)["tokens"] == 32
    assert tasks["k:mma:1-8"].default(cuda) != tasks["k:mma:9-16"].default(cuda)  # one vs two token tiles
    assert ROUTES[-1] == (None, "wgmma") and "k:gemm" not in tasks
    assert tasks["k:wgmma"].ms == (PREFILL_M,) and tasks["k:wgmma"].default(cuda) == vars(gemm_wgmma.Config())
    assert tasks["k:wgmma:129-256"].default(cuda)["tokens"] == 128  # 128-token tiles for m <= 256
    assert all(isinstance(t, Task) for t in tasks.values())


def test_features_tell_every_value_of_a_knob_apart():
    """The cost model's columns: within every template's SPACE, two values of a knob never give the same
    feature (log2 once made gemm_wgmma's stream_k 0 and 1, and gemm's split_k 0 and 1, the same)."""
    import importlib

    from compiler.search import features
    from compiler.tuning import TEMPLATES

    for module in TEMPLATES.values():
        space = importlib.import_module(module).SPACE
        base = {n: v[0] for n, v in space.items()}
        for name, values in space.items():
            cols = [features(dict(base, **{name: v}), space)[list(space).index(name)] for v in values]
            assert len(set(cols)) == len(values), (module, name, cols)


def test_tune_measures_the_default_first_and_every_config_once(monkeypatch, tmp_path):
    """tune() over a whole space (the CPU kernel's 15 configs) with a fake clock: the template default
    first, every config exactly once, failures (inf) recorded as failed and never the winner, the run over
    when the space is spent; resumed from its log, it measures nothing again."""
    from compiler import tuning
    from compiler.int4_kernel import int4_matmul_func
    from compiler.quantize import QuantConfig
    from schedules.cpu import SPACE

    calls = []

    def fake(task, cfg, spec, dev, repeat=7, sets=None):
        calls.append(dict(cfg))
        return float("inf") if cfg["n_chunk"] == 128 else 100.0 / cfg["n_chunk"] + cfg["k_split"]
    monkeypatch.setattr(tuning, "measure", fake)
    task = tuning.Task("k:cpu", int4_matmul_func(64, 256, QuantConfig()), "cpu", 16)
    log = TuningLog(tmp_path / "t.jsonl", SPEC)
    best = tuning.tune([task], SPEC, log, trials=100, batch=4, out=lambda s: None)
    assert calls[0] == task.default(SPEC)
    every = [dict(zip(SPACE, v)) for v in __import__("itertools").product(*SPACE.values())]
    assert sorted(map(str, calls)) == sorted(map(str, every))  # each once, then the space is spent
    assert best["k:cpu"]["config"] == {"n_chunk": 64, "k_split": 1}  # the fastest that did not fail
    assert sum(r["us"] >= tuning.FAILED_US for r in _lines(tmp_path / "t.jsonl")) == 3
    calls.clear()
    tuning.tune([task], SPEC, log, trials=100, batch=4, resume=True, out=lambda s: None)
    assert calls == []


CUDA = resolve("cuda", "sm_90")


@pytest.fixture(scope="module")
def sdpa_cache(tmp_path_factory):
    """A decoder-style attention over a cache, prepared for sm_90: its module and tuning tasks."""
    d = tmp_path_factory.mktemp("attn")
    models.onnx_sdpa_cache(d / "a.onnx")
    mod = models.prepared_for_sm90(d / "a.onnx")
    return d / "a.onnx", mod, [t for t in extract_tasks(mod, CUDA) if t.kind == "attention"]


def test_decode_attention_kernels_are_tasks(sdpa_cache):
    """main's kernel (K, V whole) and main_new_kv's (past and new read in place, loaded early), each as the
    one-block and the split kernel: four tasks, keyed by what their speed depends on, timed at the ends of
    the keys each serves, starting from the config the pass built them with; meta-schedule's workload is
    the kernel at the bound with every dim fixed."""
    from compiler.tuning import _shape, _workload
    from schedules.attention import DEFAULT, SPACE, SPLIT, SPLIT_FROM, SPLIT_SPACE, sizes

    _, _, tasks = sdpa_cache
    assert {t.key for t in tasks} == {f"attention_h4_d64_f16f16f32f32_maskb11{v}_bshd{e}:attention:{r}"
                                      for v, e in (("", ""), ("_kv2", "_early")) for r in ("64-256", "257-2048")}
    for t in tasks:
        split = t.key.endswith(":257-2048")
        assert t.ms == ((SPLIT_FROM + 1, 2048) if split else (64, SPLIT_FROM)) and t.calls == 1
        assert t.default(CUDA) == vars(SPLIT if split else DEFAULT) and t.space == (SPLIT_SPACE if split else SPACE)
        params = _workload(t)["main"].params
        assert all(isinstance(d, int) or d.__class__.__name__ == "IntImm" for p in params for d in p.shape)
        bias = next(p for p in params if p.name == "bias")
        assert int(bias.shape[-1]) == t.m  # the keys: past + new for the two-source kernel
        assert _shape(next(p for p in t.func.params if p.name == "bias"), 0, sizes(300))[-1] == 300


def test_attention_records_rebuild_the_kernels(sdpa_cache, tmp_path):
    """A winning record rebuilds the kernel with its warps and blocks per row (the launch changes), keeps
    its name and tags, and the module still builds for CUDA with every kernel reported tuned."""
    import tvm

    import nibble
    from compiler.dispatch import KERNEL_ATTR
    from schedules.attention import Config, _args

    path, mod, tasks = sdpa_cache
    log = TuningLog(tmp_path / "a.jsonl", CUDA)
    want = {}
    for i, t in enumerate(tasks):
        split = t.key.endswith(":257-2048")
        want[t.key] = {"warps": (2, 16)[i % 2], "splits": (16, 2)[i % 2] if split else 1}
        for cfg, us in ((t.default(CUDA), 10.0), (want[t.key], 5.0)):
            log.append({"key": t.key, "kind": "attention", "version": 1, "arch": "sm_90", "m": t.m,
                        "config": cfg, "us": us, "default": cfg == t.default(CUDA)})
    gvs = {t.key: next(g for g, f in mod.functions_items() if f.same_as(t.func)) for t in tasks}
    out, applied = apply_records(tvm.IRModule(dict(mod.functions_items())), CUDA, log, log=lambda s: None)
    assert set(applied) == set(want)
    for t in tasks:
        new = out[gvs[t.key]]
        assert _args(new)["cfg"] == Config(**want[t.key])
        assert new.attrs["global_symbol"] == t.func.attrs["global_symbol"]
        assert str(new.attrs[KERNEL_ATTR]) == "attention"
        text = new.script()
        assert f'T.thread_binding({want[t.key]["warps"]}, thread="threadIdx.y")' in text
        assert f'T.thread_binding({want[t.key]["splits"]}, thread="blockIdx.y")' in text
    lines = []
    nibble.compile_model(path, target="cuda", arch="sm_90", output=tmp_path / "a.nibble", tuning=str(log.path),
                         log=lines.append)
    assert "4 of 4 kernels tuned" in " ".join(lines)


def test_tune_searches_an_attention_kernels_space(sdpa_cache, monkeypatch, tmp_path):
    """tune() over the split kernel's 16 configs with a fake clock: its built config first, then every
    config of its space once (none with one block per row)."""
    from compiler import cuda, runtime, tuning
    from schedules.attention import SPLIT_SPACE

    for mod, name in ((runtime, "_device"), (cuda, "ensure_cuda_runtime"), (cuda, "register_nvcc_callback")):
        monkeypatch.setattr(mod, name, lambda *a: None)  # no GPU here: the clock is fake
    calls = []
    monkeypatch.setattr(tuning, "measure",
                        lambda task, cfg, *a, **k: calls.append(dict(cfg)) or 10.0 * cfg["warps"] / cfg["splits"])
    task = next(t for t in sdpa_cache[2] if t.key.endswith(":257-2048"))
    best = tuning.tune([task], CUDA, TuningLog(tmp_path / "t.jsonl", CUDA), trials=100, out=lambda s: None)
    every = [dict(zip(SPLIT_SPACE, v)) for v in __import__("itertools").product(*SPLIT_SPACE.values())]
    assert calls[0] == task.default(CUDA) and sorted(map(str, calls)) == sorted(map(str, every))
    assert best[task.key]["config"] == {"warps": 2, "splits": 16}


@pytest.mark.parametrize("weights,trials,want", [
    ((1, 1, 3), 5, None),  # 1 each, then 2 by weight (0.4, 0.4, 1.2): t2 and one of t0, t1 get one more
    ((1, 4, 4), 6, {"t0": 1, "t1": 3, "t2": 2}),  # 1 each, then 3: (0.33, 1.33, 1.33), the tie to the more-called
    ((1,) * 9 + (100,), 10, {**{f"t{i}": 1 for i in range(9)}, "t9": 1}),
    ((1, 1, 3), 2, {"t0": 1, "t1": 1, "t2": 1}),  # more tasks than trials: the defaults still measured
    ((1, 1, 3), 100, {"t0": 15, "t1": 15, "t2": 15}),  # the CPU template's 15 configs: spaces measured whole
    ((1, 1, 3), 40, {"t0": 13, "t1": 12, "t2": 15}),  # t2's space is within its share: the rest to t0, t1
])
def test_trial_budgets_split_the_trials_by_call_weight(weights, trials, want):
    """Trials split by how often each kernel runs, adding up to what the user asked: at least one each
    (its default), at most its space, what a full space cannot use given to the others."""
    from compiler.tuning import Task, _budgets

    tasks = [Task(f"t{i}", None, "cpu", 1, w) for i, w in enumerate(weights)]
    b = _budgets(tasks, trials)
    if want is None:
        assert b["t2"] == 2 and sorted((b["t0"], b["t1"])) == [1, 2]
    else:
        assert b == want
    assert sum(b.values()) == max(len(tasks), min(trials, 15 * len(tasks)))
