"""The `nibble` command line: compile, run, inspect, demo.

Every error prints one line naming what is wrong and exits 1 (2 for usage errors); --debug shows the
traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from compiler.errors import NibbleError

EPILOG = """examples:
  nibble demo                                   build, run and check the built-in example model
  nibble compile model.onnx --target cuda --arch sm_90      -> model.nibble/
  nibble compile model.pt2 --target llvm --group-size 64    torch.export program, CPU build
  nibble compile model.onnx --shape input_ids=1x?           pin batch to 1, keep seq dynamic
  nibble run model.nibble --input input_ids=ids.npy --save out.npz
  nibble inspect model.nibble
  nibble tune model.onnx --target cuda --trials 200         then compile picks the records up
  nibble bench --ms 1,16,200                    int4 linears vs cuBLAS fp16 / torch int4 on this GPU
"""


def _shape(text: str) -> tuple[str, tuple]:
    """"name=1x128" or "name=1x?" -> (name, (1, None))."""
    if "=" not in text:
        raise NibbleError(f"--shape {text!r}: expected NAME=DIMS like input_ids=1x128 (? keeps a dim dynamic)")
    name, dims = text.split("=", 1)
    out = []
    for d in dims.lower().split("x"):
        if d in ("?", "-1", ""):
            out.append(None)
        elif d.isdigit():
            out.append(int(d))
        else:
            raise NibbleError(f"--shape {text!r}: dim {d!r} is neither a number nor ?")
    return name, tuple(out)


def cmd_compile(a) -> int:
    from compiler.build import BuildOptions, compile_model
    from compiler.quantize import QuantConfig

    compile_model(a.model, output=a.output, options=_options(a), log=lambda s: print(s, flush=True))
    return 0


def _options(a):
    from compiler.build import BuildOptions
    from compiler.quantize import QuantConfig

    return BuildOptions(target=a.target, arch=a.arch, quantize=not a.no_quantize,
                        quant=QuantConfig(a.group_size, not a.asym), skip=tuple(a.skip),
                        min_size=a.min_size, shapes=dict(_shape(s) for s in a.shape) or None,
                        max_length=getattr(a, "max_length", None),
                        tuning=False if getattr(a, "no_tuning", False) else getattr(a, "tuning_log", None))


def cmd_tune(a) -> int:
    """Import + quantize as compile does, then search every int4 and decode attention kernel's knobs on
    this machine."""
    from compiler.build import lower, prepare
    from compiler.target import resolve
    from compiler.tuning import TuningLog, extract_tasks, tune
    from frontends import import_model

    opts = _options(a)
    spec = resolve(opts.target, opts.arch)
    if spec["kind"] == "cuda":
        from compiler.target import local_gpu_arch

        here = local_gpu_arch()
        if here != spec["arch"]:
            raise NibbleError(f"tuning measures on the GPU: this machine has {here or 'no GPU'}, not {spec['arch']}")
    imp = import_model(a.model, None, opts.shapes)
    mod, _, _, _ = lower(imp, opts, log=lambda s: print(s, flush=True))  # as compile does
    mod, _ = prepare(mod, spec)
    tasks = extract_tasks(mod, spec)
    if not tasks:
        print("nothing to tune (no int4 or decode attention kernels)")
        return 0
    log = TuningLog(Path(a.log), spec) if a.log else TuningLog.default(spec)
    print(f"{len(tasks)} tasks, {a.trials} trials, records -> {log.path}", flush=True)
    best = tune(tasks, spec, log, a.trials, a.resume, out=lambda s: print(s, flush=True))
    print("\nbest per task (us; template default in brackets):")
    for key, b in best.items():
        d = f"{b['default_us']:.2f}" if b.get("default_us") else "?"
        print(f"  {key}: {b['us']:.2f} [{d}]  {b['config']}")
    return 0


def _load_input(text: str) -> tuple[str, np.ndarray]:
    if "=" not in text:
        raise NibbleError(f"--input {text!r}: expected NAME=FILE.npy")
    name, f = text.split("=", 1)
    try:
        return name, np.load(f, allow_pickle=False)
    except FileNotFoundError:
        raise NibbleError(f"--input {name}: {f}: no such file") from None
    except Exception as e:
        raise NibbleError(f"--input {name}: {f}: not a .npy array ({e})") from None


def cmd_run(a) -> int:
    import nibble

    m = nibble.load(a.artifact, a.device)
    inputs = dict(_load_input(t) for t in a.input)
    t0 = time.perf_counter()
    out = m(**inputs)
    dt = time.perf_counter() - t0
    outs = out if isinstance(out, tuple) else (out,)
    for spec, o in zip(m.outputs, outs):
        o64 = o.astype(np.float64)
        print(f"{spec['name']}: shape {list(o.shape)} {o.dtype}  sum {o64.sum():.6g}  "
              f"mean|x| {np.abs(o64).mean():.6g}  finite {bool(np.isfinite(o64).all())}")
    print(f"first call {dt * 1e3:.2f} ms (includes upload)")
    if a.save:
        tmp = Path(a.save).with_suffix(".tmp.npz")
        np.savez(tmp, **{s["name"]: o for s, o in zip(m.outputs, outs)})
        tmp.replace(a.save)
        print(f"saved {a.save}")
    return 0


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise NibbleError(f"token ids must be comma-separated integers, got {text!r}") from None


def cmd_generate(a) -> int:
    import nibble

    m = nibble.load(a.artifact, a.device)
    prompts = [_ids(p) for p in a.prompt_ids]
    if len({len(p) for p in prompts}) != 1:
        raise NibbleError("every --prompt-ids must have the same length (a batch of equal-length prompts)")
    g = m.generate(np.array(prompts, np.int64), a.max_new_tokens, do_sample=a.do_sample,
                   temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, stop_tokens=_ids(a.stop),
                   seed=a.seed)
    for row in g.tokens:
        print(",".join(str(int(t)) for t in row))
    print(f"prefill {g.prefill_ms:.2f} ms ({len(prompts[0])} tokens x {len(prompts)}), decode "
          f"{g.decode_ms_per_token:.2f} ms/token over {g.steps} steps ({g.tokens_per_s:.1f} tokens/s per sequence)")
    return 0


def _fmt_io(io) -> str:
    return f"{io['name']}: [{', '.join(str(d) for d in io['shape'])}] {io['dtype']}"


def cmd_inspect(a) -> int:
    from compiler.artifact import read_manifest

    meta = read_manifest(Path(a.artifact))
    if a.json:
        print(json.dumps(meta, indent=1))
        return 0
    t = meta["target"]
    print(f"{a.artifact}: built by nibble {meta['nibble_version']} with TVM {meta['tvm_version']} "
          f"from {meta['source']}")
    print(f"target: {t['kind']}{' ' + t['arch'] if 'arch' in t else ''}"
          f"{'  (cubins: ' + ', '.join(meta['cubins']) + ')' if meta.get('cubins') else ''}")
    print("inputs:\n  " + "\n  ".join(_fmt_io(i) for i in meta["inputs"]))
    print("outputs:\n  " + "\n  ".join(_fmt_io(o) for o in meta["outputs"]))
    q = meta["quantization"]
    layers = meta["layers"]
    nq = sum(l["quantized"] for l in layers)
    if q is None:
        print("quantization: none (--no-quantize)")
    else:
        g = "per-channel" if q["group_size"] == -1 else f"group {q['group_size']}"
        wb = meta["weight_bytes"]
        print(f"quantization: int4 {g}, {'symmetric' if q['symmetric'] else 'asymmetric'}; {nq} of "
              f"{len(layers)} linear layers; {wb['linear_fp16'] / 1e6:.2f} MB fp16 -> "
              f"{wb['linear_int4'] / 1e6:.2f} MB int4")
        for l in layers:
            note = f"  ({l['note']})" if l["note"] else ""
            print(f"  {'int4' if l['quantized'] else 'kept'}  {l['name']}  [{l['n']} x {l['k']}]{note}")
    kernels = meta.get("kernels", {})
    if kernels:
        tuned = [k for k, v in kernels.items() if v["tuned"]]
        print(f"kernels: {len(tuned)} of {len(kernels)} tuned")
        for k, v in kernels.items():
            print(f"  {'tuned  ' + str(v['config']) if v['tuned'] else 'default'}  {k}")
    print(f"files: " + ", ".join(f"{k} {v['bytes'] / 1e6:.2f} MB" for k, v in meta["files"].items()))
    return 0


def cmd_demo(a) -> int:
    from nibble.demo import run_demo

    return run_demo(a.target, a.arch, Path(a.dir))


def cmd_bench(a) -> int:
    from nibble import bench

    shapes = bench.parse_shapes(a.shapes) if a.shapes else bench.SHAPES
    ms = bench.parse_ms(a.ms) if a.ms else bench.MS
    bench.run(shapes, ms, Path(a.out), a.arch)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nibble", description="int4 weight-only (W4A16) compiler for "
                                "linear-heavy networks, built on Apache TVM.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    c = sub.add_parser("compile", help="compile an .onnx or .pt2 model into a .nibble artifact folder",
                       description="Import the model, rewrite every linear layer (MatMul/Gemm/aten.linear "
                       "with a constant weight) into a fused int4 weight-only matmul, build for the target "
                       "and write an artifact folder (library, weights, manifest).")
    c.add_argument("model", help="model file: .onnx (external data beside it is read) or .pt2 "
                   "(torch.export.save)")
    c.add_argument("-o", "--output", help="artifact folder to write (default: MODEL_STEM.nibble)")
    c.add_argument("--target", default="cuda", help="cuda (default) or llvm (CPU)")
    c.add_argument("--arch", help="CUDA arch to build for, e.g. sm_90 (default: the local GPU's)")
    c.add_argument("--group-size", type=int, default=128,
                   help="columns of K per fp16 scale: 32, 64, 128 (default) or -1 for per-channel")
    c.add_argument("--asym", action="store_true", help="asymmetric int4 (a zero point per group)")
    c.add_argument("--no-quantize", action="store_true",
                   help="keep linear layers as imported (same graph, no int4): a baseline build")
    c.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="do not quantize weights whose name matches this glob (repeatable), e.g. '*head*'")
    c.add_argument("--min-size", type=int, default=0,
                   help="quantize only weights with at least this many elements")
    c.add_argument("--shape", action="append", default=[], metavar="NAME=DIMS",
                   help="pin an input's dims, e.g. input_ids=1x128 or input_ids=1x? (? stays dynamic)")
    c.add_argument("--max-length", type=int, help="the most tokens the model can attend to (generate "
                   "refuses longer prompts)")
    c.add_argument("--tuning-log", metavar="PATH", help="tuning records to apply (default: "
                   "tuning_logs/<arch>.jsonl when present)")
    c.add_argument("--no-tuning", action="store_true", help="ignore tuning records: template defaults")
    c.set_defaults(func=cmd_compile)

    t = sub.add_parser("tune", help="search the int4 kernels' schedule knobs on this machine's device",
                       description="Quantize the model as compile would, then time schedule candidates for "
                       "every int4 kernel (GEMV buckets, GEMM; the CPU kernel for llvm), proposed by "
                       "meta-schedule's evolutionary search and XGBoost cost model. Records append to "
                       "tuning_logs/<arch>.jsonl; every later compile for that arch uses the best.")
    t.add_argument("model")
    t.add_argument("--target", default="cuda")
    t.add_argument("--arch")
    t.add_argument("--trials", type=int, default=64, help="candidates to time in total (default 64)")
    t.add_argument("--resume", action="store_true", help="count what the log already measured; run only new candidates")
    t.add_argument("--log", metavar="PATH", help="the records file (default tuning_logs/<arch>.jsonl)")
    for flag, kw in (("--group-size", dict(type=int, default=128)), ("--asym", dict(action="store_true")),
                     ("--min-size", dict(type=int, default=0)), ("--skip", dict(action="append", default=[])),
                     ("--shape", dict(action="append", default=[]))):
        t.add_argument(flag, **kw, help="as for compile")
    t.set_defaults(func=cmd_tune, no_quantize=False)

    r = sub.add_parser("run", help="run an artifact on .npy inputs; prints shapes and checksums")
    r.add_argument("artifact")
    r.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    r.add_argument("--device", help="cuda or cpu (default: what it was built for)")
    r.add_argument("--save", metavar="OUT.npz", help="save the outputs")
    r.set_defaults(func=cmd_run)

    i = sub.add_parser("inspect", help="show an artifact's inputs, outputs, target and quantized layers")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print the whole manifest")
    i.set_defaults(func=cmd_inspect)

    g = sub.add_parser("generate", help="generate tokens with a decoder compiled with past key/values",
                       description="Prefill the prompt, then decode token by token with the KV cache kept "
                       "on the device. Prints the new tokens (one line per prompt) and prefill/decode timings.")
    g.add_argument("artifact")
    g.add_argument("--prompt-ids", action="append", required=True, metavar="1,2,3",
                   help="prompt token ids (repeat for a batch of equal-length prompts)")
    g.add_argument("--max-new-tokens", type=int, default=20)
    g.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", default="", metavar="IDS", help="stop tokens, comma-separated")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="cuda or cpu (default: what it was built for)")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="time the int4 linear kernels on this GPU against cuBLAS fp16 and torch int4",
                       description="For each K->N linear, compile an fp16 nn.Linear with int4 weights as "
                       "compile does, then time it at each token count M beside cuBLAS fp16, torch's int4 "
                       "kernel and a copy moving the same bytes (CUDA graphs, weights from HBM). Prints "
                       "us, GB/s, TFLOP/s and ratios; writes bench.json, bench.md and roofline.png.")
    b.add_argument("--shapes", help="K->N linears as KxN,KxN,... (default: Llama-2-7B's "
                   "4096x12288,4096x4096,4096x22016,11008x4096)")
    b.add_argument("--ms", help="token counts, comma-separated (default 1,2,4,8,16,32,200,2048)")
    b.add_argument("--arch", help="CUDA arch (default: the local GPU's)")
    b.add_argument("--out", default="nibble-bench", help="folder for the results (default nibble-bench)")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="build, run and check the built-in example (a small GPT-style model)")
    d.add_argument("--target", default=None, help="cuda or llvm (default: cuda if a GPU is here, else llvm)")
    d.add_argument("--arch", help="CUDA arch (default: the local GPU's)")
    d.add_argument("--dir", default="nibble-demo", help="where to write the model and artifact")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except NibbleError as e:
        if args.debug:
            raise
        print(f"nibble {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"nibble {args.cmd}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal failure: still one line, the traceback with --debug
        if args.debug:
            raise
        first = str(e).strip().splitlines()
        print(f"nibble {args.cmd}: internal error: {type(e).__name__}: {first[-1] if first else ''} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
