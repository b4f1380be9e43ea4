"""SmolLM2-135M-Instruct from its Q4_1 GGUF: export time, peak RSS and size per weight format, fp32
parity, perplexity on held-out text next to the GGUF's own weights (dequantized, in PyTorch), and decode
speed, all in one run.

    python bench/smollm2.py                       # fp32, int8, int4, int4-q4_1, keep; 4,096 tokens per text
    python bench/smollm2.py --formats int4,keep --tokens 2048   # FORMAT: --quant value, or int4-ALGO

Bundles go to bench/work/smollm2/; one JSON line per run is appended to bench/work/smollm2.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import run

from edgekit.checkpoint.fetch import SMOLLM2, fetch
from edgekit.quality.evaluate import EvalRequest, evaluate

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work"
SHARED = Path(os.environ.get("EDGEKIT_SHARED", ROOT.parent / "shared")) / "corpora"
TEXTS = {  # held-out text, and the separator its documents are split on (None: one running text)
    "wikitext-2-valid": (SHARED / "wikitext-2-valid.txt", None),
    "tinystories-valid": (SHARED / "tinystories-valid-subset.txt", "<|endoftext|>"),
}


def hf_folder(out: Path) -> Path:
    """The GGUF dequantized into a Hugging Face fp32 folder (weights, config, the converted tokenizer and
    chat template): what the peers' toolchains (genai's builder, optimum, transformers) read. Cached."""
    if (out / "config.json").is_file():
        return out
    import shutil

    from edgekit.checkpoint.load import load_torch_model, open_checkpoint

    ckpt = open_checkpoint(fetch(SMOLLM2), "smollm2-135m-instruct")
    stage = out.with_name(out.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    load_torch_model(ckpt).save_pretrained(stage)
    for f in ckpt.path.iterdir():  # the converted tokenizer and chat template beside config.json
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copyfile(f, stage / f.name)
    # transformers 5 writes rope_parameters only; the 4.x that optimum-onnx pins reads rope_theta and would
    # silently fall back to 10,000 (SmolLM2's is 100,000)
    config = json.loads((stage / "config.json").read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    (stage / "config.json").write_text(json.dumps(config, indent=2))
    stage.rename(out)
    return out


def _ppl(target: str, text: Path, separator: str | None, tokens: int) -> float:
    r = evaluate(EvalRequest(target=target, text=text, separator=separator, max_tokens=tokens, threads=2))
    return round(r.perplexity.perplexity, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="fp32,int8,int4,int4-q4_1,keep")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of each text scored")
    ap.add_argument("--runs", type=int, default=3, help="profile runs per bundle")
    args = ap.parse_args()
    gguf = fetch(SMOLLM2)
    edgekit = str(Path(sys.executable).with_name("edgekit"))
    rows: dict[str, dict] = {"gguf (PyTorch, dequantized)": {}}
    for name, (text, sep) in TEXTS.items():
        rows["gguf (PyTorch, dequantized)"][name] = _ppl(str(gguf), text, sep, args.tokens)
    bundles = []
    for fmt in args.formats.split(","):
        out = WORK / "smollm2" / f"smollm2-{fmt}"
        quant, _, algo = fmt.partition("-")
        extra = ["--int4-algo", algo] if algo else []
        res = run([edgekit, "export", str(gguf), "--quant", quant, *extra, "-o", str(out), "--force"])
        if res["returncode"] != 0:
            raise SystemExit(f"export {fmt} failed")
        m = json.loads((out / "edgekit.json").read_text())
        v = m["verification"]
        row = {
            "export_s": round(res["wall_s"], 1),
            "export_peak_rss_mb": round(res["peak_rss_bytes"] / 2**20),
            "bundle_mb": round(sum(f["bytes"] for f in m["files"].values()) / 2**20, 1),
            "max_abs_logit_diff": v["max_abs_logit_diff"],
            "top1": v["top1_agreement"],
        }
        for name, (text, sep) in TEXTS.items():
            row[name] = _ppl(str(out), text, sep, args.tokens)
        rows[fmt] = row
        bundles.append(str(out))
    prof = WORK / "smollm2" / "profile.json"
    cmd = [edgekit, "profile", *bundles, "--prompt-len", "128", "--gen-len", "32", "--runs", str(args.runs)]
    cmd += ["--threads", "2", "--json"] + (["--compare"] if len(bundles) > 1 else [])
    with prof.open("w") as fh:
        import subprocess

        subprocess.run(cmd, stdout=fh, check=True)
    for b in json.loads(prof.read_text())["bundles"]:
        s = b["settings"][0]
        fmt = Path(b["label"]).name.removeprefix("smollm2-")
        rows[fmt] |= {
            "first_token_ms": round(s["ttft_ms"]["median"], 1),
            "decode_ms_per_token": round(s["decode_ms_median"]["median"], 2),
        }
    print(f"{'':28}" + "".join(f"{k:>22}" for k in next(iter(rows.values())) if k), flush=True)
    for fmt, row in rows.items():
        print(f"{fmt:28}" + "".join(f"{row.get(k, '')!s:>22}" for k in rows[fmt]))
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg": os.getloadavg(), "rows": rows}
    print(json.dumps(record))
    with (WORK / "smollm2.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
