"""frontends/torch_fixes.py on the minimal patterns: GPT-2's view after a symbolic reshape, to.device,
and an unsupported op named in the error."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from compiler.errors import NibbleError  # noqa: E402
from frontends import import_model  # noqa: E402
from frontends import torch_fixes  # noqa: E402


class ViewAfterTranspose(torch.nn.Module):
    """GPT-2 attention's merge of heads then Conv1D: transpose, reshape, view(-1, D), addmm."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(8, 8))
        self.bias = torch.nn.Parameter(torch.randn(8))

    def forward(self, x):  # x: [b, h, s, d]
        b, h, s, d = x.shape
        y = x.transpose(1, 2).reshape(b, s, h * d)
        return torch.addmm(self.bias, y.view(-1, y.size(-1)), self.weight).view(b, s, -1)


def _run(imp, *xs):
    ex = tvm.compile(imp.mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x) for x in xs], *[tvm.runtime.tensor(v) for v in imp.params.values()])
    return out[0].numpy() if not isinstance(out, tvm.runtime.Tensor) else out.numpy()


def _export(mod, *xs, dims):
    return torch.export.export(mod.eval(), tuple(torch.from_numpy(x) for x in xs), dynamic_shapes=dims)


def test_view_after_symbolic_reshape_imports_and_matches():
    torch.manual_seed(0)
    m = ViewAfterTranspose()
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 4)).astype(np.float32)
    ep = _export(m, x, dims=({0: torch.export.Dim("b", max=8), 2: torch.export.Dim("s", max=32)},))
    imp = import_model(ep)
    for shape in [(2, 2, 5, 4), (1, 2, 3, 4)]:
        xi = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        want = m(torch.from_numpy(xi)).detach().numpy()
        np.testing.assert_allclose(_run(imp, xi), want, rtol=1e-5, atol=1e-5)


def test_views_to_reshapes_rewrites_only_views():
    ep = _export(ViewAfterTranspose(), np.zeros((2, 2, 5, 4), np.float32), dims=None)
    before = [n.target for n in ep.graph_module.graph.nodes if n.op == "call_function"]
    after = [n.target for n in torch_fixes.views_to_reshapes(ep).graph_module.graph.nodes
             if n.op == "call_function"]
    assert torch.ops.aten.view.default in before and torch.ops.aten.view.default not in after
    assert len(before) == len(after)


class ToDevice(torch.nn.Module):
    def forward(self, x):
        return (x.to("cpu") * 2).to(torch.float32)


def test_to_device_converter_without_decomposition():
    """The no-decomposition path keeps aten.to.device, which TVM's importer refuses."""
    from tvm.relax.frontend.torch import from_exported_program

    ep = torch.export.export(ToDevice(), (torch.ones(2, 3),))
    names = {getattr(n.target, "__name__", "") for n in ep.graph_module.graph.nodes}
    if "to.device" not in names:
        pytest.skip("this torch version does not keep aten.to.device in exported graphs")
    mod = from_exported_program(ep, run_ep_decomposition=False, custom_convert_map=torch_fixes.CONVERTERS)
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = vm["main"](tvm.runtime.tensor(x))
    out = out[0] if not isinstance(out, tvm.runtime.Tensor) else out
    np.testing.assert_allclose(out.numpy(), x * 2)


class Unsupported(torch.nn.Module):
    def forward(self, x):
        return torch.special.zeta(x, x)


def test_unsupported_op_is_named():
    ep = torch.export.export(Unsupported(), (torch.ones(2, 3),))
    with pytest.raises(NibbleError, match=r"op \S*zeta\S* at node '\w+' is not supported"):
        import_model(ep)
