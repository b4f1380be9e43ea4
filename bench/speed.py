"""Decode speed of a skipped bundle against its unskipped twin, on a TinyLlama-1.1B-shaped model.

Speed depends on the shapes, not on the weight values, so the model is built with transformers from
TinyLlama-1.1B's config with random weights (no download), saved as fp16 safetensors, then exported
with edgekit at skip 0 and with 6 of 22 layers' attention removed (~25%), for each weight format.
Each twin pair is profiled with `edgekit.runtime.profile` interleaved (A B A B …, one child process per run),
at 128 and 1,024 tokens of context, and the ratios come from that one run. Everything built is cached
under bench/work/speed/ (gitignored).

    python bench/speed.py                                # int4, int8, fp32; 2 threads; 3 runs
    python bench/speed.py --quants int4 --runs 5 --threads 4
    python bench/speed.py --build-only                   # checkpoint + exports, no profiling
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from make_checkpoint import make_checkpoint  # bench/ is on sys.path when run as a script
from peers_report import cpu_name

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "speed"


def build_checkpoint(out: Path) -> Path:
    """TinyLlama-1.1B-shaped random checkpoint, made and cached by bench/make_checkpoint.py."""
    return make_checkpoint("tinyllama-1.1b", out)


def build_bundle(ckpt: Path, skip: int, quant: str) -> Path:
    from edgekit.export.pipeline import ExportRequest, export
    from edgekit.export.quantize import QuantConfig

    out = WORK / f"tinyllama-1.1b-skip{skip}-{quant}"
    if (out / "edgekit.json").is_file():
        return out
    t = time.perf_counter()
    req = ExportRequest(
        model=str(ckpt),
        skip=skip,
        # the CLI's default for int4: lm_head at 8 bits
        quant=QuantConfig(mode=quant, lm_head_bits=8 if quant == "int4" else None),
        output=out,
        force=True,
        verify=False,  # random weights: parity is tested on real models; here only speed matters
        command=f"edgekit export {ckpt} --skip {skip} --quant {quant} --no-verify -o {out}",
    )
    export(req)
    print(f"exported {out.name} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quants", default="int4,int8,fp32", help="weight formats, comma-separated")
    ap.add_argument("--skip", type=int, default=6, help="layers whose attention is removed (of 22)")
    ap.add_argument("--prompt-len", default="128,1024", help="contexts to profile, comma-separated")
    ap.add_argument("--gen-len", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--runs", type=int, default=3, help="runs per bundle (interleaved)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads")
    ap.add_argument(
        "--spin",
        action="store_true",
        help="let onnxruntime's idle threads spin (default off: on a shared machine spinning burns others' cores "
        "and inflates CPU time)",
    )
    ap.add_argument("--build-only", action="store_true", help="build checkpoint and bundles, do not profile")
    ap.add_argument("--json", type=Path, default=WORK / "results.json", help="where to write all numbers")
    args = ap.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    ckpt = build_checkpoint(WORK / "ckpt-tinyllama-1.1b")
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    pairs = {q: (build_bundle(ckpt, 0, q), build_bundle(ckpt, args.skip, q)) for q in quants}
    if args.build_only:
        return

    from edgekit.runtime.profile import ProfileRequest, profile
    from edgekit.runtime.profile_report import format_report

    prompt_lens = tuple(int(x) for x in args.prompt_len.split(","))
    results = {}
    for q, (base, skipped) in pairs.items():
        req = ProfileRequest(
            bundles=(base, skipped),
            prompt_lens=prompt_lens,
            gen_len=args.gen_len,
            runs=args.runs,
            threads=args.threads,
            spin=args.spin,
            check_integrity=False,  # sha256 of 4 GB per run would only add minutes
        )
        report = profile(req)
        print(f"\n## {q}\n{format_report(report)}", flush=True)
        results[q] = report.to_dict()
    meta = {
        "command": "python bench/speed.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {platform.processor() or '?'}, {cpu_name()}",
        "threads": args.threads,
        "spin": args.spin,
        "load_average_at_end": list(os.getloadavg()),
    }
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nnumbers: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
