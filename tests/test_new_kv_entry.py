"""compiler/new_kv_entry.py: main_new_kv, main with its present = concat(past, new) outputs cut to new."""
import numpy as np
import pytest

import nibble
from tests import models
from tests.conftest import rel_err


def _ops(func):
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, relax.Call) else None)
    return [c.op.name_hint if hasattr(c.op, "name_hint") else c.op.name for c in found]


def _inputs(rng, b, p, s, lens):
    past = lambda: rng.standard_normal((b, 4, p, 64)).astype(np.float16)
    new = lambda: rng.standard_normal((b, 4, s, 64)).astype(np.float16)
    return dict(q=new(), past_k=past(), k=new(), past_v=past(), v=new(), lens=np.array(lens, np.int64))


def _call_new_kv(m, feed):
    out = m._new_kv(*[m._to_tvm(feed[i["name"]]) for i in m.inputs], *m.params)
    return [o.numpy() for o in out]


def test_entry_cuts_present_outputs_and_the_concats_go(tmp_path):
    """main keeps its outputs; main_new_kv returns the new slots, and after the CUDA rewrites its
    attention reads (past, new) in place: no concat left there."""
    import tvm

    from compiler.build import prepare
    from compiler.new_kv_entry import ENTRY, add_new_kv_entry
    from compiler.target import resolve
    from frontends import import_model

    models.onnx_sdpa_cache(tmp_path / "c.onnx")
    mod, cut = add_new_kv_entry(import_model(tmp_path / "c.onnx").mod)
    assert cut == 2
    dims = lambda ty: [str(int(d)) if isinstance(d, tvm.tirx.IntImm) else str(d) for d in ty.shape.values]
    outs = mod[ENTRY].ret_ty.fields
    assert dims(outs[1]) == dims(outs[2]) == ["b", "4", "s", "64"]
    assert dims(mod["main"].ret_ty.fields[1]) == ["b", "4", "p + s", "64"]
    mod, _ = prepare(mod, resolve("cuda", "sm_90"), None, log=lambda s: None)
    entry, main = _ops(mod[ENTRY]), _ops(mod["main"])
    assert "relax.concat" not in entry and any(o.endswith("_kv2_dispatch") for o in entry), entry
    assert main.count("relax.concat") == 2 and not any("_kv2" in o for o in main), main
    # both write the output in token order, as the model transposes it: no transpose left
    assert "relax.permute_dims" not in entry and "relax.permute_dims" not in main


def test_past_kv_loads_go_before_the_wait(tmp_path):
    """main_new_kv's two-source kernel reads the past K and V, the entry's inputs, before it waits for
    the previous kernel (early_loads); main's one-source kernel reads K = concat(past, new), which a
    kernel of the same call writes, only after the wait."""
    import re

    from compiler.fuse_attention import fuse_decode_attention
    from compiler.new_kv_entry import add_new_kv_entry
    from frontends import import_model

    models.onnx_sdpa_cache(tmp_path / "c.onnx")
    mod, _ = add_new_kv_entry(import_model(tmp_path / "c.onnx").mod)
    mod, count = fuse_decode_attention(mod)
    assert count == 2
    kernels = {gv.name_hint: f.script() for gv, f in mod.functions_items()
               if gv.name_hint.startswith("attention_") and "dispatch" not in gv.name_hint
               and "reference" not in gv.name_hint}
    assert any("_kv2" in n for n in kernels) and any("_kv2" not in n for n in kernels)
    for name, src in kernels.items():
        before = src[:src.index("nb_grid_wait")]
        if "_kv2" in name:
            assert re.search(r"\bkp\[", before) and re.search(r"\bvp\[", before), name
            assert not re.search(r"\b(kn|vn|q|bias)\[", before), name  # this step's tensors: after the wait
        else:
            assert not re.search(r"\b(k|v|q|bias)\[", before), name


def test_model_without_present_gets_no_entry(tmp_path):
    from compiler.new_kv_entry import add_new_kv_entry
    from frontends import import_model

    models.onnx_mlp(tmp_path / "m.onnx")
    mod = import_model(tmp_path / "m.onnx").mod
    assert add_new_kv_entry(mod) == (mod, 0)
    m = nibble.load(nibble.compile_model(tmp_path / "m.onnx", target="llvm", output=tmp_path / "m.nibble",
                                         log=lambda s: None))
    assert m._new_kv is None and m.manifest["entries"] == {"main": "main"}


def test_entry_matches_main_on_cpu(tmp_path):
    """Same attention output as main; the present outputs are main's last s slots."""
    models.onnx_sdpa_cache(tmp_path / "c.onnx")
    m = nibble.load(nibble.compile_model(tmp_path / "c.onnx", target="llvm", output=tmp_path / "c.nibble",
                                         log=lambda s: None))
    assert m.manifest["entries"] == {"main": "main", "new_kv": "main_new_kv"}
    feed = _inputs(np.random.default_rng(0), 2, 7, 2, [9, 4])
    o, pk, pv = m(**feed)
    o2, k2, v2 = _call_new_kv(m, feed)
    np.testing.assert_allclose(o2, o, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(k2, pk[:, :, 7:])
    np.testing.assert_array_equal(v2, pv[:, :, 7:])


@pytest.fixture(scope="module")
def cuda_artifact(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kv2")
    models.onnx_sdpa_cache(tmp / "c.onnx")
    return nibble.compile_model(tmp / "c.onnx", target="cuda", output=tmp / "c.nibble", log=lambda s: None)


@pytest.mark.gpu
@pytest.mark.parametrize("p,s", [(0, 1), (1, 1), (37, 1), (255, 1), (256, 3), (600, 1), (5000, 1)])
def test_two_source_attention_on_cuda(cuda_artifact, p, s):
    """The two-source kernel (and its split variant past 512 keys) against float64 on the joined cache,
    with a sequence whose keys are all masked (output 0)."""
    _check_against_float64(nibble.load(cuda_artifact), p, s)


# configs a tuning record may give the attention kernels (schedules/attention.py SPACE / SPLIT_SPACE), by task
TUNED = {"64-256": ({"warps": 2, "splits": 1}, {"warps": 16, "splits": 1}),
         "257-2048": ({"warps": 16, "splits": 2}, {"warps": 2, "splits": 16})}


@pytest.fixture(scope="module")
def tuned_cuda_artifact(tmp_path_factory):
    """The model built with every attention kernel rebuilt from a tuning record (TUNED: main's kernels
    take the first config, main_new_kv's the second)."""
    from compiler.target import resolve
    from compiler.tuning import TuningLog, extract_tasks

    tmp = tmp_path_factory.mktemp("kv2tuned")
    models.onnx_sdpa_cache(tmp / "c.onnx")
    spec = resolve("cuda", "sm_90")
    log = TuningLog(tmp / "t.jsonl", spec)
    for t in extract_tasks(models.prepared_for_sm90(tmp / "c.onnx"), spec):
        if t.kind == "attention":
            cfg = TUNED[t.key.rsplit(":", 1)[1]]["_kv2" in t.key]
            log.append({"key": t.key, "kind": "attention", "version": 1, "arch": "sm_90", "config": cfg, "us": 1.0})
    lines = []
    art = nibble.compile_model(tmp / "c.onnx", target="cuda", output=tmp / "c.nibble", tuning=str(log.path),
                               log=lines.append)
    assert "4 of 4 kernels tuned" in " ".join(lines)
    return art


@pytest.mark.gpu
@pytest.mark.parametrize("p,s", [(37, 1), (255, 1), (600, 1), (5000, 1)])
def test_tuned_attention_configs_on_cuda(tuned_cuda_artifact, p, s):
    """The kernels rebuilt with tuned warps and blocks per row: the same answers."""
    _check_against_float64(nibble.load(tuned_cuda_artifact), p, s)


@pytest.mark.gpu
def test_tune_measures_the_attention_kernels_on_cuda(tmp_path):
    """`nibble tune` times the attention kernels on the GPU: every candidate builds and runs."""
    import json

    from nibble.cli import main

    models.onnx_sdpa_cache(tmp_path / "c.onnx")
    log = tmp_path / "t.jsonl"
    assert main(["tune", str(tmp_path / "c.onnx"), "--target", "cuda", "--trials", "12", "--log", str(log)]) == 0
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["kind"] for r in recs} == {"attention"} and len({r["key"] for r in recs}) == 4
    assert all(r["us"] < 1e29 for r in recs), [r for r in recs if r["us"] >= 1e29]


def _check_against_float64(m, p, s):
    feed = _inputs(np.random.default_rng(p * 10 + s), 2, p, s, [max(1, (p + s) * 2 // 3), 0])
    o, k, v = _call_new_kv(m, feed)
    keys = np.concatenate([feed["past_k"], feed["k"]], 2)
    values = np.concatenate([feed["past_v"], feed["v"]], 2)
    mask = (np.arange(p + s) < feed["lens"][:, None])[:, None, None, :]
    ref = models.sdpa_reference(feed["q"], keys, values, mask).transpose(0, 2, 1, 3).reshape(2, s, -1)
    np.testing.assert_array_equal(k, feed["k"])
    assert np.all(o[1] == 0)
    assert rel_err(o, ref) < 2e-3, rel_err(o, ref)
    o_main = m(**feed)[0]
    assert rel_err(o_main, ref) < 2e-3  # main's one-source kernel on the concat agrees
