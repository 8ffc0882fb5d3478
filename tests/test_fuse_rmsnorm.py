"""compiler/fuse_rmsnorm.py: the exported RMSNorm arithmetic -> relax.nn.rms_norm (one kernel on CUDA)."""
import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from compiler.fuse_rmsnorm import fuse_rmsnorm  # noqa: E402
from frontends import import_model  # noqa: E402


class Norm(torch.nn.Module):
    """transformers' LlamaRMSNorm arithmetic (square written as pow or as x * x), fp32 math, fp16 out."""

    def __init__(self, square: str):
        super().__init__()
        self.square = square
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 32))

    def forward(self, x):
        sq = x.pow(2) if self.square == "pow" else x * x
        y = x * torch.rsqrt(sq.mean(-1, keepdim=True) + 1e-6)
        return self.weight * y.half().float()


def _run(mod, params, x):
    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x), *[tvm.runtime.tensor(v) for v in params.values()])[0].numpy()


@pytest.mark.parametrize("square", ["pow", "mul"])
def test_rmsnorm_becomes_one_op_with_the_same_values(square):
    x = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)
    imp = import_model(Norm(square), (torch.from_numpy(x),))
    fused, count = fuse_rmsnorm(imp.mod)
    assert count == 1
    ops = set()
    relax.analysis.post_order_visit(fused["main"], lambda e: ops.add(getattr(e.op, "name", "")) if isinstance(e, relax.Call) else None)
    assert "relax.nn.rms_norm" in ops and "relax.mean" not in ops
    want = Norm(square)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(_run(imp.mod, imp.params, x), want, rtol=1e-3, atol=1e-3)  # fp16 rounding
    np.testing.assert_allclose(_run(fused, imp.params, x), _run(imp.mod, imp.params, x), rtol=1e-6, atol=1e-6)


def test_layernorm_is_left_alone(tiny_gpt_onnx):
    assert fuse_rmsnorm(import_model(tiny_gpt_onnx).mod)[1] == 0



def test_a_rewritten_block_output_stays_an_output():
    """RMSNorm arithmetic whose result is the dataflow block's output var (R.output): the rewrite must
    emit it as an output again, or the VM finds the function's result undefined."""
    x = relax.Var("x", relax.TensorType([2, 32], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            sq = bb.emit(relax.op.multiply(x, x))
            ms = bb.emit(relax.op.mean(sq, axis=[-1], keepdims=True))
            r = bb.emit(relax.op.rsqrt(relax.op.add(ms, relax.const(1e-6, "float32"))))
            y = bb.emit_output(relax.op.multiply(x, r))
        bb.emit_func_output(y)
    mod = bb.get()
    fused, count = fuse_rmsnorm(mod)
    assert count == 1
    last = fused["main"].body.blocks[-1]
    assert not isinstance(last.bindings[-1].var, relax.DataflowVar)  # emit_output, not emit
    xv = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    run = lambda m: relax.VirtualMachine(tvm.compile(m, target="llvm"), tvm.cpu())["main"](tvm.runtime.tensor(xv)).numpy()
    np.testing.assert_allclose(run(fused), run(mod), rtol=1e-6, atol=1e-6)
