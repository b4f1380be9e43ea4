"""Does a weight format keep what the instruct model knows? 78 short factual questions, asked in chat.

    python bench/chat_facts.py                       # SmolLM2-135M-Instruct: fp32, int8, keep, int4 variants
    python bench/chat_facts.py --report              # the table from bench/work/chat_facts.jsonl

Held-out perplexity says how close a bundle's next-token distribution stays to fp32; it does not say
whether the chat answers survive (an int4 variant with lower perplexity drifted into French on chat
prompts, BENCHMARKS.md "Mixed precision"). bench/data/facts.jsonl holds 78 questions written for this
(33 capitals, 45 general facts and small sums), each with the answers that count and three wrong choices.
Per bundle, two scores:

- **chat**: the question as the one user turn of the model's own chat template, greedy, 32 new tokens;
  right when an accepted answer appears in the reply as a word (case-insensitive).
- **choice** (`edgekit eval --tasks bench/data/facts.jsonl`): lm-eval's log-likelihood multiple choice on
  "Question: ...\\nAnswer:", the four choices scored (acc).

Bundles are exported once into bench/work/chat_facts/ from the GGUF (its own Q4_1 blocks for `keep`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import run

from edgekit.checkpoint.fetch import SMOLLM2, fetch
from edgekit.quality.evaluate import EvalRequest, evaluate
from edgekit.runtime.generator import GenerationConfig, Generator
from edgekit.runtime.providers import RuntimeOptions

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work"
ROWS = WORK / "chat_facts.jsonl"
FACTS = ROOT / "bench" / "data" / "facts.jsonl"
VARIANTS = {  # name → edgekit export flags
    "fp32": ["--quant", "fp32"],
    "int8": ["--quant", "int8"],
    "keep (GGUF Q4_1)": ["--quant", "keep"],
    "int4 (default: gptq)": ["--quant", "int4"],
    "int4 --int4-mix q4_k_m": ["--quant", "int4", "--int4-mix", "q4_k_m"],
    "int4 --int4-algo hqq": ["--quant", "int4", "--int4-algo", "hqq"],
    "int4 --int4-algo rtn": ["--quant", "int4", "--int4-algo", "rtn"],
}
NEW_TOKENS = 32


def _bundle(name: str) -> Path:
    out = WORK / "chat_facts" / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not (out / "edgekit.json").is_file():
        edgekit = str(Path(sys.executable).with_name("edgekit"))
        res = run([edgekit, "export", str(fetch(SMOLLM2)), *VARIANTS[name], "-o", str(out), "--force"])
        if res["returncode"] != 0:
            raise SystemExit(f"export {name} failed")
    return out


def _right(reply: str, answers: list[str]) -> bool:
    return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", reply, re.IGNORECASE) for a in answers)


def _chat(bundle: Path, facts: list[dict]) -> list[dict]:
    gen = Generator(bundle, RuntimeOptions(threads=2))
    out = []
    for f in facts:
        reply = gen.chat([{"role": "user", "content": f["question"]}], GenerationConfig(max_new_tokens=NEW_TOKENS))
        out.append({"question": f["question"], "reply": reply.text, "right": _right(reply.text, f["answers"])})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    ap.add_argument("--bundle", action="append", default=[], metavar="NAME=PATH", help="also score this bundle")
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    if not a.report:
        facts = [json.loads(line) for line in FACTS.read_text().splitlines() if line.strip()]
        given = dict(b.split("=", 1) for b in a.bundle)
        for name in [*(a.variants.split(",") if a.variants else []), *given]:
            bundle = Path(given[name]) if name in given else _bundle(name)
            t = time.perf_counter()
            answers = _chat(bundle, facts)
            task = evaluate(EvalRequest(target=str(bundle), tasks=[FACTS], threads=2)).tasks[0]
            row = {"variant": name, "chat": answers, "choice_acc": task.acc, "seconds": time.perf_counter() - t}
            with ROWS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(name, sum(x["right"] for x in answers), "/", len(answers), f"choice {task.acc:.3f}", flush=True)
    report()


def report() -> None:
    rows = {}
    for line in ROWS.read_text().splitlines() if ROWS.is_file() else []:
        r = json.loads(line)
        rows[r["variant"]] = r  # the latest run of each
    if "fp32" not in rows:
        print("nothing measured yet (fp32 first)")
        return
    base = {x["question"]: x["right"] for x in rows["fp32"]["chat"]}
    n = len(base)
    print("| bundle | chat: right of 78 | lost vs fp32 | gained vs fp32 | choice acc (4-way) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        right = {x["question"]: x["right"] for x in r["chat"]}
        lost = sum(base[q] and not right[q] for q in base)
        gained = sum(right[q] and not base[q] for q in base)
        cells = [name, f"{sum(right.values())} ({sum(right.values()) / n:.0%})", str(lost), str(gained)]
        print("| " + " | ".join([*cells, f"{r['choice_acc']:.3f}"]) + " |")


if __name__ == "__main__":
    main()
