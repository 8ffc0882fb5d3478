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


class CatOntoEmptyCache(torch.nn.Module):
    """HF DynamicCache's first update: torch.cat of an empty 1-D placeholder and the rank-4 past."""

    def forward(self, past, new):
        keys = torch.cat([torch.tensor([]), past], dim=-2)
        return torch.cat([keys, new], dim=-2)


def test_cat_skips_empty_1d_inputs():
    past = np.random.default_rng(0).standard_normal((2, 2, 3, 4)).astype(np.float32)
    new = np.random.default_rng(1).standard_normal((2, 2, 1, 4)).astype(np.float32)
    b = torch.export.Dim("b", max=8)
    imp = import_model(_export(CatOntoEmptyCache(), past, new,
                               dims=({0: b, 2: torch.export.Dim("p", max=32)}, {0: b})))
    for p in (3, 5):
        xp, xn = past[:1, :, :1].repeat(p, axis=2), new[:1]
        want = CatOntoEmptyCache()(torch.from_numpy(xp), torch.from_numpy(xn)).numpy()
        np.testing.assert_array_equal(_run(imp, xp, xn), want)


class SlicedPositions(torch.nn.Module):
    """BERT's embeddings: position ids [1, 64] sliced to [:, :seq], embedded, added to [b, seq, d]."""

    def __init__(self):
        super().__init__()
        self.register_buffer("pos", torch.arange(64).unsqueeze(0), persistent=False)
        self.emb = torch.nn.Embedding(64, 4)

    def forward(self, x):
        return x + self.emb(self.pos[:, :x.shape[1]])


def test_slice_proven_in_bounds_keeps_the_dim():
    """seq <= 32 < 64 (range constraints): torch's slice is [1, seq]; TVM's was [1, min(seq, 64)] and
    the add with [b, seq, 4] lost its shape ("CodeGenVM cannot emit R.add")."""
    torch.manual_seed(0)
    m = SlicedPositions().eval()
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    ep = _export(m, x, dims=({0: torch.export.Dim("b", max=8), 1: torch.export.Dim("s", max=32)},))
    imp = import_model(ep)
    assert "min" not in str(imp.mod["main"].ret_ty), imp.mod["main"].ret_ty
    for shape in [(2, 5, 4), (1, 9, 4)]:
        xi = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
        want = m(torch.from_numpy(xi)).detach().numpy()
        np.testing.assert_allclose(_run(imp, xi), want, rtol=1e-6)


def test_slice_not_provably_in_bounds_goes_to_tvm():
    """A static slice, and one whose torch size is not end - start, keep TVM's (clamping) converter."""
    class Static(torch.nn.Module):
        def forward(self, x):
            return x[:, 1:100]

    ep = torch.export.export(Static(), (torch.ones(2, 8),))
    node = next(n for n in ep.graph_module.graph.nodes if n.op == "call_function"
                and "slice" in str(n.target))
    assert not torch_fixes._proven_in_bounds(node)
    imp = import_model(ep)
    np.testing.assert_array_equal(_run(imp, np.ones((2, 8), np.float32)), np.ones((2, 7), np.float32))
