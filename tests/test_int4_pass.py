"""The int4 pass rewrites every linear with a known weight, and nothing else."""
import numpy as np
import pytest
import torch
from tvm import relax

from compiler.int4_kernel import ATTR
from compiler.int4_pass import quantize_linears
from compiler.quantize import QuantConfig, dequantize
from frontends import import_model
from tests import models


def census(mod):
    """(int4 kernel calls, relax.matmul calls) in main."""
    int4 = [gv for gv, f in mod.functions_items() if hasattr(f, "attrs") and f.attrs and ATTR in f.attrs]
    names = {gv.name_hint for gv in int4}
    counts = {"int4": 0, "matmul": 0}

    def visit(e):
        if isinstance(e, relax.Call):
            if getattr(e.op, "name", None) == "relax.matmul":
                counts["matmul"] += 1
            if getattr(e.op, "name", None) == "relax.call_tir" and e.args[0].name_hint in names:
                counts["int4"] += 1

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return counts["int4"], counts["matmul"]


def test_onnx_mlp_matmul_and_bias(tmp_path):
    w = models.onnx_mlp(tmp_path / "mlp.onnx")
    imp = import_model(tmp_path / "mlp.onnx")
    assert census(imp.mod) == (0, 3)
    mod, params, report = quantize_linears(imp.mod, imp.params, QuantConfig(32))
    assert census(mod) == (2, 1)  # y @ y^T stays an fp matmul
    assert len(report.quantized) == 2
    # the bias add was folded into the kernel (as an fp16 copy: the kernel's dtype) and the fp32
    # weights are gone from the parameters
    assert "w1" not in params and "w2" not in params and "b1" not in params
    assert params["b1_fp16"].dtype == np.float16 and np.array_equal(params["b1_fp16"], w["b1"].astype(np.float16))
    assert "R.add" not in mod["main"].script()
    # ONNX MatMul weights are [K, N]: the pass quantized their transpose (within half an int4 step)
    deq = dequantize({"qweight": params["w1_qweight"], "scales": params["w1_scales"]}, 64, QuantConfig(32))
    assert deq.shape == (128, 64)
    assert np.abs(deq - w["w1"].T).max() <= 0.5 * params["w1_scales"].astype(np.float32).max() * 1.001


def test_onnx_gemm_both_layouts(tmp_path):
    models.onnx_gemm(tmp_path / "gemm.onnx")
    imp = import_model(tmp_path / "gemm.onnx")
    mod, params, report = quantize_linears(imp.mod, imp.params)
    assert census(mod) == (2, 0)
    assert {(l.n, l.k) for l in report.quantized} == {(48, 64), (16, 48)}


def _gpt_census(imp, n_linear, n_attn):
    mod, params, report = quantize_linears(imp.mod, imp.params)
    assert census(mod) == (n_linear, n_attn), census(mod)
    assert len(report.quantized) == n_linear


def test_gpt_block_torchscript_onnx(tiny_gpt_onnx):
    _gpt_census(import_model(tiny_gpt_onnx), 5, 2)


def test_gpt_block_dynamo_onnx(tiny_gpt, tmp_path):
    path = tmp_path / "gpt_dynamo.onnx"
    ids = torch.zeros(2, 8, dtype=torch.int64)
    dims = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}}
    torch.onnx.export(tiny_gpt, (ids,), str(path), input_names=["input_ids"], dynamic_shapes=dims,
                      dynamo=True, verbose=False)
    _gpt_census(import_model(path), 5, 2)


def test_gpt_block_torch_export(tiny_gpt):
    ids = torch.zeros(2, 8, dtype=torch.int64)
    _gpt_census(import_model(tiny_gpt, (ids,)), 5, 2)


def test_skip_pattern_and_min_size(tiny_gpt):
    imp = import_model(tiny_gpt, (torch.zeros(2, 8, dtype=torch.int64),))
    mod, _, report = quantize_linears(imp.mod, imp.params, skip=("*head*",), min_size=64 * 64 + 1)
    kept = {l.name: l.why for l in report.layers if not l.quantized}
    assert any("head" in n and "pattern" in why for n, why in kept.items())
    assert any("proj" in n and "min-size" in why for n, why in kept.items())  # 64x64 < min size
    assert census(mod)[0] == 3  # qkv, fc1, fc2


def test_no_linear_layers(tmp_path):
    models.onnx_no_linear(tmp_path / "nolin.onnx")
    imp = import_model(tmp_path / "nolin.onnx")
    mod, params, report = quantize_linears(imp.mod, imp.params)
    assert census(mod) == (0, 0) and report.layers == []
    assert report.summary().startswith("0 of 0")


class _BatchedMatmul(torch.nn.Module):
    """x[b, s, K] @ W^T written as a batched matmul: torch.export lowers it to broadcast_to(W^T) + bmm."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(48, 32))

    def forward(self, x):
        return torch.bmm(x, self.w.t().unsqueeze(0).expand(x.shape[0], -1, -1))


def test_weight_broadcast_over_batch_is_a_linear():
    imp = import_model(_BatchedMatmul(), (torch.randn(2, 5, 32),))
    assert "broadcast_to" in imp.mod["main"].script() or "expand" in imp.mod["main"].script()
    mod, _, report = quantize_linears(imp.mod, imp.params)
    assert [(l.n, l.k) for l in report.quantized] == [(48, 32)]
    assert census(mod) == (1, 0)


def test_fp32_model_calls_fp16_kernels_and_keeps_its_output(tiny_gpt_onnx):
    """An fp32 model: each kernel is the fp16 one between two casts (which FuseOps merges into the
    neighbouring kernels), and a linear that produced the dataflow block's output still does."""
    imp = import_model(tiny_gpt_onnx)
    mod, params, _ = quantize_linears(imp.mod, imp.params, QuantConfig(32))
    kernels = [f.attrs[ATTR] for _, f in mod.functions_items() if hasattr(f, "attrs") and f.attrs and ATTR in f.attrs]
    assert kernels and all(str(k["x_dtype"]) == "float16" for k in kernels)
    last = mod["main"].body.blocks[-1]
    assert isinstance(last, relax.DataflowBlock)
    assert not isinstance(last.bindings[-1].var, relax.DataflowVar)  # emitted with emit_output: gv stays visible
    assert str(mod["main"].ret_ty.dtype) == "float32"
