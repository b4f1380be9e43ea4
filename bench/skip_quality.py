"""The skip quality table: N removed attention sublayers × rule (last-N, auto:N) × fill (zero, mean), fp32 and
int4, perplexity on held-out WikiText-2 and TinyStories and accuracy on a cloze task built from held-out
WikiText-2, all in one run.

    python bench/skip_quality.py                                # SmolLM2-135M, N = 0,2,...,10, fp32 and int4
    python bench/skip_quality.py --model stories260k --ns 0,1,2,3,4 --formats fp32
    python bench/skip_quality.py --report                       # markdown table + plot from what was measured

fp32 rows are PyTorch on the checkpoint (`edgekit eval MODEL --skip ...`, the export's reference); int4 rows are
exported bundles (`--quant int4 --int4-algo q4_1`, the best int4 on this GGUF source, see issue 20 in
BENCHMARKS.md), scored by onnxruntime. Calibration (ranking, fill) is the model's default text: for SmolLM2
the shipped WikiText-2 excerpt from the second half of the split; every held-out text here comes from the
first half or from TinyStories' validation split. One JSON line per configuration is appended to
bench/work/skip_quality.jsonl; configurations already there are not measured again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

from edgekit.checkpoint.fetch import SMOLLM2, fetch
from edgekit.export.pipeline import ExportRequest, export
from edgekit.export.quantize import QuantConfig
from edgekit.quality.evaluate import EvalRequest, evaluate

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work"
SHARED = Path(os.environ.get("EDGEKIT_SHARED", ROOT.parent / "shared")) / "corpora"
WIKI = SHARED / "wikitext-2-valid.txt"
STORIES = SHARED / "tinystories-valid-subset.txt"
ROWS = WORK / "skip_quality.jsonl"


def build_cloze(path: Path, items: int = 200, seed: int = 0) -> Path:
    """A 4-way sentence-completion task from the first half of WikiText-2 valid (held out from calibration).

    Context: a sentence's first 60 % of words; choices: its true ending and the endings of three other
    sentences of similar length. Scored like HellaSwag (edgekit.quality.tasks, acc_norm per byte).
    """
    text = WIKI.read_text(encoding="utf-8")
    first_half = text[: len(text) // 2]
    sentences = []
    for line in first_half.splitlines():
        if line.strip().startswith("="):
            continue
        for s in re.split(r"(?<= \.) ", line.strip()):
            words = s.split()
            if 14 <= len(words) <= 40 and "<unk>" not in s:
                sentences.append(words)
    rng = random.Random(seed)
    rng.shuffle(sentences)
    rows = []
    for words in sentences[:items]:
        cut = int(len(words) * 0.6)
        others = rng.sample(sentences[items:], 3)
        endings = [" ".join(words[cut:])] + [" ".join(o[int(len(o) * 0.6) :]) for o in others]
        order = list(range(4))
        rng.shuffle(order)
        rows.append({"context": " ".join(words[:cut]), "choices": [endings[i] for i in order], "label": order.index(0)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _scores(target: str, tokens: int, cloze: Path, **skip: object) -> dict:
    wiki = evaluate(EvalRequest(target=target, text=WIKI, separator=None, max_tokens=tokens, tasks=[cloze], **skip))
    stories = evaluate(EvalRequest(target=target, text=STORIES, max_tokens=tokens, **skip))
    return {
        "wikitext": round(wiki.perplexity.perplexity, 3),
        "wikitext_ci95": [round(x, 3) for x in wiki.perplexity.ci95],
        "tinystories": round(stories.perplexity.perplexity, 3),
        "tinystories_ci95": [round(x, 3) for x in stories.perplexity.ci95],
        "cloze_acc_norm": round(wiki.tasks[0].acc_norm, 4),
        "cloze_stderr": round(wiki.tasks[0].acc_norm_stderr, 4),
        "model": wiki.model,
    }


# "int4": llama.cpp's Q4_1 rounding, 4-bit lm_head (the first table); "int4-default": what `edgekit export
# --quant int4` writes (GPTQ, 8-bit lm_head, one table for SmolLM2's tied embedding and lm_head)
INT4_FORMATS = {
    "int4": QuantConfig(mode="int4", int4_algo="q4_1"),
    "int4-default": QuantConfig(mode="int4", lm_head_bits=8),
}


def measure(
    model: str, ns: list[int], formats: list[str], tokens: int, int4_ns: list[int], int4_fills: list[str]
) -> None:
    done = {(r["model_arg"], r["format"], r["rule"], r["n"], r["fill"]) for r in _rows()}
    cloze = build_cloze(WORK / "skip_quality" / "cloze-wikitext2.jsonl")
    target = str(fetch(SMOLLM2)) if model == "smollm2" else model
    for fmt in formats:
        for n in ns if fmt == "fp32" else [n for n in ns if n in int4_ns]:
            for rule in ("last", "auto") if n else ("none",):
                fills = ("zero", "mean") if fmt == "fp32" else int4_fills
                for fill in fills if n else ("zero",):
                    key = (model, fmt, rule, n, fill)
                    if key in done:
                        continue
                    skip = f"auto:{n}" if rule == "auto" else n
                    t = time.perf_counter()
                    if fmt == "fp32":
                        row = _scores(target, tokens, cloze, skip=skip, fill=fill, threads=2)
                    else:
                        out = WORK / "skip_quality" / f"{Path(target).stem}-{fmt}-{rule}{n}-{fill}"
                        quant = INT4_FORMATS[fmt]
                        r = export(
                            ExportRequest(model=target, skip=skip, fill=fill, quant=quant, output=out, force=True)
                        )
                        row = _scores(str(out), tokens, cloze, threads=2)
                        row["bundle_mb"] = round(sum(f["bytes"] for f in r.manifest["files"].values()) / 2**20, 1)
                    row["skipped"] = row["model"].get("skipped", [])
                    row |= {"model_arg": model, "format": fmt, "rule": rule, "n": n, "fill": fill}
                    row["seconds"] = round(time.perf_counter() - t, 1)
                    print(json.dumps(row), flush=True)
                    with ROWS.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")


def _rows() -> list[dict]:
    return [json.loads(line) for line in ROWS.read_text().splitlines()] if ROWS.exists() else []


def _vs(row: dict, base: dict | None, key: str) -> str:
    return f"{row[key] / base[key] - 1:+.1%}" if base else "–"


def report(model: str, plot: Path) -> None:
    rows = [r for r in _rows() if r["model_arg"] == model]
    base = {r["format"]: r for r in rows if r["n"] == 0}
    print(
        "| format | N | rule | fill | removed | WikiText-2 ppl | vs intact | TinyStories ppl | vs intact | cloze acc |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["format"] != "fp32", r["n"], r["rule"], r["fill"])):
        b = base.get(r["format"])
        print(
            f"| {r['format']} | {r['n']} | {r['rule']} | {r['fill']} | {','.join(map(str, r['skipped'])) or '–'} | "
            f"{r['wikitext']:.2f} | {_vs(r, b, 'wikitext')} | {r['tinystories']:.2f} | {_vs(r, b, 'tinystories')} | "
            f"{r['cloze_acc_norm']:.3f} ± {r['cloze_stderr']:.3f} |"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = sorted({r["format"] for r in rows}, key=lambda f: f != "fp32")
    fig, axes = plt.subplots(len(formats), 2, figsize=(10, 3.6 * len(formats)), squeeze=False)
    for row_axes, fmt in zip(axes, formats, strict=True):
        for ax, text in zip(row_axes, ("wikitext", "tinystories"), strict=True):
            for rule, fill, style in (
                ("last", "zero", "r--"),
                ("last", "mean", "r-"),
                ("auto", "zero", "b--"),
                ("auto", "mean", "b-"),
            ):
                pts = sorted(
                    (r["n"], r[text])
                    for r in rows
                    if r["format"] == fmt and ((r["rule"] == rule and r["fill"] == fill) or r["n"] == 0)
                )
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"{rule}-N, fill {fill}")
            ax.set_yscale("log")
            ax.set_xlabel("attention sublayers removed (N)")
            ax.set_ylabel(f"{text} perplexity")
            ax.set_title(f"{model} {fmt}: {text} (held out)")
            ax.legend(fontsize=8)
    fig.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=110)
    print(f"\nplot: {plot}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (the fetched GGUF) or any MODEL")
    ap.add_argument("--ns", default="0,2,4,6,8,10")
    ap.add_argument("--formats", default="fp32,int4", help="fp32 and/or int4, int4-default (INT4_FORMATS)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of each held-out text")
    ap.add_argument("--int4-ns", default="0,4,8", help="the N exported to int4 (each is an export + eval)")
    ap.add_argument("--int4-fills", default="mean")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "skip-quality.png")
    args = ap.parse_args()
    if args.report:
        report(args.model, args.plot)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    ns, int4_ns = ([int(n) for n in a.split(",")] for a in (args.ns, args.int4_ns))
    measure(args.model, ns, args.formats.split(","), args.tokens, int4_ns, args.int4_fills.split(","))


if __name__ == "__main__":
    sys.exit(main())
