"""Quality table for BENCHMARKS.md: stories260K, skip 0-3 × fp32/int8/int4 → perplexity in and out of domain.

Runs the real CLI (the commands it prints are the ones that made the numbers) and prints a Markdown table.

    python bench/quality_table.py [--out out/quality] [--skips 0,1,2,3] [--quants fp32,int8,int4]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPORA = ROOT.parent / "shared" / "corpora"
TEXTS = {
    # one story per line: each story is its own document
    "TinyStories valid subset": [str(CORPORA / "tinystories-valid-subset.txt"), "--separator", r"\n"],
    # out of domain: WikiText-2 validation, one paragraph per line, first 40 lines that have text
    "WikiText-2 valid (40 paragraphs)": [str(CORPORA / "wikitext-2-valid.txt"), "--separator", r"\n", "--limit", "40"],
}

# One thread: the 260K model's matrices are too small to share, and the shared 2-core machine is busy.
THREADS = ["--threads", "1"]


def edgekit(*args: str) -> str:
    cmd = ["edgekit", *args]
    print("$", " ".join(shlex.quote(a) for a in cmd), file=sys.stderr, flush=True)
    r = subprocess.run([sys.executable, "-m", "edgekit", *args], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"failed: {r.stderr.strip()}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/quality")
    ap.add_argument("--skips", default="0,1,2,3")
    ap.add_argument("--quants", default="fp32,int8,int4")
    a = ap.parse_args()
    rows = []
    for skip in a.skips.split(","):
        ckpt = {}
        for name, (text, *opts) in TEXTS.items():
            out = json.loads(edgekit("eval", "stories260k", "--skip", skip, "--text", text, *opts, *THREADS, "--json"))
            ckpt[name] = out["perplexity"]
        rows.append((skip, "PyTorch fp32 (no export)", ckpt))
        for quant in a.quants.split(","):
            bundle = f"{a.out}/stories260k-skip{skip}-{quant}"
            edgekit("export", "stories260k", "--skip", skip, "--quant", quant, "-o", bundle, "--force", "--no-verify")
            cells = {}
            for name, (text, *opts) in TEXTS.items():
                cells[name] = json.loads(edgekit("eval", bundle, "--text", text, *opts, *THREADS, "--json"))[
                    "perplexity"
                ]
            rows.append((skip, quant, cells))
    names = list(TEXTS)
    print("| skip | weights | " + " | ".join(f"ppl {n} [95% CI]" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for skip, quant, cells in rows:
        fmt = [f"{c['perplexity']:.3f} [{c['ci95'][0]:.2f}-{c['ci95'][1]:.2f}]" for c in (cells[n] for n in names)]
        print(f"| {skip} | {quant} | " + " | ".join(fmt) + " |")
    first = rows[0][2]
    print("\ntokens scored: " + ", ".join(f"{n}: {first[n]['tokens']} in {first[n]['documents']} docs" for n in names))


if __name__ == "__main__":
    main()
