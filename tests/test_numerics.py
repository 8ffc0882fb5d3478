"""Compiled int4 models against plain numpy / torch references (CPU target here; GPU in test_gpu.py)."""
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import nibble
from compiler.quantize import QuantConfig, dequantize
from tests import models
from tests.conftest import rel_err


def f16(a):
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float64)


def mlp_reference(x, w, artifact, cfg, k, hidden):
    """What the artifact should compute, from its own stored int4 weights: fp16 activations in and out
    of each int4 matmul, exact dequantized weights, float64 sums."""
    p = load_file(str(artifact / "weights.safetensors"))
    part = lambda n: {s: p[f"{n}_{s}"] for s in ("qweight", "scales", "zeros") if f"{n}_{s}" in p}
    w1 = dequantize(part("w1"), k, cfg).astype(np.float64)
    w2 = dequantize(part("w2"), hidden, cfg).astype(np.float64)
    h = f16(f16(x) @ w1.T + f16(w["b1"]))  # the fp32 model's bias goes into the fp16 kernel as fp16
    y = f16(f16(np.maximum(h, 0)) @ w2.T)
    return y, y @ np.swapaxes(y, -1, -2)


@pytest.mark.parametrize("group,symmetric,k", [(128, True, 64), (32, True, 64), (64, False, 64),
                                               (-1, True, 64), (32, True, 100)])
def test_onnx_mlp_int4_matches_reference(tmp_path, group, symmetric, k):
    hidden = 128
    w = models.onnx_mlp(tmp_path / "mlp.onnx", k=k, hidden=hidden)
    cfg = QuantConfig(group, symmetric)
    art = nibble.compile_model(tmp_path / "mlp.onnx", target="llvm", output=tmp_path / "mlp.nibble",
                               group_size=group, symmetric=symmetric, log=lambda s: None)
    m = nibble.load(art)
    rng = np.random.default_rng(0)
    for shape in ((1, 1, k), (3, 37, k)):  # one artifact, two sequence lengths
        x = rng.standard_normal(shape).astype(np.float32)
        y, gram = m(x)
        ref_y, ref_gram = mlp_reference(x, w, art, cfg, k, hidden)
        assert y.shape == shape[:2] + (32,) and gram.shape == shape[:2] + (shape[1],)
        assert rel_err(y, ref_y) < 2e-3  # fp32 accumulation vs float64: far under an fp16 ulp
        assert rel_err(gram, ref_gram) < 2e-3
        fp32 = np.maximum(x @ w["w1"] + w["b1"], 0) @ w["w2"]
        # the error vs the fp32 model is the quantization's own (the reference has it too), no more
        e_model, e_quant = rel_err(y, fp32), rel_err(ref_y, fp32)
        print(f"{shape}: vs fp32 {e_model:.3f} (int4 weights alone: {e_quant:.3f})")
        assert e_model < 0.4 and abs(e_model - e_quant) < 0.01


def test_gpt_torch_export_int4(tiny_gpt, tmp_path):
    from nibble.example import with_int4_weights

    ids = torch.randint(0, 96, (2, 8))
    art = nibble.compile_model(tiny_gpt, (ids,), target="llvm", output=tmp_path / "g.nibble", log=lambda s: None)
    m = nibble.load(art)
    ref_q = with_int4_weights(tiny_gpt)
    for shape in ((2, 1), (2, 37)):
        ids = torch.randint(0, 96, shape)
        y = m(ids)  # torch in -> torch out
        assert isinstance(y, torch.Tensor) and tuple(y.shape) == shape + (96,)
        with torch.no_grad():
            e_kernel = rel_err(y.numpy(), ref_q(ids).numpy())
            e_quant = rel_err(y.numpy(), tiny_gpt(ids).numpy())
        print(f"seq {shape[1]}: vs same int4 weights {e_kernel:.2e}, vs fp32 {e_quant:.2e}")
        assert e_kernel < 5e-3
        assert e_quant < 0.2


def test_no_quantize_is_the_fp32_graph(tiny_gpt_onnx, tiny_gpt, tmp_path):
    art = nibble.compile_model(tiny_gpt_onnx, target="llvm", quantize=False, output=tmp_path / "fp.nibble",
                               log=lambda s: None)
    m = nibble.load(art)
    ids = np.random.default_rng(1).integers(0, 96, (2, 5))
    with torch.no_grad():
        ref = tiny_gpt(torch.from_numpy(ids)).numpy()
    assert rel_err(m(input_ids=ids), ref) < 1e-5
    assert m.manifest["quantization"] is None
