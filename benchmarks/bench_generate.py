"""Llama-2-7B-shaped generation on one GPU: nibble int4 against HF transformers and torch's int4 kernel.

The seed's experiment (issue 6): batch 1, a 200-token prompt, then 20 greedy tokens, on
transformers' LlamaForCausalLM with the Llama-2-7B config and random fp16 weights (seed 0), built on
the GPU. Two phases, each runnable alone (a GPU call is limited to 10 minutes; `--phase all` runs both):

  torch   HF fp16 eager (DynamicCache); HF fp16 static cache + torch.compile ("reduce-overhead", the
          decode step captured in CUDA graphs); HF with every nn.Linear swapped for torch's int4
          weight-only kernel (torch._weight_int4pack_mm, bf16 activations as it requires) +
          torch.compile. Then the with-past ONNX export for nibble (nibble/hf.py) into --work.
  nibble  nibble.compile_model(export, cuda), then Generator (compiler/generate.py): prefill ms,
          decode ms/token, tokens/s, effective weight bandwidth; a per-kernel breakdown of one decode
          step from torch.profiler (CUPTI sees TVM's kernels too: same process, same context).

Timing: prefill and each decode step are timed with a device sync around them (what a user waits
for), medians over --repeat runs after a warm-up run; compile / capture time is reported apart.
The weight-read floor per decode token is the weight bytes over the copy bandwidth measured in the
same run. Results: <out>/h200_generate.json (phases merged) and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 rms_norm_eps=1e-5)
TINY = dict(LLAMA2_7B, vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4,
            num_key_value_heads=4)  # --tiny: a smoke test of this script on any machine
PROMPT, NEW = 200, 20
DEV = "cuda"


# --compare NAME: (module, attribute, patch) that builds the model without one of our rewrites
COMPARES = {
    # q/k/v's RoPE and transposes as TVM's three kernels per layer, not compiler/fuse_qkv_rope.py's one
    "qkv_chains": ("compiler.fuse_qkv_rope", "fuse_qkv_rope", lambda f: lambda mod, func_name=None: (mod, 0)),
    # the decode attention loading the past K/V only after it waits (schedules/attention.py early_loads)
    "late_kv": ("compiler.fuse_attention", "attention_func",
                lambda f: lambda *a, **kw: f(*a, **{**kw, "early_loads": False})),
    # the SwiGLU as TVM's kernel after the gate/up GEMV, not written by it (compiler/fuse_swiglu.py)
    "swiglu_chain": ("compiler.fuse_swiglu", "fuse_swiglu", lambda f: lambda mod, arch, func_name=None: (mod, 0)),
}


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def build_model(layers: int, tiny: bool = False):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(**{**(TINY if tiny else LLAMA2_7B), "num_hidden_layers": layers})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(DEV):
        model = transformers.LlamaForCausalLM(cfg).to(torch.float16).eval()
    return model


def prompt_ids(vocab: int):
    import numpy as np

    return np.random.default_rng(0).integers(3, vocab, (1, PROMPT)).astype(np.int64)


def _sync(torch):
    if DEV == "cuda":
        torch.cuda.synchronize()


def _sync_time(fn):
    import torch

    _sync(torch)
    t0 = time.perf_counter()
    out = fn()
    _sync(torch)
    return out, (time.perf_counter() - t0) * 1e3


def copy_bandwidth() -> float:
    """Device copy GB/s (read + write), 1 GiB buffers, median of 20."""
    import torch

    a = torch.empty(1 << 29 if DEV == "cuda" else 1 << 20, dtype=torch.float16, device=DEV)
    b = torch.empty_like(a)
    times = []
    for _ in range(22):
        _, ms = _sync_time(lambda: b.copy_(a))
        times.append(ms)
    return 2 * a.numel() * 2 / (statistics.median(times[2:]) * 1e-3) / 1e9


# -- HF baselines -----------------------------------------------------------------------------------

def hf_eager(model, ids, repeat):
    """Greedy with DynamicCache, one forward per token: (prefill ms, decode ms/token, tokens)."""
    import torch
    import transformers

    x = torch.from_numpy(ids).to(DEV)
    runs = []
    with torch.no_grad():
        for _ in range(repeat + 1):
            cache = transformers.DynamicCache()
            out, pre = _sync_time(lambda: model(x, past_key_values=cache, use_cache=True))
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            toks, steps = [tok], []
            for _ in range(NEW - 1):
                out, ms = _sync_time(lambda: model(tok, past_key_values=cache, use_cache=True))
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(tok)
                steps.append(ms)
            runs.append((pre, statistics.mean(steps), torch.cat(toks, 1).cpu().numpy()))
    runs = runs[1:]
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[-1][2])


def hf_static_compiled(model, ids, repeat):
    """gpt-fast style: StaticCache, eager prefill, decode step compiled ("reduce-overhead": CUDA graphs)."""
    import torch
    import transformers

    x = torch.from_numpy(ids).to(DEV)
    cache = transformers.StaticCache(config=model.config, max_cache_len=PROMPT + NEW + 8)

    def step(tok, pos):
        return model(tok, past_key_values=cache, cache_position=pos, use_cache=True).logits[:, -1]

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    runs = []
    with torch.no_grad():
        for r in range(repeat + 1):
            cache.reset()
            out, pre = _sync_time(lambda: model(x, past_key_values=cache, use_cache=True,
                                                cache_position=torch.arange(PROMPT, device=DEV)).logits[:, -1])
            tok = out.argmax(-1, keepdim=True)
            toks, steps = [tok], []
            for i in range(NEW - 1):
                pos = torch.tensor([PROMPT + i], device=DEV)
                out, ms = _sync_time(lambda: compiled(tok, pos).clone())
                tok = out.argmax(-1, keepdim=True)
                toks.append(tok)
                steps.append(ms)
            runs.append((pre, statistics.mean(steps[3:]), torch.cat(toks, 1).cpu().numpy()))  # 3: compile
    runs = runs[1:]
    return (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs), runs[-1][2])


def swap_int4(model, group: int = 128):
    """Every nn.Linear -> torch._weight_int4pack_mm with nibble's symmetric group-128 quantization
    (same integers and fp16 scales nibble computes; tinygemm wants bf16 scales and activations)."""
    import torch

    from nibble.bench import tinygemm_weight

    class Int4Linear(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.w, self.sz = tinygemm_weight(lin.weight, group, DEV)
            self.n = lin.weight.shape[0]

        def forward(self, x):
            shape = x.shape
            y = torch._weight_int4pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.w, group, self.sz)
            return y.reshape(*shape[:-1], self.n)

    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(mod, child_name, Int4Linear(child))
    return model.to(torch.bfloat16)


# -- phases -----------------------------------------------------------------------------------------

def phase_torch(args, res):
    import torch

    model = build_model(args.layers, args.tiny)
    ids = prompt_ids(model.config.vocab_size)
    wbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    res["fp16_weight_bytes_read_per_token"] = wbytes
    res["copy_GBps"] = copy_bandwidth()
    log(f"model built: {args.layers} layers, {wbytes / 1e9:.2f} GB of weights read per token; "
        f"copy {res['copy_GBps']:.0f} GB/s")
    pre, dec, toks = hf_eager(model, ids, args.repeat)
    res["hf_eager"] = {"prefill_ms": pre, "decode_ms": dec, "tokens": toks.tolist()}
    log(f"HF fp16 eager: prefill {pre:.1f} ms, decode {dec:.2f} ms/token")
    if not args.skip_compile:
        t0 = time.time()
        try:
            pre, dec, toks = hf_static_compiled(model, ids, args.repeat)
            res["hf_compile"] = {"prefill_ms": pre, "decode_ms": dec, "tokens": toks.tolist(),
                                 "wall_s": time.time() - t0}
            log(f"HF fp16 static cache + torch.compile: prefill {pre:.1f} ms, decode {dec:.2f} ms/token "
                f"({time.time() - t0:.0f} s incl. compile)")
        except Exception as e:  # noqa: BLE001  (a baseline failing must not lose the others)
            res["hf_compile_error"] = repr(e)[:500]
            log(f"HF static cache + torch.compile failed: {e!r}"[:500])
    if not args.no_export and not Path(args.work, "model.onnx").exists():
        from nibble.hf import export_causal_lm_with_past

        t0 = time.time()
        export_causal_lm_with_past(model, Path(args.work, "model.onnx"))
        res["export_s"] = time.time() - t0
        log(f"exported {args.work}/model.onnx in {res['export_s']:.0f} s")
    if not args.skip_compile:
        t0 = time.time()
        try:
            model = swap_int4(model)
            pre, dec, toks = hf_static_compiled(model, ids, args.repeat)
            res["torch_int4"] = {"prefill_ms": pre, "decode_ms": dec, "tokens": toks.tolist(),
                                 "wall_s": time.time() - t0}
            log(f"torch int4 swap + torch.compile: prefill {pre:.1f} ms, decode {dec:.2f} ms/token "
                f"({time.time() - t0:.0f} s incl. quantize + compile)")
        except Exception as e:  # noqa: BLE001
            res["torch_int4_error"] = repr(e)[:500]
            log(f"torch int4 swap failed: {e!r}"[:500])
    del model
    torch.cuda.empty_cache()


def kernel_breakdown(m, ids_len: int, steps: int = 3, prefill: bool = False):
    """Per-kernel GPU time of one decode step (past = ids_len; the CUDA-graph step when generate made
    one) or, with prefill, of the prompt's forward pass (ids_len tokens, empty past), from
    torch.profiler: [name, launches, us] per kernel."""
    import numpy as np

    from compiler.generate import Generator
    from compiler.timing import kernel_times

    gen = Generator(m)
    ids = prompt_ids(int(m.outputs[0]["shape"][-1]))[:, :ids_len]
    decoders = getattr(getattr(m, "_generator", None), "_decoders", None)
    if prefill:
        call = lambda: gen._step(ids, gen._empty_past(1), 0)
    else:
        _, past = gen._step(ids, gen._empty_past(1), 0)
        if decoders:  # the step generate times: the fixed-shape one, replayed from its CUDA graph
            dec = next(iter(decoders.values()))
            dec.start(past, ids_len)
            call = lambda: dec.step(np.array([5]))
        else:
            call = lambda: gen._step(np.array([[5]]), past, ids_len)
    kernels = kernel_times(call, steps, warmup=2, cpu=True)
    return sorted(([n, c, t] for n, (c, t) in kernels.items()), key=lambda r: -r[2])


def _nibble_run(args, onnx_path: Path, art: Path, res: dict, key: str, prefill_breakdown: bool = True):
    """Compile onnx_path to art, generate (with and without CUDA graphs), profile: res[key], res[key_*]."""
    import nibble

    t0 = time.time()
    target = {"kind": "cuda", "arch": "sm_90"} if DEV == "cuda" else "llvm"
    nibble.compile_model(str(onnx_path), target=target, output=str(art), max_length=4096,
                         log=lambda *a: log(*a))
    res[f"{key}_compile_s"] = time.time() - t0
    m = nibble.load(art, device=DEV)
    vocab = (TINY if args.tiny else LLAMA2_7B)["vocab_size"]
    ids = prompt_ids(vocab)
    runs = [m.generate(ids, max_new_tokens=NEW) for _ in range(args.repeat + 1)][1:]
    pre = statistics.median(r.prefill_ms for r in runs)
    dec = statistics.median(r.decode_ms_per_token for r in runs)
    graphs = bool(m._generator._decoders)  # the fixed-shape, CUDA-graph decode (compiler/graph_decode.py)
    edges = sum(d.programmatic for d in m._generator._decoders.values())  # compiler/cuda_graph.py
    if graphs:  # the same graph decode with every edge full (stream order), in the same run
        m._generator._decoders.clear()
        m._generator.pdl = False
        flat = [m.generate(ids, max_new_tokens=NEW) for _ in range(args.repeat + 1)][1:]
        res[f"{key}_no_pdl"] = {"decode_ms": statistics.median(r.decode_ms_per_token for r in flat),
                                "tokens": flat[-1].tokens.tolist()}
        log(f"{key}: int4 CUDA graph, {edges} programmatic edges: decode {dec:.2f} ms/token; all edges "
            f"full: {res[f'{key}_no_pdl']['decode_ms']:.2f} ms/token")
        try:
            rows = kernel_breakdown(m, PROMPT)
            res[f"{key}_decode_kernels_no_pdl"] = rows
            log(f"one decode step, full edges: {sum(r[1] for r in rows)} kernels, "
                f"{sum(r[2] for r in rows) / 1e3:.2f} ms of GPU time")
        except Exception as e:  # noqa: BLE001
            log(f"kernel breakdown failed: {e!r}"[:300])
        m._generator._decoders.clear()
        m._generator.pdl = True
        m.generate(ids, max_new_tokens=NEW)  # captured again, with programmatic edges, for the breakdown
    m._generator.graphs = False  # the same model with the growing cache, every kernel launched by the VM
    plain = [m.generate(ids, max_new_tokens=NEW) for _ in range(args.repeat + 1)][1:]
    res[f"{key}_no_graph"] = {"prefill_ms": statistics.median(r.prefill_ms for r in plain),
                              "decode_ms": statistics.median(r.decode_ms_per_token for r in plain),
                              "tokens": plain[-1].tokens.tolist()}
    log(f"{key}: int4 without CUDA graphs: decode {res[f'{key}_no_graph']['decode_ms']:.2f} ms/token")
    wbytes = sum(os.path.getsize(art / f) for f in ("weights.safetensors",))  # int4 + scales + fp16 rest
    cfg = TINY if args.tiny else LLAMA2_7B
    emb = cfg["vocab_size"] * cfg["hidden_size"] * 2  # the embedding table: one row read per token
    res[key] = {"prefill_ms": pre, "decode_ms": dec, "tokens": runs[-1].tokens.tolist(),
                "weight_bytes_read_per_token": wbytes - emb, "cuda_graphs": graphs,
                "tokens_equal_without_graphs": runs[-1].tokens.tolist() == plain[-1].tokens.tolist(),
                "programmatic_edges": edges}
    if f"{key}_no_pdl" in res:
        res[key]["tokens_equal_full_edges"] = runs[-1].tokens.tolist() == res[f"{key}_no_pdl"]["tokens"]
    log(f"{key}: int4: prefill {pre:.1f} ms, decode {dec:.2f} ms/token ({1e3 / dec:.0f} tokens/s, "
        f"{(wbytes - emb) / (dec * 1e-3) / 1e9:.0f} GB/s of weights)")
    for part, what, prefill in ((f"{key}_decode_kernels", "one decode step", False),
                                 (f"{key}_prefill_kernels", f"prefill of {PROMPT} tokens", True)):
        if prefill and not prefill_breakdown:
            continue
        try:
            rows = kernel_breakdown(m, PROMPT, prefill=prefill)
            res[part] = rows
            total = sum(r[2] for r in rows)
            log(f"{what}: {sum(r[1] for r in rows)} kernels, {total / 1e3:.2f} ms of GPU time")
            for name, count, us in rows[:15]:
                log(f"  {us:9.1f} us  x{count:4d}  {name[:90]}")
        except Exception as e:  # noqa: BLE001  (the breakdown is a diagnostic, not the benchmark)
            log(f"kernel breakdown failed: {e!r}"[:300])


def phase_nibble(args, res):
    import numpy as np

    onnx_path = Path(args.work, "model.onnx")
    if not onnx_path.exists():
        log("no export from the torch phase here: exporting")
        from nibble.hf import export_causal_lm_with_past

        model = build_model(args.layers, args.tiny)
        export_causal_lm_with_past(model, onnx_path)
        del model
    _nibble_run(args, onnx_path, Path(args.work, "model.nibble"), res, "nibble")
    if args.compare_fallback:  # the same model with the CUDA-core GEMV routes, in the same run
        import compiler.dispatch as dispatch

        routes, dispatch.ROUTES = dispatch.ROUTES, dispatch.FALLBACK_ROUTES  # routes_for reads ROUTES
        try:
            _nibble_run(args, onnx_path, Path(args.work, "model_fallback.nibble"), res, "nibble_fallback_routes",
                        prefill_breakdown=False)
        finally:
            dispatch.ROUTES = routes
    if args.compare:  # the same model without one of our rewrites, built in the same run
        import importlib

        module, attr, patch = COMPARES[args.compare]
        mod = importlib.import_module(module)
        keep = getattr(mod, attr)
        setattr(mod, attr, patch(keep))  # read at build time (prepare / the attention rewrite)
        key = f"nibble_{args.compare}"
        try:
            _nibble_run(args, onnx_path, Path(args.work, f"model_{args.compare}.nibble"), res, key,
                        prefill_breakdown=False)
        finally:
            setattr(mod, attr, keep)
        # the two CUDA-graph decodes again, alternating, so neither gets the GPU's better minutes
        import nibble
        from compiler.generate import Generator

        arts = {"nibble": Path(args.work, "model.nibble"), key: Path(args.work, f"model_{args.compare}.nibble")}
        models = {k: nibble.load(a, device=DEV) for k, a in arts.items()}
        for k, a in arts.items():  # and each in plain stream order (no programmatic edges)
            models[f"{k}_full_edges"] = m = nibble.load(a, device=DEV)
            m._generator = Generator(m)
            m._generator.pdl = False
        ids = prompt_ids((TINY if args.tiny else LLAMA2_7B)["vocab_size"])
        times = {k: [] for k in models}
        for _ in range(2 * args.repeat + 1):
            for k, m in models.items():
                times[k].append(m.generate(ids, max_new_tokens=NEW).decode_ms_per_token)
        res["ab_interleaved"] = {k: statistics.median(t[1:]) for k, t in times.items()}
        log(f"alternating, decode ms/token: {res['ab_interleaved']}")
    if "hf_eager" in res:
        a, b = np.array(res["hf_eager"]["tokens"]), np.array(res["nibble"]["tokens"])
        res["nibble"]["tokens_equal_hf_fp16_prefix"] = int(np.argmin(np.append(a[0] == b[0], False)))


def write(res, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "h200_generate.json").write_text(json.dumps(res, indent=1, default=str))
    floor_int4 = res.get("nibble", {}).get("weight_bytes_read_per_token")
    bw = res.get("copy_GBps")
    lines = [f"# Llama-2-7B-shaped generation (batch 1, prompt {PROMPT}, {NEW} new tokens)", "",
             f"{res['device']}; {res['versions']}; {res['date']}", "",
             "| system | prefill ms | decode ms/token | tokens/s |", "|---|---|---|---|"]
    for key, label in [("hf_eager", "HF fp16 eager"), ("hf_compile", "HF fp16 static cache + torch.compile"),
                       ("torch_int4", "torch int4 swap + torch.compile"),
                       ("nibble_no_graph", "nibble int4, growing cache, no CUDA graph"),
                       ("nibble_no_pdl", "nibble int4, padded cache in a CUDA graph, stream-order edges"),
                       ("nibble", "nibble int4" + (", padded cache in a CUDA graph" if res.get("nibble", {}).get("cuda_graphs") else "")
                        + (f", {res['nibble']['programmatic_edges']} programmatic edges" if res.get("nibble", {}).get("programmatic_edges") else "")),
                       ("nibble_fallback_routes", "nibble int4, same, CUDA-core GEMV routes (dispatch.FALLBACK_ROUTES)")]:
        if key in res:
            r = res[key]
            pre = f"{r['prefill_ms']:.1f}" if "prefill_ms" in r else "-"
            lines.append(f"| {label} | {pre} | {r['decode_ms']:.2f} | {1e3 / r['decode_ms']:.0f} |")
    if bw and floor_int4:
        lines += ["", f"Weight-read floor per decode token at {bw:.0f} GB/s copy: int4 "
                      f"{floor_int4 / bw / 1e6:.3f} ms" + (f", fp16 {res['fp16_weight_bytes_read_per_token'] / bw / 1e6:.3f} ms"
                                                       if "fp16_weight_bytes_read_per_token" in res else "")]
    for key, what in (("nibble_decode_kernels", "One nibble decode step (with programmatic edges a kernel's time "
                       "includes its wait for the one before)"),
                      ("nibble_decode_kernels_no_pdl", "One nibble decode step, stream-order edges"),
                      ("nibble_fallback_routes_decode_kernels", "One nibble decode step, CUDA-core GEMV routes"),
                      ("nibble_prefill_kernels", f"nibble's prefill ({PROMPT} tokens, VM path)")):
        if res.get(key):
            rows = res[key]
            lines += ["", f"{what}, GPU time per kernel (torch.profiler):", "",
                      "| us | launches | kernel |", "|---|---|---|"]
            lines += [f"| {us:.1f} | {c} | `{n[:80]}` |" for n, c, us in rows[:20]]
            lines.append(f"| {sum(r[2] for r in rows):.1f} | {sum(r[1] for r in rows)} | total |")
    (out / "h200_generate.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {out}/h200_generate.json and .md")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", choices=["torch", "nibble", "all"], default="all")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-compile", action="store_true", help="no torch.compile baselines")
    ap.add_argument("--no-export", action="store_true", help="torch phase: leave the ONNX export to the nibble phase")
    ap.add_argument("--compare-fallback", action="store_true",
                    help="nibble phase: also build and time the model with dispatch.FALLBACK_ROUTES (CUDA-core GEMV)")
    ap.add_argument("--compare", choices=sorted(COMPARES),
                    help="nibble phase: also the model without one rewrite (COMPARES), built and timed in the same run")
    ap.add_argument("--tiny", action="store_true", help="a small Llama config, on the CPU without a GPU")
    ap.add_argument("--work", default=str(ROOT / ".bench" / "llama7b-pos"), help="export + artifact folder")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    import torch

    global DEV
    DEV = "cuda" if torch.cuda.is_available() else "cpu"
    if DEV == "cpu" and not args.tiny:
        sys.exit("no GPU here: run with --tiny for a smoke test")
    out = Path(args.out)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    prev = out / "h200_generate.json"
    res = json.loads(prev.read_text()) if args.phase != "all" and prev.exists() else {}  # phases merge
    res.update(device=torch.cuda.get_device_name() if DEV == "cuda" else platform.processor() or "cpu", date=datetime.date.today().isoformat(),
               versions=f"python {platform.python_version()}, torch {torch.__version__}")
    try:
        if args.phase in ("torch", "all"):
            phase_torch(args, res)
            write(res, out)
        if args.phase in ("nibble", "all"):
            import tvm

            res["versions"] += f", tvm {tvm.__version__}"
            phase_nibble(args, res)
    finally:
        write(res, out)


if __name__ == "__main__":
    main()
