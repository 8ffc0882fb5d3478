"""The CUDA code of the decode step's injective kernels over symbolic shapes (schedules/injective.py):
KV-cache concat, transpose, scalar multiply, fp16->fp32 cast. Built for sm_90 with nvcc (no GPU needed);
the numeric check at the end runs only on a GPU."""
import re
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")

HEADS, DIM = 4, 128


def _module():
    import tvm
    from tvm import relax

    b, p, s = (tvm.tirx.Var(n, "int64") for n in ("batch", "past", "seq"))
    bb = relax.BlockBuilder()
    past = relax.Var("past_k", relax.TensorType([b, HEADS, p, DIM], "float16"))
    new = relax.Var("new_k", relax.TensorType([b, HEADS, s, DIM], "float16"))
    with bb.function("main", [past, new]):
        with bb.dataflow():
            cat = bb.emit(relax.op.concat([past, new], axis=2))
            kt = bb.emit(relax.op.permute_dims(cat, [0, 1, 3, 2]))
            scaled = bb.emit(relax.op.multiply(kt, relax.const(0.5, "float16")))
            f32 = bb.emit(relax.op.astype(cat, "float32"))
            # fp16 buffers, fp32 math with a constant: must not make 8-lane fp32 vectors (see below)
            mixed = bb.emit(relax.op.astype(relax.op.multiply(relax.op.astype(new, "float32"),
                                                              relax.const(0.5, "float32")), "float16"))
            out = bb.emit_output(relax.Tuple([cat, scaled, f32, mixed]))
        bb.emit_func_output(out)
    return bb.get()


def _build(arch):
    import tvm

    from compiler.build import relax_pipeline
    from compiler.cuda import register_nvcc_callback
    from compiler.target import resolve, tvm_target

    target = tvm_target(resolve("cuda", arch))
    register_nvcc_callback(arch)
    return tvm.compile(_module(), target=target, relax_pipeline=relax_pipeline(target))


def _cuda_source(ex) -> str:
    todo, out = [ex.mod], []
    while todo:
        m = todo.pop()
        if m.kind == "cuda":
            out.append(m.inspect_source())
        todo.extend(m.imports)
    return "\n".join(out)


def _kernel(src: str, name: str) -> str:
    m = re.search(r'extern "C" __global__ void[^{;]*\b' + name + r'_kernel\([^)]*\) \{(.*?)\n\}\n', src, re.S)
    assert m, f"no {name}_kernel in the CUDA source"
    return m.group(1)


@pytest.fixture(scope="module")
def source():
    return _cuda_source(_build("sm_90"))


@pytest.mark.parametrize("name", ["concatenate", "fused_transpose_multiply", "cast"])
def test_no_division_by_symbolic_extents(source, name):
    body = _kernel(source, name)
    # dlight's Fallback recovered coordinates with int64 floordiv/floormod by (past + seq) * ...:
    # the only divisions left may be by constants (emitted as shifts/masks for powers of two)
    assert not re.search(r"[/%]\s*\(?\s*\(?(past|seq|batch|cse_v)", body), body
    assert " / " not in body and " % " not in body, body


def test_last_dim_is_vectorized(source):
    assert "uint4" in _kernel(source, "concatenate")  # 8 x fp16 per 16-byte access
    cast = _kernel(source, "cast")
    assert "half4" in cast and "float4" in cast


def test_fp32_math_between_fp16_buffers_takes_4_lanes(source):
    # 8 lanes would make 32-byte fp32 vectors, which TVM 0.27's CUDA codegen miswrites (an fp32 constant
    # as make_ulonglong4 of 8 floats: nvcc refused it); the build above would have failed
    body = _kernel(source, "fused_cast1_multiply1_cast2")
    assert "float4" in body and "ulonglong4" not in body, body


@pytest.mark.gpu
def test_values_on_gpu():
    import tvm
    from tvm import relax

    from tests.conftest import gpu_arch

    ex = _build(gpu_arch())
    dev = tvm.cuda()
    vm = relax.VirtualMachine(ex, dev)
    rng = np.random.default_rng(0)
    for b, p, s in [(1, 37, 1), (2, 0, 5), (3, 129, 7)]:
        past = rng.standard_normal((b, HEADS, p, DIM)).astype("float16")
        new = rng.standard_normal((b, HEADS, s, DIM)).astype("float16")
        cat, scaled, f32, mixed = (o.numpy() for o in vm["main"](tvm.runtime.tensor(past, dev),
                                                         tvm.runtime.tensor(new, dev)))
        ref = np.concatenate([past, new], axis=2)
        np.testing.assert_array_equal(cat, ref)
        np.testing.assert_array_equal(scaled, ref.transpose(0, 1, 3, 2) * np.float16(0.5))
        np.testing.assert_array_equal(f32, ref.astype("float32"))
        np.testing.assert_array_equal(mixed, (new.astype("float32") * np.float32(0.5)).astype("float16"))
