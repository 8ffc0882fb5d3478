"""Export a Hugging Face causal LM "with past" the way optimum writes decoders, for `nibble generate`.

    (input_ids[b, s], attention_mask[b, past + s], position_ids[b, s],
     past_key_values.{i}.key/value[b, kv_heads, past, d])
        -> (logits[b, s, vocab], present.{i}.key/value[b, kv_heads, past + s, d])

with batch, sequence and past length dynamic (TorchScript exporter: its graphs import with frontends/,
see tests/test_zoo.py). position_ids (the tokens' true positions) lets nibble decode from a left-padded
cache of fixed length, captured in a CUDA graph (compiler/graph_decode.py). Models over 2 GB get
their weights as external data beside the .onnx file. transformers is imported lazily: nibble itself does not depend on it.
"""
from __future__ import annotations

from pathlib import Path


def _wrapper(model):
    import torch
    import transformers

    layers = model.config.num_hidden_layers

    class WithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = transformers.DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            kv = out.past_key_values
            return (out.logits,) + tuple(t for i in range(layers) for t in (kv.layers[i].keys, kv.layers[i].values))

    return WithPast().eval()


def cache_shape(config, batch: int, past: int) -> tuple:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (batch, heads, past, head_dim)


def export_causal_lm_with_past(model, path) -> Path:
    """torch.onnx.export (TorchScript) of `model` (a transformers *ForCausalLM) with past key/values."""
    import warnings

    import torch

    cfg = model.config
    layers = cfg.num_hidden_layers
    p = next(model.parameters())
    ids = torch.zeros(2, 3, dtype=torch.int64, device=p.device)
    mask = torch.ones(2, 4 + 3, dtype=torch.int64, device=p.device)
    positions = torch.arange(4, 4 + 3, device=p.device).expand(2, 3)
    past = [torch.zeros(cache_shape(cfg, 2, 4), dtype=p.dtype, device=p.device) for _ in range(2 * layers)]
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    axes.update({n: {0: "batch", 2: "past"} for n in past_names})
    axes.update({n: {0: "batch", 2: "total"} for n in present_names})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(_wrapper(model), (ids, mask, positions, *past), str(path), dynamo=False,
                          opset_version=17, input_names=["input_ids", "attention_mask", "position_ids", *past_names],
                          output_names=["logits", *present_names], dynamic_axes=axes)
    return path
