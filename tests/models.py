"""Small models built in code for the tests (no downloads)."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def onnx_mlp(path, k=64, hidden=128, n=32, seed=0):
    """x[batch, seq, k] -> MatMul+Add -> Relu -> MatMul(no bias) -> y, plus an activation x activation
    MatMul (y @ y^T) that must stay fp: outputs y and gram."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((k, hidden)).astype(np.float32) * 0.1
    b1 = rng.standard_normal(hidden).astype(np.float32) * 0.1
    w2 = rng.standard_normal((hidden, n)).astype(np.float32) * 0.1
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="act"),
        helper.make_node("MatMul", ["h2", "w2"], ["y"], name="fc2"),
        helper.make_node("Transpose", ["y"], ["yt"], perm=[0, 2, 1], name="t"),
        helper.make_node("MatMul", ["y", "yt"], ["gram"], name="gram"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", n]),
         helper.make_tensor_value_info("gram", TensorProto.FLOAT, ["batch", "seq", "seq"])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return {"w1": w1, "b1": b1, "w2": w2}


def onnx_gemm(path, k=64, n1=48, n2=16, seed=1):
    """x[batch, k] -> Gemm(transB=1, bias) -> Gemm(transB=0, no bias) -> y."""
    rng = np.random.default_rng(seed)
    wa = rng.standard_normal((n1, k)).astype(np.float32) * 0.1  # [N, K]: transB=1
    ba = rng.standard_normal(n1).astype(np.float32) * 0.1
    wb = rng.standard_normal((n1, n2)).astype(np.float32) * 0.1  # [K, N]: transB=0
    nodes = [
        helper.make_node("Gemm", ["x", "wa", "ba"], ["h"], transB=1, name="gemm_a"),
        helper.make_node("Gemm", ["h", "wb"], ["y"], name="gemm_b"),
    ]
    graph = helper.make_graph(
        nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n2])],
        [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(ba, "ba"), numpy_helper.from_array(wb, "wb")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return {"wa": wa, "ba": ba, "wb": wb}


def onnx_no_linear(path):
    """Relu(x) + x: nothing to quantize."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])]
    graph = helper.make_graph(nodes, "nolin", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def onnx_unsupported_op(path):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu0"),
             helper.make_node("FancyOp", ["r"], ["y"], name="my_fancy_node", domain="com.example")]
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(path))


def hf_llama_with_past(path, seed: int = 0, half: bool = False, **config):
    """transformers' Llama (a tiny config, random init; `config` overrides it; fp16 weights with half)
    exported with past by nibble.hf; returns the model."""
    import torch
    import transformers

    from nibble.hf import export_causal_lm_with_past

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    for key, value in config.items():
        setattr(cfg, key, value)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if half:
        model = model.to(torch.float16)
    export_causal_lm_with_past(model, path)
    return model


def prepared_for_sm90(path):
    """The exported model as build_module sees it for sm_90: int4 linears (merged where they share an
    input), the main_new_kv entry, and prepare()'s rewrites."""
    import tvm

    from compiler.build import BuildOptions, lower, prepare
    from compiler.target import resolve
    from frontends import import_model

    mod, _, _, _ = lower(import_model(str(path)), BuildOptions(target="cuda"), lambda *a: None)
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90"}):
        mod, _ = prepare(mod, resolve("cuda", "sm_90"), None, lambda *a: None)
    return mod


def gpu_llama_with_and_without(tmp_path, monkeypatch, module: str, rewrite: str, off):
    """An fp16 Llama (head dim 128, 2 layers) exported with past and built for the local GPU twice: as
    nibble builds it, and with the rewrite module.rewrite replaced by `off` (which leaves the module as
    it is). Returns the two loaded artifacts (with, without) and a prompt of 9 ids."""
    import importlib

    import torch
    import transformers

    import nibble
    from nibble.hf import export_causal_lm_with_past

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
    export_causal_lm_with_past(model, tmp_path / "l.onnx")
    with_ = nibble.load(nibble.compile_model(tmp_path / "l.onnx", target="cuda", output=tmp_path / "with.nibble"))
    monkeypatch.setattr(importlib.import_module(module), rewrite, off)
    without = nibble.load(nibble.compile_model(tmp_path / "l.onnx", target="cuda", output=tmp_path / "without.nibble"))
    return with_, without, np.random.default_rng(0).integers(0, 512, (1, 9))


def first_steps(loaded, ids) -> list:
    """The prompt's logits, one decode step's logits (token 7) and the prompt's caches, as numpy arrays
    (through the VM, no CUDA graph)."""
    from compiler.generate import Generator

    gen = Generator(loaded)
    logits, past = gen._step(ids, gen._empty_past(1), 0)
    step, _ = gen._step(np.array([[7]]), past, ids.shape[1])
    return [np.asarray(logits), np.asarray(step)] + [np.asarray(p.numpy() if hasattr(p, "numpy") else p) for p in past]


def onnx_sdpa(path, heads: int = 4, head_dim: int = 64):
    """torch's scaled_dot_product_attention with a boolean mask, TorchScript-exported (the op chain
    compiler/fuse_attention.py fuses): q [b, h, s, d], k/v [b, h, t, d] fp16, mask [b, 1, s, t] -> fp32."""
    import warnings

    import torch

    class SDPA(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).float()

    q = torch.randn(1, heads, 1, head_dim, dtype=torch.float16)
    k = torch.randn(1, heads, 5, head_dim, dtype=torch.float16)
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(SDPA(), (q, k, k, mask), str(path), dynamo=False, opset_version=17,
                          input_names=["q", "k", "v", "mask"], output_names=["o"],
                          dynamic_axes={"q": {0: "b", 2: "s"}, "k": {0: "b", 2: "t"}, "v": {0: "b", 2: "t"},
                                        "mask": {0: "b", 2: "s", 3: "t"}})


def onnx_sdpa_cache(path, heads: int = 4, head_dim: int = 64):
    """onnx_sdpa over a cache the way decoders with past write it: K = concat(past_k, k), V likewise,
    returned as the present outputs; keys j < lens[b] are attended (the mask is built from K's length,
    as decoders build theirs), the output back in token order as decoders do before o_proj:
    (q, past_k, k, past_v, v, lens [b]) -> (o [b, s, h * d] fp32, present_k, present_v)."""
    import warnings

    import torch

    class SDPACache(torch.nn.Module):
        def forward(self, q, past_k, k, past_v, v, lens):
            k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
            mask = (torch.arange(k.shape[2]) < lens[:, None])[:, None, None, :]
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1).float(), k, v  # in token order

    q = torch.randn(1, heads, 1, head_dim, dtype=torch.float16)
    past = torch.randn(1, heads, 4, head_dim, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(SDPACache(), (q, past, q, past, q, torch.tensor([5])), str(path), dynamo=False,
                          opset_version=17, input_names=["q", "past_k", "k", "past_v", "v", "lens"],
                          output_names=["o", "present_k", "present_v"],
                          dynamic_axes={"q": {0: "b", 2: "s"}, "k": {0: "b", 2: "s"}, "v": {0: "b", 2: "s"},
                                        "past_k": {0: "b", 2: "p"}, "past_v": {0: "b", 2: "p"}, "lens": {0: "b"}})


def onnx_add_rmsnorm(path, k: int = 256, eps: float = 1e-6):
    """A pre-norm residual step the way HF Llama in fp16 exports it (compiler/fuse_add_rmsnorm.py):
    r = h + float(d), y = w * half(r * rsqrt(mean(r^2) + eps)); r is read again: (h [b, s, k] fp32,
    d [b * s, k] fp16) -> (y, r + 1)."""
    import warnings

    import torch

    class AddNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, k, dtype=torch.float16))

        def forward(self, h, d):
            r = h + d.float().reshape(h.shape)
            n = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps)
            return self.w * n.half(), r + 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(AddNorm(), (torch.randn(1, 3, k), torch.randn(3, k, dtype=torch.float16)), str(path),
                          dynamo=False, opset_version=17, input_names=["h", "d"], output_names=["y", "r1"],
                          dynamic_axes={"h": {0: "b", 1: "s"}, "d": {0: "bs"}})


def add_rmsnorm_reference(h, d, k: int = 256, eps: float = 1e-6):
    """onnx_add_rmsnorm's outputs in float64 (y rounded through fp16 as the model does)."""
    w = np.linspace(0.5, 1.5, k).astype(np.float16).astype(np.float64)
    r = h.astype(np.float64) + d.astype(np.float64).reshape(h.shape)
    n = (r / np.sqrt((r ** 2).mean(-1, keepdims=True) + eps)).astype(np.float16).astype(np.float64)
    return w * n, r + 1


def sdpa_reference(q, k, v, mask):
    """What the exported chain computes, in float64: masked keys -inf, all-masked rows 0."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scores = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]) + np.where(mask, 0.0, -np.inf)
    top = scores.max(-1, keepdims=True)
    e = np.exp(scores - np.where(np.isfinite(top), top, 0.0))
    total = e.sum(-1, keepdims=True)
    p = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    return p @ v
