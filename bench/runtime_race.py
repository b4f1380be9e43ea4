"""edgekit's runtime against onnxruntime-genai's generator on the *same* bundle: what the runtime itself adds
per decode step, with the graph held fixed.

    python bench/runtime_race.py bench/work/peers/models/smollm2-135m/edgekit-int4-skip0 --rounds 5

Both run through bench/peers_child.py (kind edgekit, then kind genai, on one folder with a
genai_config.json), interleaved, one fresh process each, 2 threads, real text through the bundle's
tokenizer; the ratio is taken per round (edgekit ÷ genai), median [min-max].
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers
import peers_build as pb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-len", type=int, default=64)
    args = ap.parse_args()
    if not (args.bundle / "genai_config.json").is_file():
        raise SystemExit(f"{args.bundle}: no genai_config.json, so onnxruntime-genai cannot run it")
    pb.set_genai_threads(args.bundle, args.threads)
    lens = [128, 1024]
    spec = {"threads": args.threads, "prompt_lens": lens, "gen_len": args.gen_len, "warmup": 4,
            "capacity": max(lens) + args.gen_len + 8, "path": str(args.bundle),
            "prompt_ids": peers.prompt_ids(max(lens), args.bundle / "tokenizer.json")}  # fmt: skip
    times: dict[str, list[list[float]]] = {"edgekit": [], "genai": []}
    for _ in range(args.rounds):
        for kind, runs in times.items():
            out = subprocess.run([sys.executable, str(peers.CHILD)], input=json.dumps(spec | {"kind": kind}),
                                 capture_output=True, text=True, check=True)  # fmt: skip
            runs.append([s["decode_ms_median"] for s in json.loads(out.stdout.splitlines()[-1])["settings"]])
    for k, n in enumerate(lens):
        q = sorted(e[k] / g[k] for e, g in zip(times["edgekit"], times["genai"], strict=True))
        ms = {kind: statistics.median(r[k] for r in runs) for kind, runs in times.items()}
        print(f"{n:5} tokens: edgekit runtime {ms['edgekit']:.2f} ms, genai generator {ms['genai']:.2f} ms, "
              f"ratio {statistics.median(q):.3f} [{q[0]:.3f}-{q[-1]:.3f}] over {args.rounds} rounds")  # fmt: skip


if __name__ == "__main__":
    main()
