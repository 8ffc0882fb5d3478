"""The small Relax/TIR fixes the build applies before TVM's own passes (compiler/unfuse_scalars.py,
frontends' identifier parameter names), each on the minimal pattern that broke real models."""
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx  # noqa: E402


def _position_ids_module():
    """arange(seq) + past, the way HF decoders compute position ids (past is a shape value)."""
    seq, past = tirx.Var("seq", "int64"), tirx.Var("past", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([seq], "int64"))
    cache = relax.Var("cache", relax.TensorType([past, 4], "float32"))
    with bb.function("main", [x, cache]):
        with bb.dataflow():
            pos = bb.emit(relax.op.arange(0, seq, 1, dtype="int64"))
            shifted = bb.emit(relax.op.add(pos, past))
            out = bb.emit_output(relax.op.add(shifted, x))
        bb.emit_func_output(out)
    return bb.get()


def test_scalar_param_funcs_are_not_fused():
    from compiler.unfuse_scalars import unfuse_scalar_param_funcs

    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), unfuse_scalar_param_funcs,
              relax.transform.FuseOps(), relax.transform.FuseTIR()]
    with tvm.target.Target({"kind": "llvm"}):
        mod = tvm.transform.Sequential(passes)(_position_ids_module())
    scalar = [gv.name_hint for gv, f in mod.functions.items()
              if isinstance(f, tirx.PrimFunc) and any(isinstance(p.ty, tvm.ir.PrimType) for p in f.params)]
    assert scalar, "the add of a scalar stays its own kernel"
    ex = tvm.compile(mod, target="llvm")
    import numpy as np

    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(np.arange(5, dtype="int64")), tvm.runtime.tensor(np.zeros((3, 4), "float32")))
    np.testing.assert_array_equal(got.numpy(), np.arange(5) + 3 + np.arange(5))


def test_onnx_initializer_paths_become_identifiers(tmp_path):
    """The ONNX exporters name initializers after graph paths ("/model/rotary_emb/Constant_output_0");
    TIR buffers inherit parameter names, and nvcc rejects such a name in a kernel signature."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "/model/Constant_1_output_0")
    g = helper.make_graph([helper.make_node("MatMul", ["x", w.name], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    from frontends import import_model

    import re

    imp = import_model(tmp_path / "m.onnx")
    names = [p.name for p in imp.mod["main"].params]
    assert names[0] == "x" and len(names) == 2
    assert re.fullmatch(r"[A-Za-z_]\w*", names[1]) and "model_Constant_1_output_0" in names[1]
    assert list(imp.params) == names[1:]


@pytest.mark.parametrize("target, arch, msg", [
    ({"kind": "cuda", "arch": "sm_90", "mcpu": "x"}, None, "not ['mcpu']"),
    ({"arch": "sm_90"}, None, "nibble takes {'kind'"),
    ({"kind": "cuda", "arch": "sm_90"}, "sm_80", "target arch sm_90 and --arch sm_80 disagree"),
])
def test_target_dict_errors(target, arch, msg):
    from compiler.errors import NibbleError
    from compiler.target import resolve

    with pytest.raises(NibbleError) as e:
        resolve(target, arch)
    assert msg in str(e.value)


def test_target_dict_resolves_like_names():
    from compiler.target import resolve

    assert resolve({"kind": "cuda", "arch": "sm_90"}) == resolve("cuda", "sm_90")
    assert resolve({"kind": "llvm"}) == resolve("llvm")


def test_scalars_that_only_give_shapes_still_fuse():
    """An op on [b * s, K] gets b and s as scalar params (they cannot be recovered from the product);
    they are shapes, not operands, so the function keeps its pattern and fuses with its neighbours."""
    from compiler.unfuse_scalars import unfuse_scalar_param_funcs

    b, s = tirx.Var("b", "int64"), tirx.Var("s", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([b * s, 8], "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.astype(x, "float32"))
            out = bb.emit_output(relax.op.multiply(y, relax.const(2.0, "float32")))
        bb.emit_func_output(out)
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), unfuse_scalar_param_funcs]
    mod = tvm.transform.Sequential(passes)(bb.get())
    cast = [f for gv, f in mod.functions.items() if gv.name_hint.startswith("cast")][0]
    assert any(isinstance(p.ty, tvm.ir.PrimType) for p in cast.params)  # b, s passed as scalars
    assert int(cast.attrs["op_pattern"]) != 8
    fused = tvm.transform.Sequential([relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    assert any(gv.name_hint.startswith("fused_cast") for gv in fused.get_global_vars())


def test_reshape_over_symbolic_dims_fuses_with_its_consumer():
    """[b, s, K] -> [b * s, K] is annotated opaque by TVM (its index map is not analyzable); the pass
    marks it injective, so e.g. a sliced int4 output -> reshape -> activation is one kernel."""
    from compiler.unfuse_scalars import unfuse_scalar_param_funcs

    b, s = tirx.Var("b", "int64"), tirx.Var("s", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([b, s, 16], "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            flat = bb.emit(relax.op.reshape(x, [b * s, 16]))  # as the int4 pass feeds its kernel
            half = bb.emit(relax.op.strided_slice(flat, axes=[1], begin=[8], end=[16]))
            y = bb.emit(relax.op.reshape(half, [b, s, 8]))
            out = bb.emit_output(relax.op.sigmoid(y))
        bb.emit_func_output(out)
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), unfuse_scalar_param_funcs,
              relax.transform.FuseOps(), relax.transform.FuseTIR()]
    mod = tvm.transform.Sequential(passes)(bb.get())
    kernels = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]
    assert len(kernels) == 1 and "strided_slice_reshape" in kernels[0], kernels  # one kernel
    import numpy as np

    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    a = np.random.default_rng(0).standard_normal((2, 3, 16)).astype("float16")
    got = vm["main"](tvm.runtime.tensor(a)).numpy()
    want = 1 / (1 + np.exp(-a[..., 8:].astype(np.float32)))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_kv_concat_over_symbolic_length_fuses_with_its_producer():
    """concat(past, new) along the symbolic cache length is annotated opaque by TVM; marked injective,
    the op that makes `new` (RoPE, the transpose of v) writes the present cache in the same kernel."""
    import numpy as np

    from compiler.unfuse_scalars import unfuse_scalar_param_funcs

    b, p, s = (tirx.Var(n, "int64") for n in ("b", "p", "s"))
    bb = relax.BlockBuilder()
    past = relax.Var("past", relax.TensorType([b, 2, p, 8], "float16"))
    x = relax.Var("x", relax.TensorType([b, s, 2, 8], "float16"))
    with bb.function("main", [past, x]):
        with bb.dataflow():
            new = bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3]))
            out = bb.emit_output(relax.op.concat([past, new], axis=2))
        bb.emit_func_output(out)
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), unfuse_scalar_param_funcs,
              relax.transform.FuseOps(), relax.transform.FuseTIR()]
    mod = tvm.transform.Sequential(passes)(bb.get())
    kernels = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)]
    assert kernels == ["fused_transpose_concatenate"], kernels
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    rng = np.random.default_rng(0)
    a, c = rng.standard_normal((1, 2, 5, 8)).astype("float16"), rng.standard_normal((1, 1, 2, 8)).astype("float16")
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(c)).numpy()
    np.testing.assert_array_equal(got, np.concatenate([a, c.transpose(0, 2, 1, 3)], axis=2))
