"""Decode speed of bundles run by onnxruntime-genai's own generator, interleaved, as ratios to the first.

Any folder with a genai_config.json runs: edgekit bundles and onnxruntime-genai model-builder outputs
alike, so the comparison has one runtime and one protocol (bench/peers_child.py: the same token ids, a
fresh sequence per prompt length, the median of `--gen-len` greedy steps). Rounds interleave the bundles
(A B C, A B C, ...), one fresh process per bundle and round; each ratio is the median over rounds of
that round's time ÷ the first bundle's, with the min-max range.

    python bench/genai_race.py GENAI_INT4 EDGEKIT_INT4 [...] --rounds 9 --threads 2
    python bench/genai_race.py --genai-int4 smollm2 EDGEKIT_INT4   # builds genai's int4 SmolLM2 first
    python bench/genai_race.py --genai-int4 smollm2 A B --ppl-only TEXT   # perplexity of each, one protocol

`--genai-int4 smollm2` writes the fetched GGUF dequantized as a Hugging Face fp32 folder and runs
onnxruntime-genai's model builder on it (`-p int4 -e cpu`), cached under bench/work/genai_race/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_child

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "genai_race"
CHILD = ROOT / "bench" / "peers_child.py"
PROMPT_TEXT = ROOT / "edgekit" / "data" / "calib-wikitext2.txt"


def genai_int4_smollm2() -> Path:
    """onnxruntime-genai's builder on SmolLM2 (its GGUF dequantized to an fp32 Hugging Face folder)."""
    out = WORK / "genai-int4-smollm2"
    if (out / "genai_config.json").is_file():
        return out
    from smollm2 import hf_folder

    hf = hf_folder(WORK / "smollm2-hf-fp32")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-i", str(hf)]
    subprocess.run([*cmd, "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(WORK / "cache")], check=True)
    return out


def _with_threads(bundle: Path, threads: int) -> Path:
    """A copy of the bundle's genai_config.json with the thread count (the model files are linked)."""
    target = WORK / "runs" / f"{bundle.name}-{hashlib.sha256(str(bundle.resolve()).encode()).hexdigest()[:8]}"
    target.mkdir(parents=True, exist_ok=True)
    for f in bundle.iterdir():
        link = target / f.name
        if f.name != "genai_config.json" and not link.exists():
            link.symlink_to(f.resolve())
    config = json.loads((bundle / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    (target / "genai_config.json").write_text(json.dumps(config, indent=2))
    return target


def _prompt_ids(bundle: Path, n: int) -> list[int]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(PROMPT_TEXT.read_text()).ids
    return (ids * (n // max(len(ids), 1) + 1))[:n]


def perplexity(bundle: Path, ids: list[int], chunk: int = 1024) -> float:
    """Perplexity of `ids` in chunks of `chunk`, one prefill each, no BOS, from the bundle's model.onnx by
    onnxruntime directly: the same protocol for an edgekit bundle and a genai builder output (both have
    input_ids, attention_mask and past_key_values.N inputs and a logits output); bench/peers.py's too."""
    logits = peers_child.LOGITS["genai"]({"path": str(bundle), "threads": 2})
    return peers_child.perplexity(logits, ids, chunk)["perplexity"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="*", type=Path)
    ap.add_argument("--genai-int4", choices=["smollm2"], help="build onnxruntime-genai's int4 model first (first)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", default="128,1024")
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--json", type=Path, default=WORK / "results.json")
    ap.add_argument("--ppl-only", type=Path, metavar="TEXT", help="no timing: perplexity of each bundle on TEXT")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    args = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    bundles = ([genai_int4_smollm2()] if args.genai_int4 else []) + args.bundles
    if len(bundles) < 2:
        ap.error("give at least two bundles (or --genai-int4 and one)")
    if args.ppl_only:
        from tokenizers import Tokenizer

        text = args.ppl_only.read_text(encoding="utf-8")
        ids = Tokenizer.from_file(str(bundles[0] / "tokenizer.json")).encode(text).ids[: args.ppl_tokens]
        for b in bundles:
            print(f"{b.name:32} perplexity {perplexity(b, ids):.3f} over {len(ids)} tokens (chunks of 1024)")
        return 0
    lens = [int(n) for n in args.prompt_len.split(",")]
    ids = _prompt_ids(bundles[0], max(lens))
    runs = [_with_threads(b, args.threads) for b in bundles]
    times: dict[int, list[list[float]]] = {n: [[] for _ in bundles] for n in lens}
    for r in range(args.rounds):
        for j, run in enumerate(runs):
            spec = {"kind": "genai", "path": str(run), "prompt_ids": ids, "prompt_lens": lens, "warmup": 4}
            spec["gen_len"] = args.gen_len
            out = subprocess.run(
                [sys.executable, str(CHILD)], input=json.dumps(spec), capture_output=True, text=True, check=True
            )
            for s in json.loads(out.stdout.splitlines()[-1])["settings"]:
                times[s["prompt_len"]][j].append(s["decode_ms_median"])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    rows = []
    for n in lens:
        base = np.asarray(times[n][0])
        for j, b in enumerate(bundles):
            t = np.asarray(times[n][j])
            ratio = t / base
            rows.append(
                {
                    "bundle": str(b),
                    "prompt_len": n,
                    "decode_ms": float(np.median(t)),
                    "ratio": float(np.median(ratio)),
                    "ratio_min": float(ratio.min()),
                    "ratio_max": float(ratio.max()),
                    "mb": round(sum(f.stat().st_size for f in b.glob("*.onnx*")) / 1e6, 1),
                }
            )
            x = rows[-1]
            print(
                f"{n:5} tokens  {b.name:32} {x['mb']:7.1f} MB  decode {x['decode_ms']:6.2f} ms/token  "
                f"ratio {x['ratio']:.2f} [{x['ratio_min']:.2f}-{x['ratio_max']:.2f}]"
            )
    args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
