"""compiler/cuda_graph.py: programmatic edges into the kernels that wait for their predecessor.

Which kernels wait is read from the built CUDA source (here, with nvcc, no GPU); the graph edit and
the tokens it must not change need a GPU (the `gpu` test)."""
import json
import shutil

import numpy as np
import pytest

import nibble
from tests import models

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")


@needs_nvcc
def test_manifest_lists_the_kernels_that_wait(tmp_path):
    from compiler.build import build_module
    from compiler.cuda_graph import WAIT_CALL, waiting_kernels
    from compiler.target import resolve
    from frontends import import_model
    from schedules.template import GRID_WAIT_CALL

    assert WAIT_CALL == GRID_WAIT_CALL  # the runtime's copy of the marker
    models.onnx_add_rmsnorm(tmp_path / "a.onnx")
    ex = build_module(import_model(tmp_path / "a.onnx").mod, resolve("cuda", "sm_90"), log=lambda s: None)
    assert waiting_kernels(ex) == ["add_rmsnorm_k256_0_kernel"]  # the other kernel (r + 1) does not wait
    art = nibble.compile_model(tmp_path / "a.onnx", target="cuda", arch="sm_90", output=tmp_path / "a.nibble",
                               log=lambda s: None)
    assert json.loads((art / "manifest.json").read_text())["graph_wait_kernels"] == waiting_kernels(ex)


def test_cpu_build_lists_none(tmp_path):
    models.onnx_add_rmsnorm(tmp_path / "a.onnx")
    art = nibble.compile_model(tmp_path / "a.onnx", target="llvm", output=tmp_path / "a.nibble", log=lambda s: None)
    assert "graph_wait_kernels" not in nibble.load(art).manifest


@needs_nvcc
def test_pre_hopper_build_lists_none(tmp_path):
    """Before sm_90 the wait compiles to nothing and a graph cannot take programmatic edges."""
    models.onnx_add_rmsnorm(tmp_path / "a.onnx")
    art = nibble.compile_model(tmp_path / "a.onnx", target="cuda", arch="sm_80", output=tmp_path / "a.nibble",
                               log=lambda s: None)
    assert "graph_wait_kernels" not in json.loads((art / "manifest.json").read_text())


@pytest.fixture(scope="module")
def int4_llama(tmp_path_factory):
    """An fp16 Llama compiled to int4 (decode GEMVs on tensor cores, attention, add + RMSNorm: all kernels
    that wait): (its layer count, artifact path)."""
    pytest.importorskip("transformers")
    import torch
    import transformers

    from nibble.hf import export_causal_lm_with_past

    tmp = tmp_path_factory.mktemp("int4_llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    export_causal_lm_with_past(model, tmp / "l.onnx")
    return cfg.num_hidden_layers, nibble.compile_model(tmp / "l.onnx", target="cuda", output=tmp / "l.nibble",
                                                       log=print)


PROMPT = np.random.default_rng(0).integers(0, 512, (1, 9))


@pytest.mark.gpu
def test_programmatic_edges_keep_the_tokens(int4_llama):
    """The decode graph with programmatic edges gives the tokens of the same graph in stream order, and
    of the VM's growing-cache decode."""
    layers, art = int4_llama
    m = nibble.load(art)
    waiting = m.manifest["graph_wait_kernels"]
    for kind in ("_mma8_kernel", "attention_", "add_rmsnorm_", "qkv_rope_"):
        assert any(kind in name for name in waiting), (kind, waiting)
    pdl = [m.generate(PROMPT, max_new_tokens=16) for _ in range(2)]  # the second replays the capture
    gen = m._generator
    edges = next(iter(gen._decoders.values())).programmatic
    # per layer at least the 4 GEMVs, the q/k/v heads, the attention and 2 add + RMSNorm follow another kernel
    assert edges >= 8 * layers, edges
    gen._decoders.clear()
    gen.pdl = False
    full = m.generate(PROMPT, max_new_tokens=16)
    assert next(iter(gen._decoders.values())).programmatic == 0
    gen.graphs = False
    plain = m.generate(PROMPT, max_new_tokens=16)
    print(f"{edges} programmatic edges: decode {pdl[1].decode_ms_per_token:.3f} ms/token, full edges "
          f"{full.decode_ms_per_token:.3f}, no graph {plain.decode_ms_per_token:.3f}")
    for g in pdl:
        np.testing.assert_array_equal(g.tokens, full.tokens)
    np.testing.assert_array_equal(full.tokens, plain.tokens)


@pytest.mark.gpu
def test_refused_edge_edit_falls_back_to_stream_order(int4_llama, monkeypatch):
    """Should the driver refuse an edge edit, that graph is dropped and the step recaptured in stream
    order, with a warning naming the refusal; the tokens are those of the VM's decode."""
    import compiler.cuda_graph

    def refuse(graph, kernels):
        raise RuntimeError("cuGraphAddDependencies_v2 failed with CUresult 1")

    m = nibble.load(int4_llama[1])
    monkeypatch.setattr(compiler.cuda_graph, "make_programmatic", refuse)
    with pytest.warns(UserWarning, match="decode graph without programmatic edges: cuGraphAddDependencies_v2 "
                                         "failed with CUresult 1"):
        graphed = m.generate(PROMPT, max_new_tokens=16)
    dec = next(iter(m._generator._decoders.values()))
    assert dec.programmatic == 0 and dec.graph is not None
    m._generator.graphs = False
    np.testing.assert_array_equal(graphed.tokens, m.generate(PROMPT, max_new_tokens=16).tokens)
