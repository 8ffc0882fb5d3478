"""compiler/fuse_add_rmsnorm.py: residual add + RMSNorm -> one kernel with two outputs (CUDA)."""
import numpy as np
import pytest

import nibble
from tests import models
from tests.conftest import rel_err


def _prepared(path):
    from compiler.build import prepare
    from compiler.target import resolve
    from frontends import import_model

    lines = []
    mod, _ = prepare(import_model(path).mod, resolve("cuda", "sm_90"), None, log=lines.append)
    return mod, lines


def _ops(func):
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, relax.Call) else None)
    names = []
    for c in found:
        op = c.args[0] if getattr(c.op, "name", "") == "relax.call_tir" else c.op
        names.append(op.name_hint if hasattr(op, "name_hint") else op.name)
    return names


def test_add_and_norm_become_one_kernel(tmp_path):
    models.onnx_add_rmsnorm(tmp_path / "a.onnx")
    mod, lines = _prepared(tmp_path / "a.onnx")
    ops = _ops(mod["main"])
    assert "1 residual adds fused into the RMSNorm that follows" in lines
    assert "relax.nn.rms_norm" not in ops and "relax.astype" not in ops, ops  # casts folded in too
    assert ops.count("add_rmsnorm_k256_0") == 1 and ops.count("relax.add") == 1, ops  # r + 1 stays


def test_llama_layers_fuse_both_norms(tmp_path):
    """transformers' Llama in fp16 (with past): both residual adds of every layer, in both entries."""
    import torch
    import transformers

    from nibble.hf import export_causal_lm_with_past

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, head_dim=32)
    export_causal_lm_with_past(transformers.LlamaForCausalLM(cfg).eval().half(), tmp_path / "l.onnx")
    lines = []
    nibble.compile_model(tmp_path / "l.onnx", target="cuda", arch="sm_90", output=tmp_path / "l.nibble",
                         log=lines.append)
    # per layer: after attention and after the MLP (the last feeds the final norm); main and main_new_kv
    assert "8 residual adds fused into the RMSNorm that follows" in lines, lines


def test_rows_the_kernel_does_not_take_are_left_alone(tmp_path):
    models.onnx_add_rmsnorm(tmp_path / "a.onnx", k=48)  # not a multiple of 32
    mod, lines = _prepared(tmp_path / "a.onnx")
    assert "relax.nn.rms_norm" in _ops(mod["main"]) and not any("residual adds" in line for line in lines)


@pytest.mark.gpu
@pytest.mark.parametrize("k,rows", [(256, 1), (256, 7), (4096, 1), (4096, 200), (11008, 3)])
def test_add_rmsnorm_on_cuda(tmp_path, k, rows):
    models.onnx_add_rmsnorm(tmp_path / "a.onnx", k=k)
    m = nibble.load(nibble.compile_model(tmp_path / "a.onnx", target="cuda", output=tmp_path / "a.nibble",
                                         log=lambda s: None))
    rng = np.random.default_rng(k + rows)
    h = rng.standard_normal((1, rows, k)).astype(np.float32) * 3
    d = rng.standard_normal((rows, k)).astype(np.float16)
    y, r1 = m(h=h, d=d)
    y_ref, r1_ref = models.add_rmsnorm_reference(h, d, k)
    assert rel_err(r1, r1_ref) < 1e-6, rel_err(r1, r1_ref)
    assert rel_err(y, y_ref) < 2e-3, rel_err(y, y_ref)
