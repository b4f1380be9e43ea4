"""Decode ms/token of two bundles (unskipped vs skipped) at given contexts, and the speed-up the bytes
read per token predict.

A real 1,024-token prefill of a 7B model takes minutes on 2 cores and says nothing about decode, so
each timed step decodes one token against a KV cache of exactly CONTEXT positions (random values:
the cost does not depend on them), with onnxruntime IO binding so inputs are bound once. Bundles are
measured A B A B (fresh session each time, one at a time: a 7B session holds several GB), and the
ratio is taken per adjacent pair, which cancels most of the drift of a shared machine. Besides wall
time it records process CPU time per step (pool threads do not spin): on a machine whose other
users keep the load far above the core count, wall time mostly measures the scheduler, while CPU time
(best with --threads 1) still measures the work.

Predicted time ∝ bytes read per token: every MatMul weight with its scales and zero points (the
embedding table is only gathered, one row) + the KV cache read at that context (K and V, every kept
layer). The predicted speed-up is the ratio of those byte counts.

    python bench/decode_7b.py bench/work/bundles/llama2-7b-skip0-int4 bench/work/bundles/llama2-7b-skip8-int4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def weight_bytes(model_path: Path) -> dict[str, int]:
    """Bytes of the initializers read per decoded token, from the graph's metadata only."""
    model = onnx.load(model_path, load_external_data=False)
    gathered = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    gathered |= {n.input[2] for n in model.graph.node if n.op_type == "GatherBlockQuantized"}
    gathered |= {n.input[3] for n in model.graph.node if n.op_type == "GatherBlockQuantized" and len(n.input) > 3}
    read = table = 0
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        size = int(ext["length"]) if "length" in ext else len(t.raw_data)
        if t.name in gathered:
            table += size
        else:
            read += size
    return {"weights_read": read, "embedding_table": table}


def time_decode(model_path: Path, contexts: list[int], steps: int, warmup: int, threads: int) -> dict:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # Idle pool threads must not spin: on a shared machine spinning burns the CPU time we measure.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    t = time.perf_counter()
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    rng = np.random.default_rng(0)
    out: dict = {"load_s": round(load_s, 1)}
    for ctx in contexts:
        binding = sess.io_binding()
        binding.bind_cpu_input("input_ids", np.array([[7]], np.int64))
        binding.bind_cpu_input("attention_mask", np.ones((1, ctx + 1), np.int64))
        for p in pasts:
            kv = rng.standard_normal((1, p.shape[1], ctx, p.shape[3]), dtype=np.float32)
            binding.bind_ortvalue_input(p.name, ort.OrtValue.ortvalue_from_numpy(kv))
        for o in sess.get_outputs():
            binding.bind_output(o.name)
        times, cpu = [], []
        for k in range(warmup + steps):
            t, c = time.perf_counter(), time.process_time()
            sess.run_with_iobinding(binding)
            if k >= warmup:
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
        out[str(ctx)] = {
            "median_ms": round(1000 * statistics.median(times), 1),
            "median_cpu_ms": round(1000 * statistics.median(cpu), 1),
            "ms": [round(1000 * x) for x in times],
            "cpu_ms": [round(1000 * x) for x in cpu],
        }
        del binding
    del sess
    gc.collect()
    return out


def kv_bytes(model_path: Path, ctx: int) -> int:
    model = onnx.load(model_path, load_external_data=False)
    total = 0
    for i in model.graph.input:
        if i.name.startswith("past_key_values."):
            dims = i.type.tensor_type.shape.dim
            total += dims[1].dim_value * dims[3].dim_value * ctx * 4
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", type=Path, help="unskipped bundle")
    ap.add_argument("skipped", type=Path, help="skipped bundle")
    ap.add_argument("--contexts", default="128,1024")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    bundles = {"base": args.base, "skipped": args.skipped}
    runs: dict[str, list[dict]] = {"base": [], "skipped": []}
    for _ in range(args.rounds):
        for key, b in bundles.items():
            runs[key].append(time_decode(b / "model.onnx", contexts, args.steps, args.warmup, args.threads))
            print(json.dumps({"bundle": str(b), **runs[key][-1]}), flush=True)
    result: dict = {"threads": args.threads, "loadavg": os.getloadavg(), "contexts": {}}
    for ctx in contexts:
        c = str(ctx)
        pairs = list(zip(runs["base"], runs["skipped"], strict=True))
        ratios = [s[c]["median_ms"] / b[c]["median_ms"] for b, s in pairs]
        cpu_ratios = [s[c]["median_cpu_ms"] / b[c]["median_cpu_ms"] for b, s in pairs]
        read = {
            k: weight_bytes(b / "model.onnx")["weights_read"] + kv_bytes(b / "model.onnx", ctx)
            for k, b in bundles.items()
        }
        result["contexts"][c] = {
            "base_ms": statistics.median(r[c]["median_ms"] for r in runs["base"]),
            "skipped_ms": statistics.median(r[c]["median_ms"] for r in runs["skipped"]),
            "measured_time_ratio": round(statistics.median(ratios), 3),
            "base_cpu_ms": statistics.median(r[c]["median_cpu_ms"] for r in runs["base"]),
            "skipped_cpu_ms": statistics.median(r[c]["median_cpu_ms"] for r in runs["skipped"]),
            "measured_cpu_time_ratio": round(statistics.median(cpu_ratios), 3),
            "base_bytes_per_token": read["base"],
            "skipped_bytes_per_token": read["skipped"],
            "predicted_time_ratio": round(read["skipped"] / read["base"], 3),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
