"""The built-in example: a small GPT-style decoder (generated in code, random weights, fixed seed).

Token embedding, N pre-norm blocks (causal self-attention with a fused QKV projection, GELU MLP),
final norm and an LM head: every projection is an nn.Linear, the attention matmuls are activation x
activation (the int4 pass must leave those alone).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, past_k=None, past_v=None):
        b, t, d = x.shape
        h = self.heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, h, d // h).transpose(1, 2) for z in (q, k, v))
        if past_k is None:
            s = q @ k.transpose(-1, -2) / math.sqrt(d // h)
            s = s.masked_fill(torch.ones_like(s).triu(1) > 0, float("-inf"))  # causal
        else:  # the new tokens sit at positions past .. past + t - 1
            k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
            s = q @ k.transpose(-1, -2) / math.sqrt(d // h)
            row = torch.arange(t).unsqueeze(1) + (k.shape[2] - t)
            s = s.masked_fill(torch.arange(k.shape[2]).unsqueeze(0) > row, float("-inf"))
        a = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))
        return x if past_k is None else (x, k, v)


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 512, d: int = 256, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


class TinyGPTWithPast(TinyGPT):
    """TinyGPT as decoders are exported for generation: (input_ids, past_key_0, past_value_0, ...) ->
    (logits, present_key_0, present_value_0, ...), caches [batch, heads, past, head_dim]."""

    def forward(self, input_ids, *past):
        x = self.embed(input_ids)
        present = []
        for i, blk in enumerate(self.blocks):
            x, k, v = blk(x, past[2 * i], past[2 * i + 1])
            present += [k, v]
        return (self.head(self.ln(x)), *present)


def tiny_gpt(seed: int = 0, **kw) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(**kw).eval()


def tiny_gpt_with_past(seed: int = 0, **kw) -> TinyGPTWithPast:
    torch.manual_seed(seed)
    return TinyGPTWithPast(**kw).eval()


def export_onnx_with_past(model: TinyGPTWithPast, path) -> None:
    """ONNX export the way torch.onnx.export / optimum write decoders: past_key_values.{i}.key/value in,
    present.{i}.key/value out, dynamic batch, sequence and past length."""
    blk = model.blocks[0]
    d = blk.qkv.in_features
    layers, h = len(model.blocks), blk.heads
    ids = torch.zeros(2, 3, dtype=torch.int64)
    past = [torch.zeros(2, h, 4, d // h) for _ in range(2 * layers)]
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past"} for n in past_names})
    axes.update({n: {0: "batch", 2: "total"} for n in present_names})
    torch.onnx.export(model, (ids, *past), str(path), input_names=["input_ids", *past_names],
                      output_names=["logits", *present_names], dynamic_axes=axes, dynamo=False)


def export_onnx(model: nn.Module, path, seq: int = 8) -> None:
    """ONNX export with named dynamic batch and sequence dims."""
    ids = torch.zeros(1, seq, dtype=torch.int64)
    torch.onnx.export(model, (ids,), str(path), input_names=["input_ids"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
                      dynamo=False)


def with_int4_weights(model: nn.Module, cfg=None) -> nn.Module:
    """A copy of `model` whose nn.Linear weights are replaced by their int4 round trip (the same
    quantizer the compiler uses): the reference that isolates kernel error from quantization error."""
    import copy

    from compiler.quantize import QuantConfig, dequantize, quantize

    cfg = cfg or QuantConfig()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, nn.Linear):
                w = mod.weight.detach().float().numpy()
                deq = dequantize(quantize(w, cfg), w.shape[1], cfg)
                mod.weight.copy_(torch.from_numpy(deq))
    return ref
