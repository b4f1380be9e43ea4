"""edgekit against its peers and the hardware limit, side by side in one run.

For each model (stories260K, real; SmolLM2-135M-Instruct, real, from its Q4_1 GGUF; TinyLlama-1.1B-shaped
random weights, GQA 32/4, 22 layers) this builds
every contender — edgekit int8/int4 at skip 0 and with ~25% of attention sublayers removed (1 of 5,
6 of 22), optimum-onnx export + its quantizer, the onnxruntime-genai model builder int8/int4 (and int4
with the same layers skipped, through a patched builder), llama.cpp GGUF Q8_0/Q4_0 from the converter
the llama-cpp-python sdist ships (and Q4_0 with the same layers attention-free, as DeciLM) — each peer
in its own virtual environment under bench/work/peers/, then times them interleaved (round 1: A B C …,
round 2: A B C …), one fresh process per contender and round, all on the same threads, the same token
ids and the same protocol (bench/peers_child.py). It measures the machine's read bandwidth in the same
run and reports each decode as a fraction of its roofline (bytes read per token ÷ bandwidth).

SmolLM2 has its own line-up (`smollm2_contenders`): edgekit exports the GGUF itself, genai and optimum read
it dequantized to a Hugging Face folder, llama.cpp runs the GGUF as shipped (Q4_1) and its Q4_0/Q8_0
requantized by its own quantizer. Being real weights, every contender's perplexity is measured too, by one
protocol in its own runtime (peers_child.py, `"mode": "ppl"`): 4 × 1,024 tokens of held-out WikiText-2
(the first half of valid; the shipped calibration text is from the second half). Then speed sits next
to quality: the table's ppl column and the speed-vs-perplexity plot (bench/peers_pareto.py).

    python bench/peers.py                        # every model, 3 rounds, 2 threads (make bench-peers)
    python bench/peers.py --models tinyllama-1.1b --rounds 5
    python bench/peers.py --models smollm2-135m --rounds 5 --gen-len 64   # the real model, with perplexity
    python bench/peers.py --build-only           # venvs, llama.cpp wheel and every model file; no timing
    python bench/peers.py --report-only          # redo table and plot from bench/work/peers/results.json
    python bench/peers.py --only llama.cpp --merge   # time some contenders again, keep the others' numbers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_build as pb
import peers_pareto
import peers_report
from bandwidth import measure as measure_bandwidth

ROOT = pb.ROOT
WORK = pb.WORK
CHILD = ROOT / "bench" / "peers_child.py"
PROMPT_TEXT = ROOT / "edgekit" / "data" / "calib-tinystories.txt"  # what edgekit profile feeds too

STORIES_TOKENIZER = ROOT / "edgekit" / "data" / "stories260k" / "tokenizer.json"
MODELS = {
    # name: checkpoint, skipped layers (~25%: the last ones), prompt lengths: prefill, TTFT and decode are
    # measured after each (short and long context); optionally how the checkpoint is made (`prepare`), a
    # line-up of its own (`line_up`, else `contenders`), the prompt's tokenizer (else stories260K's: its ids
    # < 512 are valid for every model) and `quality`: real weights, so each contender's perplexity is measured
    "stories260k": {
        "ckpt": ROOT / "edgekit" / "data" / "stories260k",
        "skip": [4],
        "prompt_lens": [128, 384],  # its context is 512
    },
    "tinyllama-1.1b": {
        "ckpt": ROOT / "bench" / "work" / "ckpt-tinyllama-1.1b",
        "skip": list(range(16, 22)),
        "prompt_lens": [128, 1024],
        "prepare": lambda ckpt: __import__("make_checkpoint").make_checkpoint("tinyllama-1.1b", ckpt),
    },
    "smollm2-135m": {
        "ckpt": WORK / "models" / "smollm2-135m" / "hf-fp32",  # the GGUF dequantized (bench/smollm2.py)
        # auto:4 ranked on the shipped WikiText-2 calibration text (BENCHMARKS.md, "Removing attention
        # sublayers from SmolLM2"); fixed here so genai's patched builder removes the same four
        "skip": [6, 7, 25, 26],
        "prompt_lens": [128, 1024],
        "prepare": lambda ckpt: __import__("smollm2").hf_folder(ckpt),
        "line_up": lambda skip: smollm2_contenders(skip),
        "tokenizer": WORK / "models" / "smollm2-135m" / "hf-fp32" / "tokenizer.json",
        "quality": True,
    },
}
PPL_TOKENS, PPL_CHUNK = 4096, 1024


GENAI_LAYOUT = ["--symmetric", "--lm-head-bits", "4"]
# The layout lever bench/kernels.py found: blocks of 128 (zero points, 8-bit lm_head) run onnxruntime's
# int4 kernel 1.36x faster than blocks of 32 and read 17% fewer bytes. On stories260K its perplexity
# (5.97) sits between edgekit's block-32 default (5.90) and genai's layout (6.20); BENCHMARKS.md, "Peers".
BLOCK128 = ["--block-size", "128"]
# int8 on onnxruntime's QGEMM, as optimum's dynamic int8, which prefilled fastest of all in the first runs
DYNAMIC_INT8 = ["--int8-kernel", "dynamic"]


def contenders(model: str, skip: list[int]) -> list[pb.Contender]:
    d = WORK / "models" / model
    out = []
    for q in ("int8", "int4"):
        for s in ([], skip):
            name = f"edgekit {q} skip{len(s)}"
            out.append(pb.Contender(model, name, "edgekit", q, s, "edgekit", str(d / f"edgekit-{q}-skip{len(s)}")))
    # genai's int4 layout (symmetric blocks, lm_head at 4 bits too), and the faster block-128 layout
    for label, args in (("int4-sym", GENAI_LAYOUT), ("int4-b128", BLOCK128), ("int8-dyn", DYNAMIC_INT8)):
        for s in ([], skip):
            name, path = f"edgekit {label} skip{len(s)}", str(d / f"edgekit-{label.replace('-', '')}-skip{len(s)}")
            out.append(pb.Contender(model, name, "edgekit", label[:4], s, "edgekit", path, args=args))
    for q in ("int8", "int4"):
        out.append(pb.Contender(model, f"optimum {q}", "optimum", q, [], "optimum", str(d / f"optimum-{q}"),
                                file_name="model_quantized.onnx"))  # fmt: skip
    for q, s in (("int8", []), ("int4", []), ("int4", skip)):
        name = f"genai {q} skip{len(s)}"
        out.append(pb.Contender(model, name, "genai", q, s, "genai", str(d / f"genai-{q}-skip{len(s)}")))
    for q, s in (("Q8_0", []), ("Q4_0", []), ("Q4_0", skip)):
        name = f"llama.cpp {q} skip{len(s)}" + (" (DeciLM)" if s else "")
        out.append(pb.Contender(model, name, "llama.cpp", q, s, "llama", str(d / f"llama-{q}-skip{len(s)}.gguf")))
    return out


def smollm2_contenders(skip: list[int]) -> list[pb.Contender]:
    """The real model's line-up: each tool at its defaults and its speed options, at equal footing."""
    from edgekit.checkpoint.fetch import SMOLLM2, fetch

    d, gguf = WORK / "models" / "smollm2-135m", str(fetch(SMOLLM2))
    out = []
    # keep: the GGUF's own blocks, what `edgekit export FILE.gguf` does by default; fp32 anchors the ppl column
    for label, args, s in (("int4", [], []), ("int4", [], skip), ("int8", [], []), ("keep", [], []),
                           ("fp32", [], []), ("int4-sym", GENAI_LAYOUT, []), ("int4-b128", BLOCK128, [])):  # fmt: skip
        name, path = f"edgekit {label} skip{len(s)}", str(d / f"edgekit-{label.replace('-', '')}-skip{len(s)}")
        out.append(pb.Contender("smollm2-135m", name, "edgekit", label[:4], s, "edgekit", path, args=args, source=gguf))
    for q, s in (("int4", []), ("int4", skip), ("int8", [])):
        name = f"genai {q} skip{len(s)}"
        out.append(pb.Contender("smollm2-135m", name, "genai", q, s, "genai", str(d / f"genai-{q}-skip{len(s)}")))
    for q in ("int8", "int4"):
        out.append(pb.Contender("smollm2-135m", f"optimum {q}", "optimum", q, [], "optimum", str(d / f"optimum-{q}"),
                                file_name="model_quantized.onnx"))  # fmt: skip
    out.append(pb.Contender("smollm2-135m", "llama.cpp Q4_1 (the shipped GGUF)", "llama.cpp", "native", [], "llama",
                            gguf, source=gguf))  # fmt: skip
    for q in ("Q8_0", "Q4_0"):  # requantized from the shipped Q4_1 by llama.cpp's own quantizer
        out.append(pb.Contender("smollm2-135m", f"llama.cpp {q}", "llama.cpp", q, [], "llama",
                                str(d / f"llama-{q}.gguf"), source=gguf))  # fmt: skip
    return out


def prompt_ids(n: int, tokenizer: Path = STORIES_TOKENIZER) -> list[int]:
    """Real text through a tokenizer (stories260K's by default: its ids < 512 are valid for every model)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    ids = tok.encode(PROMPT_TEXT.read_text(encoding="utf-8")[:100_000]).ids
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def run_child(c: pb.Contender, spec: dict, timeout: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    full = {**spec, "kind": c.kind, "path": c.path, "file_name": c.file_name}
    proc = subprocess.run(
        [c.python, str(CHILD)], input=json.dumps(full), capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        raise RuntimeError(" | ".join(lines[-3:]) or f"exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_model(cs: list[pb.Contender], spec: dict, rounds: int, timeout: float) -> None:
    live = [c for c in cs if not c.error]
    for c in live:
        if c.tool == "genai":
            pb.set_genai_threads(Path(c.path), spec["threads"])
        c.build["runs"] = []
    for r in range(rounds):
        for c in live:
            if c.error:
                continue
            t = time.perf_counter()
            try:
                c.build["runs"].append(run_child(c, spec, timeout))
            except Exception as e:  # e.g. a peer that builds but cannot run this shape
                c.error = f"run failed: {e}"
            print(f"  round {r + 1}/{rounds} {c.name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)


def score_model(cs: list[pb.Contender], ckpt: Path, threads: int, timeout: float) -> None:
    """Perplexity of every built contender on the same held-out ids (quality does not vary by round: once)."""
    from int4_table import _held_out_wiki
    from tokenizers import Tokenizer

    text = _held_out_wiki().read_text(encoding="utf-8")
    ids = Tokenizer.from_file(str(ckpt / "tokenizer.json")).encode(text).ids[:PPL_TOKENS]
    spec = {"mode": "ppl", "threads": threads, "ppl_ids": ids, "chunk": PPL_CHUNK}
    for c in (c for c in cs if not c.error):
        try:
            c.build["ppl"] = run_child(c, spec, timeout)
        except Exception as e:  # reported beside its speed, not fatal
            c.build["ppl"] = {"error": str(e)}
        print(f"  {c.name}: perplexity {c.build['ppl'].get('perplexity', '?')}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one process per contender each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-len", type=int, default=32, help="timed decode steps per prompt length")
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    ap.add_argument("--only", default="", help="comma-separated substrings: time only matching contenders")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--ppl-only", action="store_true", help="score (--only) contenders again in results.json")
    ap.add_argument("--merge", action="store_true", help="keep contenders of an earlier run not timed in this one")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per timed child process")
    ap.add_argument("--out", type=Path, default=WORK / "results.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "peers.png")
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := [m for m in models if m not in MODELS]:
        raise SystemExit(f"--models: unknown {', '.join(unknown)} (known: {', '.join(MODELS)})")
    if (args.ppl_only or args.report_only) and not args.out.is_file():
        raise SystemExit(f"{args.out} does not exist: run bench/peers.py without --report-only/--ppl-only first")

    if args.ppl_only:  # score again (e.g. after a fix), keep every timing
        results = json.loads(args.out.read_text())
        for m, entry in results["models"].items():
            if not MODELS[m].get("quality"):
                continue
            picked = [c for c in entry["contenders"] if not only or any(s in c["name"] for s in only)]
            cs = [pb.Contender(**{k: c[k] for k in pb.Contender.__dataclass_fields__}) for c in picked]
            score_model(cs, MODELS[m]["ckpt"], args.threads, args.timeout)
            scored = {c.name: c.build["ppl"] for c in cs}
            for c in entry["contenders"]:
                c["build"]["ppl"] = scored.get(c["name"], c["build"].get("ppl"))
        args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    if args.report_only or args.ppl_only:
        results = json.loads(args.out.read_text())  # (rewritten above by --ppl-only)
        print(peers_report.markdown(results))
        peers_report.plot(results, args.plot)
        peers_pareto.plot(results, args.plot.with_name(args.plot.stem + "-pareto.png"))
        return

    WORK.mkdir(parents=True, exist_ok=True)
    all_cs: dict[str, list[pb.Contender]] = {}
    for m in models:
        spec = MODELS[m]
        ckpt = spec["ckpt"]
        if "prepare" in spec:
            spec["prepare"](ckpt)
        line_up = spec["line_up"](spec["skip"]) if "line_up" in spec else contenders(m, spec["skip"])
        cs = [c for c in line_up if not only or any(s in c.name for s in only)]
        for c in cs:
            t = time.perf_counter()
            pb.build(c, ckpt)
            state = f"error: {c.error}" if c.error else f"{c.build.get('export_s', '?')} s export"
            print(f"{m}: {c.name}: {state} ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
        all_cs[m] = cs
    if args.build_only:
        return

    load_before = list(os.getloadavg())
    bw = measure_bandwidth(args.threads)
    print(f"read bandwidth ({args.threads} threads): {bw['roofline_gbs']:.1f} GB/s", file=sys.stderr)
    for m, cs in all_cs.items():
        lens = MODELS[m]["prompt_lens"]
        spec = {
            "threads": args.threads,
            "prompt_lens": lens,
            "gen_len": args.gen_len,
            "warmup": args.warmup,
            "capacity": max(lens) + args.warmup + args.gen_len + 8,
            "prompt_ids": prompt_ids(max(lens), MODELS[m].get("tokenizer", STORIES_TOKENIZER)),
        }
        time_model(cs, spec, args.rounds, args.timeout)
        if MODELS[m].get("quality"):
            score_model(cs, MODELS[m]["ckpt"], args.threads, args.timeout)
    bw_after = measure_bandwidth(args.threads)
    results = {
        "command": "python bench/peers.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpu": peers_report.cpu_name(),
            "logical_cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": list(os.getloadavg()),
        },
        "bandwidth": {"before": bw, "after": bw_after},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
        "models": {
            m: {
                "prompt_lens": MODELS[m]["prompt_lens"],
                "config": str(MODELS[m]["ckpt"] / "config.json"),
                "contenders": [c.to_dict() for c in cs],
            }
            for m, cs in all_cs.items()
        },
        "versions": peers_report.versions(),
    }
    peers_report.add_roofline(results)
    results["runs"] = [{k: results[k] for k in ("command", "machine", "bandwidth")}]
    if args.merge and args.out.is_file():
        results = peers_report.merge(json.loads(args.out.read_text()), results)
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(peers_report.markdown(results))
    peers_report.plot(results, args.plot)
    peers_pareto.plot(results, args.plot.with_name(args.plot.stem + "-pareto.png"))
    print(f"\nnumbers: {args.out}\nplot: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
