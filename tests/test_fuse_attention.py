"""compiler/fuse_attention.py: exported attention chains -> one decode-attention kernel (CUDA)."""
import numpy as np
import pytest

from tests import models
from tests.conftest import rel_err


def _fused(path):
    from compiler.fuse_attention import fuse_decode_attention
    from frontends import import_model

    mod, count = fuse_decode_attention(import_model(path).mod)
    return mod, count


def test_sdpa_export_is_fused(tmp_path):
    models.onnx_sdpa(tmp_path / "a.onnx")
    mod, count = _fused(tmp_path / "a.onnx")
    assert count == 1
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert {"attention_h4_d64_0", "attention_h4_d64_0_dispatch", "attention_h4_d64_0_reference"} <= set(names)
    ops = [str(c.op) for c in _calls(mod["main"])]
    assert "relax.nn.softmax" not in ops and "relax.permute_dims" not in ops  # the chain is gone from main


def test_transformers_llama_layers_are_fused(tmp_path):
    """Every layer of transformers' Llama (GQA: K/V repeated before attention) exported with past;
    the default tiny config's head dim (16) is one the kernel does not take."""
    models.hf_llama_with_past(tmp_path / "llama.onnx", hidden_size=128, head_dim=32)
    assert _fused(tmp_path / "llama.onnx")[1] == 2
    models.hf_llama_with_past(tmp_path / "small.onnx")
    assert _fused(tmp_path / "small.onnx")[1] == 0


def test_head_dim_the_kernel_does_not_take_is_left_alone(tmp_path):
    models.onnx_sdpa(tmp_path / "a.onnx", heads=2, head_dim=48)  # not a multiple of 32
    assert _fused(tmp_path / "a.onnx")[1] == 0


def test_fused_model_builds_for_cuda(tmp_path):
    import nibble

    models.onnx_sdpa(tmp_path / "a.onnx")
    lines = []
    art = nibble.compile_model(tmp_path / "a.onnx", target="cuda", arch="sm_90", output=tmp_path / "a.nibble",
                               log=lines.append)
    assert "1 attention blocks fused for decode, 0 RMSNorms made one op" in lines and art.exists()


def _calls(func):
    from tvm import relax

    found = []
    relax.analysis.post_order_visit(func, lambda e: found.append(e) if isinstance(e, relax.Call) else None)
    return found


@pytest.mark.gpu
@pytest.mark.parametrize("s,t", [(1, 1), (1, 37), (1, 257), (1, 300), (3, 256), (16, 70), (20, 40),
                                 (1, 513), (2, 1000), (1, 4100)])
def test_attention_on_cuda_matches_reference(tmp_path, s, t):
    """s <= 16 runs the fused kernel (past SPLIT_FROM = 256 keys its split variant: at 257 most of the
    8 blocks of a row get few keys), s = 20 the op chain; all against float64, with masked keys, a fully
    masked row (output 0) and two batch rows."""
    import nibble

    models.onnx_sdpa(tmp_path / "a.onnx", heads=4, head_dim=64)
    m = nibble.load(nibble.compile_model(tmp_path / "a.onnx", target="cuda", output=tmp_path / "a.nibble"))
    rng = np.random.default_rng(s * 1000 + t)
    q = rng.standard_normal((2, 4, s, 64)).astype(np.float16)
    k = rng.standard_normal((2, 4, t, 64)).astype(np.float16)
    v = rng.standard_normal((2, 4, t, 64)).astype(np.float16)
    mask = rng.random((2, 1, s, t)) < 0.7
    mask[:, :, :, 0] = True
    mask[1, 0, 0, :] = False  # every key masked: SDPA's NaN guard gives 0
    out = m(q=q, k=k, v=v, mask=mask)
    ref = models.sdpa_reference(q, k, v, mask)
    assert np.all(out[1, :, 0] == 0)
    assert rel_err(out, ref) < 2e-3, rel_err(out, ref)
