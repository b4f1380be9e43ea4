"""Soak: generate many tokens with one Generator (one session, cache reset per call) and watch RSS.

A runtime embedded in an app generates for hours; anything it leaks per step or per call shows up as
resident memory that keeps climbing. This runs `--tokens` tokens in calls of `--chunk` new tokens each
(sampling, EOS ignored, prompts of varying length so the prefill path runs too), samples the process's
RSS after every call, and reports the growth after the warm-up calls. Exit status 1 when growth
exceeds `--max-growth`.

    python bench/soak.py --bundle out/stories260k-skip2-int4 --tokens 10000
    python bench/soak.py --tokens 100000 --json     # exports stories260k (skip 2, int4) to a temp folder first
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from edgekit.runtime.generator import GenerationConfig, Generator

PROMPTS = ["Once upon a time", "Lily and Ben went to the park. They saw a big dog and", "The sun", "Tom had a ball."]


def soak(bundle: Path, tokens: int, chunk: int, warmup_fraction: float = 0.2) -> dict:
    proc = psutil.Process()
    gen = Generator(bundle)
    calls = max(1, -(-tokens // chunk))
    rss, produced = [], 0
    start = time.perf_counter()
    for i in range(calls):
        cfg = GenerationConfig(max_new_tokens=chunk, temperature=0.9, top_p=0.95, seed=i, stop_on_eos=False)
        result = gen.generate(PROMPTS[i % len(PROMPTS)], cfg)
        produced += len(result.token_ids)
        rss.append(proc.memory_info().rss)
    seconds = time.perf_counter() - start
    warm = max(1, int(calls * warmup_fraction))
    base = rss[warm - 1]
    return {
        "bundle": str(bundle),
        "tokens": produced,
        "calls": calls,
        "chunk": chunk,
        "seconds": round(seconds, 2),
        "tokens_per_s": round(produced / seconds, 1),
        "warmup_calls": warm,
        "rss_after_warmup_mb": round(base / 2**20, 2),
        "rss_final_mb": round(rss[-1] / 2**20, 2),
        "rss_max_after_warmup_mb": round(max(rss[warm - 1 :]) / 2**20, 2),
        "growth_after_warmup": round(max(rss[warm - 1 :]) / base - 1, 5),
        "torch_imported": "torch" in sys.modules,  # a device app carries no torch
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="bundle to run [default: export stories260k skip 2 int4]")
    ap.add_argument("--tokens", type=int, default=10_000)
    ap.add_argument("--chunk", type=int, default=200, help="new tokens per call (cache reset between calls)")
    ap.add_argument("--max-growth", type=float, default=0.03, help="allowed RSS growth after warm-up (0.03 = 3%%)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            bundle = Path(tmp) / "b"
            cmd = [sys.executable, "-c", "from edgekit.cli import main; main()", "export", "stories260k"]
            args_ = [*cmd, "--skip", "2", "--quant", "int4", "-o", str(bundle)]
            subprocess.run(args_, check=True, stdout=sys.stderr)  # keep stdout for the report
        report = soak(bundle, args.tokens, args.chunk)
    report["max_growth"] = args.max_growth
    report["passed"] = report["growth_after_warmup"] <= args.max_growth
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['tokens']} tokens in {report['calls']} calls, {report['tokens_per_s']} tok/s; RSS "
            f"{report['rss_after_warmup_mb']} MB after warm-up, max {report['rss_max_after_warmup_mb']} MB, "
            f"final {report['rss_final_mb']} MB: growth {report['growth_after_warmup']:.2%} "
            f"({'ok' if report['passed'] else 'FAIL'}, limit {args.max_growth:.0%})"
        )
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
