"""The int4 table: each --int4-algo × block size × lm_head bits, on a real model, in one resumable run.

    python bench/int4_table.py --model stories260k                        # the full grid (minutes)
    python bench/int4_table.py --model smollm2 --algos rtn,hqq,gptq,q4_1 --blocks 32 --lm-bits 8
    python bench/int4_table.py --model smollm2 --report                   # markdown from what was measured

Per configuration: the export's wall time and peak RSS (process tree, bench/peak_rss.py), bundle size,
perplexity on held-out WikiText-2 (first half of valid; calibration is the shipped excerpt from the
second half) and TinyStories valid (calibration: the train split), and mean KL / top-1 agreement against
the fp32 bundle on WikiText-2. Decode ms/token comes from one interleaved `edgekit profile` over every
bundle of the model at the end (--profile). Rows are appended to bench/work/int4_table.jsonl; what is
there is not measured again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import run

from edgekit.checkpoint.fetch import SMOLLM2, fetch
from edgekit.quality.evaluate import EvalRequest, evaluate

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work"
ROWS = WORK / "int4_table.jsonl"
SHARED = Path(os.environ.get("EDGEKIT_SHARED", ROOT.parent / "shared")) / "corpora"
WIKI_HELD_OUT = WORK / "wikitext-2-valid-first-half.txt"
STORIES = SHARED / "tinystories-valid-subset.txt"


def _held_out_wiki() -> Path:
    if not WIKI_HELD_OUT.is_file():
        text = (SHARED / "wikitext-2-valid.txt").read_text(encoding="utf-8")
        WIKI_HELD_OUT.write_text(text[: len(text) // 2], encoding="utf-8")
    return WIKI_HELD_OUT


def _model_path(model: str) -> str:
    return str(fetch(SMOLLM2)) if model == "smollm2" else model


def _done() -> set[tuple]:
    if not ROWS.is_file():
        return set()
    return {tuple(r["key"]) for r in map(json.loads, ROWS.read_text().splitlines())}


def _export(model: str, out: Path, args: list[str]) -> dict:
    edgekit = str(Path(sys.executable).with_name("edgekit"))
    res = run([edgekit, "export", _model_path(model), *args, "-o", str(out), "--force"])
    if res["returncode"] != 0:
        raise SystemExit(f"export {out.name} failed")
    return res


def _scores(bundle: Path, reference: Path | None, tokens: int) -> dict:
    wiki = evaluate(
        EvalRequest(
            target=str(bundle),
            text=_held_out_wiki(),
            separator=None,
            max_tokens=tokens,
            threads=2,
            reference=str(reference) if reference else None,
        )
    )
    stories = evaluate(EvalRequest(target=str(bundle), text=STORIES, max_tokens=tokens, threads=2))
    row = {"wikitext": round(wiki.perplexity.perplexity, 3), "tinystories": round(stories.perplexity.perplexity, 3)}
    if wiki.agreement:
        row |= {"kl": round(wiki.agreement.mean_kl, 4), "top1": round(wiki.agreement.top1_agreement, 4)}
    return row


def measure(model: str, algos: list[str], blocks: list[int], lm_bits: list[int], tokens: int) -> None:
    folder = WORK / "int4_table" / Path(model).name
    fp32 = folder / "fp32"
    done = _done()
    if (model, "fp32", 0, 0) not in done:
        res = _export(model, fp32, ["--quant", "fp32", "--no-verify"])
        _append((model, "fp32", 0, 0), fp32, res, _scores(fp32, None, tokens))
    for algo in algos:
        for block in blocks:
            for lm in lm_bits:
                key = (model, algo, block, lm)
                if key in done or (algo == "q4_1" and block != 32):  # Q4_1 blocks are 32 wide
                    continue
                out = folder / f"{algo}-b{block}-lm{lm}"
                args = ["--quant", "int4", "--int4-algo", algo, "--block-size", str(block), "--lm-head-bits", str(lm)]
                res = _export(model, out, args)
                _append(key, out, res, _scores(out, fp32, tokens))


def _append(key: tuple, bundle: Path, res: dict, scores: dict) -> None:
    m = json.loads((bundle / "edgekit.json").read_text())
    row = {
        "key": list(key),
        "bundle": str(bundle),
        "export_s": round(res["wall_s"], 1),
        "export_peak_rss_mb": round(res["peak_rss_bytes"] / 2**20),
        "bundle_mb": round(sum(f["bytes"] for f in m["files"].values()) / 2**20, 2),
        "loadavg": os.getloadavg(),
    } | scores
    print(json.dumps(row), flush=True)
    with ROWS.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def profile(model: str) -> None:
    rows = [r for r in map(json.loads, ROWS.read_text().splitlines()) if r["key"][0] == model]
    edgekit = str(Path(sys.executable).with_name("edgekit"))
    cmd = [edgekit, "profile", *[r["bundle"] for r in rows], "--prompt-len", "128", "--gen-len", "32"]
    cmd += ["--runs", "3", "--threads", "2", "--json", "--compare"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    decode = {b["label"]: b["settings"][0]["decode_ms_median"]["median"] for b in json.loads(out)["bundles"]}
    with ROWS.open("a") as fh:
        fh.write(json.dumps({"key": [model, "profile"], "decode_ms": decode, "loadavg": os.getloadavg()}) + "\n")
    print(json.dumps(decode, indent=1))


def report(model: str) -> None:
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()]
    decode: dict[str, float] = {}
    for r in rows:
        if r["key"] == [model, "profile"]:
            decode = r["decode_ms"]
    rows = [r for r in rows if r["key"][0] == model and len(r["key"]) == 4]
    base = next(r for r in rows if r["key"][1] == "fp32")
    head = ["int4-algo", "block", "lm_head", "WikiText-2 ppl", "TinyStories ppl", "KL", "top-1", "bundle MB"]
    print("| " + " | ".join([*head, "export s", "peak RSS MB", "decode ms/token"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["key"][1] != "fp32", r["key"][1], r["key"][2], r["key"][3])):
        _, algo, block, lm = r["key"]
        w, s = r["wikitext"], r["tinystories"]
        cells = [algo, block or "–", lm or "–"]
        cells += [f"{w:.2f} ({w / base['wikitext'] - 1:+.1%})", f"{s:.2f} ({s / base['tinystories'] - 1:+.1%})"]
        cells += [r.get("kl", "–"), r.get("top1", "–"), r["bundle_mb"], r["export_s"], r["export_peak_rss_mb"]]
        ms = decode.get(Path(r["bundle"]).name)
        cells.append(f"{ms:.2f}" if ms else "–")
        print("| " + " | ".join(map(str, cells)) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="stories260k", help="smollm2 (the fetched GGUF) or any MODEL")
    ap.add_argument("--algos", default="rtn,kquant,hqq,gptq,q4_1")
    ap.add_argument("--blocks", default="32,128")
    ap.add_argument("--lm-bits", default="8,4")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of each held-out text")
    ap.add_argument("--profile", action="store_true", help="decode speed of every bundle of the model, interleaved")
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    if a.report:
        return report(a.model)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    measure(a.model, a.algos.split(","), ints(a.blocks), ints(a.lm_bits), a.tokens)
    if a.profile:
        profile(a.model)


if __name__ == "__main__":
    main()
