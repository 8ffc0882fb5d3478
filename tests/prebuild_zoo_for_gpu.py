"""Build, on the CPU-only machine, the transformers zoo for the GPU (tests/test_zoo_gpu.py runs it there).

    python tests/prebuild_zoo_for_gpu.py OUTDIR [--cases ID,ID,...]
    # then carry OUTDIR (tar -cJf) and run: NIBBLE_PREBUILT_ZOO=OUTDIR python -m pytest -m gpu tests/test_zoo_gpu.py
    # a local rehearsal of the whole path on the CPU:
    python tests/prebuild_zoo_for_gpu.py /tmp/z --cases gpt2-ts --target llvm && python tests/test_zoo_gpu.py /tmp/z --device cpu

For every zoo case (tests/test_zoo.py: each model prefill, the decoders also with past; by the zoo's
ids, e.g. gpt2-ts, llama_decode-dynamo) that is not a known failure: export it as the zoo does, build
the fp32 (quantize=False) and the int4 artifact for CUDA sm_90 (real cubins, nvcc, no GPU needed),
and save the inputs of both of the zoo's shapes with the zoo's references (test_zoo.reference for
fp32, test_zoo.int4_references for int4) into OUTDIR/<id>.npz; OUTDIR/index.json lists it all (the
format is described in tests/test_zoo_gpu.py). Ends with a dry run of the GPU test's checks.
"""
import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nibble  # noqa: E402
from tests import test_zoo as zoo  # noqa: E402  (needs transformers: this machine only)
from tests.test_zoo_gpu import FORMAT, INDEX, VERSION, check_folder, npz_key  # noqa: E402

def build_case(m, e, d, out: Path, export_dir: str, target: dict, log) -> dict:
    """Both artifacts and the .npz of one case; returns its index entry."""
    cid = zoo.case_id(m, e, d)
    path = zoo.export(m, e, d, export_dir)
    arts = {}
    for kind, quantize in (("fp32", False), ("int4", True)):
        t0 = time.perf_counter()
        arts[kind] = f"{cid}.{kind}.nibble"
        nibble.compile_model(path, quantize=quantize, output=out / arts[kind], log=lambda *a: None, **target)
        log(f"  {kind} built in {time.perf_counter() - t0:.0f} s")
    shapes = zoo.DECODE_SHAPES if d else zoo.SHAPES
    data = {}
    for i, shape in enumerate(shapes):
        x = zoo.inputs(m, shape, d, seed=zoo.FP32_SEED)
        data.update({npz_key("fp32", i, "in", j): a for j, a in enumerate(x)})
        data.update({npz_key("fp32", i, "ref", k): np.asarray(r) for k, r in
                     enumerate(zoo.reference(m, path, d, x))})
        x = zoo.inputs(m, shape, d, seed=zoo.INT4_SEED)
        deq, fp = zoo.int4_references(m, d, x)
        data.update({npz_key("int4", i, "in", j): a for j, a in enumerate(x)})
        data.update({npz_key("int4", i, "deq", k): r for k, r in enumerate(deq)})
        data.update({npz_key("int4", i, "fp", k): r for k, r in enumerate(fp)})
    np.savez_compressed(out / f"{cid}.npz", **data)
    return {"id": cid, "model": m, "exporter": e, "decode": d, "shapes": [list(s) for s in shapes],
            "input_names": zoo.input_names(d), "data": f"{cid}.npz", "artifacts": arts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--cases", help="comma-separated zoo ids (default: every case that is not a known failure)")
    ap.add_argument("--target", choices=["cuda", "llvm"], default="cuda",
                    help="cuda (sm_90, the default) or llvm to rehearse the GPU test on this CPU")
    args = ap.parse_args(argv)
    arch = {"arch": "sm_90"} if args.target == "cuda" else {}
    known = {**zoo.IMPORT_FAILURES, **zoo.BUILD_FAILURES}
    cases = [c for c in zoo.ALL if not args.cases or zoo.case_id(*c) in args.cases.split(",")]
    if args.cases and len(cases) != len(args.cases.split(",")):
        sys.exit(f"unknown case in --cases; the zoo's ids: {[zoo.case_id(*c) for c in zoo.ALL]}")
    out = args.outdir
    out.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "version": VERSION, "target": {"kind": args.target, **arch},
             "tolerances": {"fp32": zoo.FP32_TOL, "int4": zoo.INT4_TOL, "int4_vs_fp32": 0.5},
             "cases": [], "skipped": {}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as export_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in cases:
            cid = zoo.case_id(*c)
            if c in known:
                index["skipped"][cid] = f"known failure: {known[c]}"
                continue
            print(f"{cid}:", flush=True)
            try:
                index["cases"].append(build_case(*c, out, export_dir, {"target": args.target, **arch}, lambda s: print(s, flush=True)))
            except Exception as e:  # one broken case must not cost the others; the index says why
                msg = str(e).strip().splitlines()
                index["skipped"][cid] = f"prebuild failed: {type(e).__name__}: {msg[-1] if msg else ''}"
                print(f"  FAILED: {index['skipped'][cid]}", flush=True)
            (out / INDEX).write_text(json.dumps(index, indent=1))  # after each case: usable if interrupted
    print(f"{len(index['cases'])} cases prebuilt, {len(index['skipped'])} skipped, "
          f"{time.perf_counter() - t_all:.0f} s; dry run of the GPU checks:")
    bad = check_folder(out, device=None)
    return 1 if bad or any(v.startswith("prebuild failed") for v in index["skipped"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
