"""The KV cache table: --kv-cache fp32 vs int8 vs int4, bytes, decode speed at long contexts, perplexity.

    python bench/kv_cache.py --model smollm2                 # real SmolLM2-135M, int4 weights (default algo)
    python bench/kv_cache.py --model llama2-7b --kv auto,int8 --contexts 1024,4064 --rounds 2  # 7B, skip 8
    python bench/kv_cache.py --model llama2-7b --kv auto@0,auto@8,int8@0,int8@8 --contexts 128,1024,4064
    python bench/kv_cache.py --model smollm2 --report        # markdown from bench/work/kv_cache.jsonl
    python bench/kv_cache.py --model gemma3-270m --kv auto,auto+window,int8+window --contexts 1024,4096

Per cache type, one bundle (same weights, same skip set; only --kv-cache differs), exported once into
bench/work/kv_cache/. Then, with 2 threads and the rounds interleaved over the bundles, edgekit's runtime
(KVEngine: the IO-bound shared buffer) decodes 16 tokens after a cache holding N positions, N in --contexts.
SmolLM2's cache is filled by a real prefill of WikiText-2 text (its time is the prefill rate); the 7B
shape's would take minutes per prefill on 2 cores, so its engine is set to N positions of a zero-filled
cache: decode reads the same bytes whatever they hold, so the speed is the same (values don't matter for
speed; quality is measured on SmolLM2). The same for Gemma 3 270M's shape (random weights at its real
config, 262k vocabulary; no Gemma checkpoint is reachable here): a `+window` variant adds --kv-window, its
15 local layers' cache then holds their 512-token window (plus one chunk) and the rest is never read.
Quality: perplexity on held-out WikiText-2 (first half of valid;
the scales are calibrated on the shipped excerpt of the second half) and mean KL against the float cache.

A variant `KV@S` exports with `--skip S` instead of the model's default, so skip and cache compare in one
run. Each decode row also carries the bytes a step reads (every weight but the gathered embedding rows,
bench/decode_7b.py, + the KV cache at that context): the speed-up they predict sits beside the measured one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_7b import weight_bytes
from int4_table import _held_out_wiki
from peak_rss import run

from edgekit.checkpoint.fetch import SMOLLM2, fetch
from edgekit.quality.evaluate import EvalRequest, evaluate
from edgekit.runtime.kv_engine import KVEngine
from edgekit.runtime.providers import RuntimeOptions, create_session

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work"
ROWS = WORK / "kv_cache.jsonl"
GGUF_7B = WORK / "gguf-llama2-7b-q4_0.gguf"  # bench/gguf_7b.py --no-export writes it
MODELS = {
    # int4 weights as each model exports by default; the 7B shape with rtn and no verification (random
    # weights: only speed is measured there, and hqq's rounding would add ~25 minutes per export)
    "smollm2": ["--quant", "int4"],
    "llama2-7b": ["--quant", "int4", "--int4-algo", "rtn", "--no-verify", "--max-memory", "8GB"],
    "gemma3-270m": ["--quant", "int4", "--int4-algo", "rtn", "--no-verify"],
}
DEFAULT_SKIP = {"llama2-7b": "8"}  # the paper's setting for the 7B shape; the others skip nothing
GEMMA3_270M = WORK / "ckpt-gemma3-270m"
DECODE_STEPS = 16


def _source(model: str) -> str:
    if model == "smollm2":
        return str(fetch(SMOLLM2))
    if model == "gemma3-270m":
        return str(_gemma3_270m())
    if not GGUF_7B.is_file():
        raise SystemExit(f"{GGUF_7B} is missing: run `python bench/gguf_7b.py --no-export` first")
    return str(GGUF_7B)


def _gemma3_270m() -> Path:
    """google/gemma-3-270m's config (18 layers, 5 local : 1 global, window 512), random weights, bf16."""
    if (GEMMA3_270M / "config.json").is_file():
        return GEMMA3_270M
    import torch
    from make_checkpoint import TOKENIZER_FILES, TOKENIZER_SRC
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3, max_position_embeddings=32768,
        rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(GEMMA3_270M)
    for name in TOKENIZER_FILES:  # stories260K's: its 512 ids fit; the text is noise on random weights anyway
        shutil.copyfile(TOKENIZER_SRC / name, GEMMA3_270M / name)
    return GEMMA3_270M


def _bundle(model: str, variant: str) -> Path:
    """`variant`: a --kv-cache value, `+window` for --kv-window, `@S` for --skip S."""
    out = WORK / "kv_cache" / f"{model}-{variant.replace('@', '-skip')}"
    if (out / "edgekit.json").is_file():
        return out
    edgekit = str(Path(sys.executable).with_name("edgekit"))
    variant, _, skip = variant.partition("@")
    kv, _, window = variant.partition("+")
    flags = ["--kv-cache", kv, *(["--kv-window"] if window else [])]
    if skip or model in DEFAULT_SKIP:
        flags += ["--skip", skip or DEFAULT_SKIP[model]]
    res = run([edgekit, "export", _source(model), *MODELS[model], *flags, "-o", str(out), "--force"])
    if res["returncode"] != 0:
        raise SystemExit(f"export {out.name} failed")
    _append({"kind": "export", "model": model, "kv": variant, **{k: res[k] for k in ("wall_s", "peak_rss_bytes")}})
    return out


def _append(row: dict) -> None:
    with ROWS.open("a") as f:
        f.write(json.dumps(row | {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")


def _prompt_ids(bundle: Path, n: int) -> list[int]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(_held_out_wiki().read_text()).ids
    return ids[:n]


def _decode(bundle: Path, contexts: list[int], real_fill: bool) -> dict[int, dict]:
    limit = json.loads((bundle / "edgekit.json").read_text())["architecture"]["max_context"]
    if max(contexts) + DECODE_STEPS + 1 > limit:  # the rotary table ends at the model's context
        raise SystemExit(f"--contexts: at most {limit - DECODE_STEPS - 1} for {bundle.name}")
    session, _ = create_session(bundle / "model.onnx", RuntimeOptions(threads=2))
    engine = KVEngine(session, capacity=max(contexts) + DECODE_STEPS + 1)
    out = {}
    for n in contexts:
        engine.reset()
        prefill_s = None
        if real_fill:
            ids = _prompt_ids(bundle, n)
            t = time.perf_counter()
            logits = engine.forward(ids, all_logits=False)
            prefill_s = time.perf_counter() - t
            token = int(logits[-1].argmax())
        else:  # a zero-filled cache of n positions: the bytes decode reads, not their values, set its speed
            engine.forward([1])
            engine.length = n
            engine.window_length = min(n, engine.window)  # window-sized slots hold the last window
            token = 1
        steps = []
        for _ in range(DECODE_STEPS):
            t = time.perf_counter()
            token = int(engine.forward([token])[0].argmax())
            steps.append(time.perf_counter() - t)
        out[n] = {"decode_ms": 1000 * statistics.median(steps), "prefill_s": prefill_s}
    out_bytes = engine.kv_bytes
    del engine, session
    return out | {"kv_buffer_bytes": out_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    ap.add_argument("--kv", default="auto,int8,int4", help="--kv-cache values (auto: fp32)")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=4096, help="WikiText-2 tokens scored (SmolLM2)")
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    if a.report:
        report(a.model)
        return
    kvs, contexts = a.kv.split(","), [int(c) for c in a.contexts.split(",")]
    bundles = {kv: _bundle(a.model, kv) for kv in kvs}
    real = a.model == "smollm2"
    if real:
        reference = bundles[kvs[0]]
        for kv, b in bundles.items():
            r = evaluate(
                EvalRequest(
                    target=str(b),
                    text=_held_out_wiki(),
                    separator=None,
                    max_tokens=a.tokens,
                    threads=2,
                    reference=None if b == reference else str(reference),
                )
            )
            row = {"kind": "quality", "model": a.model, "kv": kv, "wikitext": round(r.perplexity.perplexity, 3)}
            if r.agreement:
                row |= {"kl": round(r.agreement.mean_kl, 4), "top1": round(r.agreement.top1_agreement, 4)}
            _append(row)
            print(row, flush=True)
    for rnd in range(a.rounds):
        for kv, b in bundles.items():
            res = _decode(b, contexts, real)
            per_token = json.loads((b / "edgekit.json").read_text())["graph"]["kv_bytes_per_token"]
            weights = weight_bytes(b / "model.onnx")["weights_read"]
            for n in contexts:
                row = {"kind": "decode", "model": a.model, "kv": kv, "round": rnd, "context": n, **res[n]}
                row |= {"bytes_read_per_step": weights + per_token * n}
                _append(row | {"kv_bytes_per_token": per_token, "kv_buffer_bytes": res["kv_buffer_bytes"]})
                print(row, flush=True)
    report(a.model)


def report(model: str) -> None:
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()] if ROWS.is_file() else []
    rows = [r for r in rows if r["model"] == model]
    quality = {r["kv"]: r for r in rows if r["kind"] == "quality"}
    decode: dict[tuple[str, int], list[float]] = {}
    prefill: dict[tuple[str, int], list[float]] = {}
    per_token: dict[str, int] = {}
    buffers: dict[str, int] = {}
    read: dict[tuple[str, int], int] = {}
    for r in rows:
        if r["kind"] == "decode":
            decode.setdefault((r["kv"], r["context"]), []).append(r["decode_ms"])
            if "bytes_read_per_step" in r:
                read[r["kv"], r["context"]] = r["bytes_read_per_step"]
            if r.get("prefill_s"):
                prefill.setdefault((r["kv"], r["context"]), []).append(r["context"] / r["prefill_s"])
            per_token[r["kv"]] = r["kv_bytes_per_token"]
            buffers[r["kv"]] = r["kv_buffer_bytes"]
    contexts = sorted({c for _, c in decode})
    kvs = list(dict.fromkeys(k for k, _ in decode))
    if not kvs:
        print("nothing measured yet")
        return
    base = kvs[0]
    head = ["KV cache", "bytes/token (growing slots)", f"KV buffers for {contexts[-1]} tokens"]
    head += [f"decode ms/token at {c} (vs {base})" for c in contexts]
    predicted = all((kv, c) in read for kv in kvs for c in contexts)
    head += [f"GB read/step at {c} (predicted vs {base})" for c in contexts if predicted]
    head += [f"prefill tok/s of {c}" for c in contexts if prefill]
    if quality:
        head += ["WikiText-2 ppl", "KL vs float cache"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for kv in kvs:
        cells = [
            kv if kv != "auto" else "fp32 (auto)",
            f"{per_token[kv]:,} ({per_token[base] / per_token[kv]:.1f}x less)",
            f"{buffers[kv] / 1e6:.1f} MB ({buffers[base] / buffers[kv]:.1f}x less)",
        ]
        for c in contexts:
            ms = statistics.median(decode[kv, c])
            cells.append(f"{ms:.2f} ({ms / statistics.median(decode[base, c]):.2f}x)")
        for c in contexts if predicted else []:
            cells.append(f"{read[kv, c] / 1e9:.2f} ({read[kv, c] / read[base, c]:.2f}x)")
        for c in contexts if prefill else []:
            cells.append(f"{statistics.median(prefill[kv, c]):.0f}")
        if quality:
            q = quality.get(kv, {})
            w, w0 = q.get("wikitext"), quality.get(base, {}).get("wikitext")
            cells += [f"{w:.2f} ({w / w0 - 1:+.1%})" if w and w0 else "–", f"{q['kl']:.4f}" if "kl" in q else "–"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
