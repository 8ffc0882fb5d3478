"""frontends/onnx_converters.py: each fixed converter on the minimal pattern that TVM 0.27 fails on.

Graph-level tests build a tiny ONNX graph by hand, import it with frontends.import_model, run it with
TVM (llvm) and compare with onnxruntime. Converter-level tests feed the converter the Relax values
TVM's importer produces mid-graph (a tensor known only by its rank, an R.Shape of unknown dims),
which a hand-built graph only reaches through other shape losses.
"""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import tvm  # noqa: E402
from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as oh  # noqa: E402
from onnx import numpy_helper as onh  # noqa: E402
from tvm import relax  # noqa: E402

from frontends import import_model  # noqa: E402
from frontends import onnx_converters as conv  # noqa: E402


def _save(tmp_path, nodes, inputs, outputs, inits=(), name="g"):
    graph = oh.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return str(path)


def _run_both(path, feeds):
    imp = import_model(path)
    ex = tvm.compile(imp.mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(v) for v in feeds.values()] + [tvm.runtime.tensor(v) for v in imp.params.values()]
    out = vm["main"](*args)
    got = out.numpy() if isinstance(out, tvm.runtime.Tensor) else out[0].numpy()
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    return imp, got, want


def _i64(name, values):
    return onh.from_array(np.asarray(values, np.int64), name)


def test_range_to_symbolic_dim_keeps_shape(tmp_path):
    """x + emb[Range(0, seq)] then Reshape(-1, D): TVM gave Range a fresh length, losing the sum's shape."""
    nodes = [oh.make_node("Shape", ["x"], ["shp"]),
             oh.make_node("Gather", ["shp", "one"], ["seq"], axis=0),
             oh.make_node("Range", ["zero", "seq", "one"], ["pos"]),
             oh.make_node("Gather", ["emb", "pos"], ["pe"], axis=0),
             oh.make_node("Add", ["x", "pe"], ["y"]),
             oh.make_node("Reshape", ["y", "flat"], ["z"])]
    emb = onh.from_array(np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32), "emb")
    path = _save(tmp_path, nodes, [oh.make_tensor_value_info("x", TP.FLOAT, ["batch", "seq"] + [4])],
                 [oh.make_tensor_value_info("z", TP.FLOAT, [None, None])],
                 [emb, _i64("zero", 0), _i64("one", 1), _i64("flat", [-1, 4])])
    x = np.random.default_rng(1).standard_normal((2, 5, 4)).astype(np.float32)
    imp, got, want = _run_both(path, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-6)
    ret = imp.mod["main"].ret_ty
    assert isinstance(ret.shape, relax.ShapeExpr), ret  # (batch * seq, 4), not an opaque shape


def test_constant_of_shape_empty_shape_is_scalar(tmp_path):
    """ConstantOfShape([]) (TorchScript exporter, a 0-d fill): TVM broadcast a [1] value to rank 0."""
    value = onh.from_array(np.array([2.5], np.float32))
    nodes = [oh.make_node("ConstantOfShape", ["empty"], ["c"], value=value),
             oh.make_node("Mul", ["x", "c"], ["y"])]
    path = _save(tmp_path, nodes, [oh.make_tensor_value_info("x", TP.FLOAT, ["n", 3])],
                 [oh.make_tensor_value_info("y", TP.FLOAT, [None, None])],
                 [onh.from_array(np.zeros((0,), np.int64), "empty")])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    _, got, want = _run_both(path, {"x": x})
    np.testing.assert_allclose(got, want)


def test_reshape_to_run_time_shape(tmp_path):
    """Reshape to Concat(k, [-1]) with k a run-time int64 tensor: TVM passed a tensor to relax.reshape."""
    nodes = [oh.make_node("Concat", ["k", "minus1"], ["target"], axis=0),
             oh.make_node("Reshape", ["x", "target"], ["y"])]
    path = _save(tmp_path, nodes, [oh.make_tensor_value_info("x", TP.FLOAT, ["n", 4, 3]),
                                   oh.make_tensor_value_info("k", TP.INT64, [1])],
                 [oh.make_tensor_value_info("y", TP.FLOAT, [None, None])], [_i64("minus1", [-1])])
    x = np.arange(36, dtype=np.float32).reshape(3, 4, 3)
    _, got, want = _run_both(path, {"x": x, "k": np.array([6], np.int64)})
    assert got.shape == want.shape == (6, 6)
    np.testing.assert_allclose(got, want)


def test_concat_mixes_shape_values_and_tensors(tmp_path):
    """Concat(Unsqueeze(scalar tensor), Shape(x)[1:]) mixes a tensor with a ShapeExpr (TorchScript)."""
    nodes = [oh.make_node("Shape", ["x"], ["shp"]),
             oh.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
             oh.make_node("Mul", ["n", "two"], ["n2"]),
             oh.make_node("Unsqueeze", ["n2", "axes0"], ["n2v"]),
             oh.make_node("Slice", ["shp", "s2", "s3"], ["tail"]),
             oh.make_node("Concat", ["n2v", "tail"], ["target"], axis=0),
             oh.make_node("Reshape", ["x", "target"], ["y"])]
    path = _save(tmp_path, nodes, [oh.make_tensor_value_info("x", TP.FLOAT, ["n", 2, 5])],
                 [oh.make_tensor_value_info("y", TP.FLOAT, [None, None, None])],
                 [_i64("zero", 0), _i64("two", 2), _i64("axes0", [0]), _i64("s2", [2]), _i64("s3", [3])])
    x = np.arange(30, dtype=np.float32).reshape(3, 2, 5)
    _, got, want = _run_both(path, {"x": x})
    np.testing.assert_allclose(got, want)


# -- converter level: the values TVM's importer holds after it lost a shape ------------------------

def _unknown(ndim, dtype="float32", name="t"):
    return relax.Var(name, relax.TensorType(ndim=ndim, dtype=dtype))


def _call(cls, inputs, attrs=None):
    bb = relax.BlockBuilder()
    params = [{}, {}]
    with bb.function("f", params=[i for i in inputs if isinstance(i, relax.Var)]):
        with bb.dataflow():
            out = cls.get_converter(18)(bb, tvm.relax.frontend.onnx.onnx_frontend.onnx_input(inputs),
                                        attrs or {}, params)
            out = bb.emit_output(bb.normalize(out))
        bb.emit_func_output(out)
    return out.ty


def test_expand_of_tensor_with_unknown_dims():
    """Expand(t[?, ?, ?, ?, ?], ShapeExpr): TVM iterated t's unknown shape (NoneType not iterable)."""
    b, s = tvm.tirx.Var("batch", "int64"), tvm.tirx.Var("seq", "int64")
    ty = _call(conv.Expand, [_unknown(5), relax.ShapeExpr([b, 2, 2, s, 8])])
    assert ty.ndim == 5 and str(ty.shape) == str(relax.ShapeExpr([b, 2, 2, s, 8]))


def test_slice_and_gather_of_shape_with_unknown_dims():
    """Slice / Gather on Shape(t) where t's dims are unknown: R.Shape(ndim=4) is no tensor for TVM."""
    shape = relax.Var("s", relax.ShapeType(ndim=4))
    c = lambda v: relax.const(np.asarray(v, np.int64))  # noqa: E731
    ty = _call(conv.Slice, [shape, c([1]), c([3])])
    assert ty.ndim == 1 and str(ty.dtype) == "int64"
    ty = _call(conv.Gather, [shape, c(2)], {"axis": 0})
    assert ty.ndim == 0 and str(ty.dtype) == "int64"


def test_unsqueeze_of_shape_value():
    """Unsqueeze of a rank-1 shape value to [1, n] (decode graphs with past key/values)."""
    ty = _call(conv.Unsqueeze, [relax.ShapeExpr([tvm.tirx.Var("b", "int64"), 4]),
                                relax.const(np.asarray([0], np.int64))])
    assert [int(d) for d in ty.shape.values] == [1, 2]


def test_overrides_replace_tvm_converters_only_in_our_map():
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    ours, tvms = conv.convert_map(), _get_convert_map()
    assert set(ours) == set(tvms)
    for op, cls in conv.OVERRIDES.items():
        assert ours[op] is cls and tvms[op] is not cls and issubclass(cls, tvms[op])


def test_reshape_of_symbolic_scalar_and_minus_one_of_a_sum(tmp_path):
    """Decode graphs (dynamo exporter, Llama with past): past + seq computed from two Shapes, Reshape'd
    to [1] and Concat'ed into a target [-1, past + seq, D]. TVM passed the scalar expression to
    relax.reshape, and solved the -1 as b * 2 * (p + s) * 4 // (p * 4 + s * 4), which the LLVM build
    could not lower."""
    nodes = [oh.make_node("Concat", ["x", "y"], ["c"], axis=2),
             oh.make_node("Shape", ["x"], ["px"], start=2, end=3),
             oh.make_node("Shape", ["y"], ["sy"], start=2, end=3),
             oh.make_node("Squeeze", ["px", "axes0"], ["p"]),
             oh.make_node("Squeeze", ["sy", "axes0"], ["s"]),
             oh.make_node("Add", ["p", "s"], ["total"]),
             oh.make_node("Reshape", ["total", "one"], ["total1"]),
             oh.make_node("Concat", ["minus1", "total1", "four"], ["target"], axis=0),
             oh.make_node("Reshape", ["c", "target"], ["z"])]
    path = _save(tmp_path, nodes, [oh.make_tensor_value_info("x", TP.FLOAT, ["b", 2, "p", 4]),
                                   oh.make_tensor_value_info("y", TP.FLOAT, ["b", 2, "s", 4])],
                 [oh.make_tensor_value_info("z", TP.FLOAT, [None, None, 4])],
                 [_i64("axes0", [0]), _i64("one", [1]), _i64("minus1", [-1]), _i64("four", [4])])
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((3, 2, 5, 4)).astype(np.float32),
             "y": rng.standard_normal((3, 2, 2, 4)).astype(np.float32)}
    imp, got, want = _run_both(path, feeds)
    assert got.shape == want.shape == (6, 7, 4)
    np.testing.assert_allclose(got, want)
    ret = imp.mod["main"].ret_ty
    assert isinstance(ret.shape, relax.ShapeExpr) and "//" not in str(ret.shape), ret


def test_reshape_minus_one_cancels_equal_dims():
    """-1 of [b, 4, p + s, 8] -> [-1, p + s, 8] is b * 4 (matched dims cancelled, no division)."""
    b, p, s = (tvm.tirx.Var(n, "int64") for n in "bps")
    x = relax.Var("x", relax.TensorType([b, 4, p + s, 8], "float32"))
    ty = _call(conv.Reshape, [x, relax.ShapeExpr([-1, p + s, 8])])
    assert str(ty.shape) == str(relax.ShapeExpr([b * 4, p + s, 8])), ty
    ty = _call(conv.Reshape, [x, relax.const(np.asarray([0, 2, -1, 16], np.int64))])
    assert str(ty.shape) == str(relax.ShapeExpr([b, 2, p + s, 16])), ty
