"""Where a decode step's time goes, per operator type, in two or more graphs: onnxruntime's own profiler.

    python bench/decode_profile.py GENAI_BUNDLE EDGEKIT_BUNDLE [...] --context 128 --steps 200 --threads 2

The speed issue asks what edgekit's graph spends that onnxruntime-genai's does not. Each model.onnx runs
alone in onnxruntime (no generator around it, so only the graphs differ): a KV cache of `--context`
zero-filled positions in one IO-bound buffer per slot, bound as past and present (both graphs' GQA then
writes in place, as genai's runtime and edgekit's do), then `--steps` single-token steps with profiling
on. Reported: the profiler's per-node kernel time summed by op type, per step, and the whole step's wall
time. Zero-filled caches read the same bytes as real ones, so the speed is the same; the rows' values do
not matter for timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

KV_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8}


def profile(bundle: Path, context: int, steps: int, threads: int) -> dict:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "decode")
    session = ort.InferenceSession(str(bundle / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    ins = {i.name: i for i in session.get_inputs()}
    capacity = context + steps + 1
    io = session.io_binding()
    keep = []
    for name, info in ins.items():
        if name.startswith("past_key_values."):
            array = np.zeros((1, int(info.shape[1]), capacity, _head_dim(bundle, info)), KV_TYPES[info.type])
            value = ort.OrtValue.ortvalue_from_numpy(array)
            keep.append(array)
            io.bind_ortvalue_input(name, value)
            io.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
    io.bind_output("logits", "cpu")
    walls = []
    for k in range(steps):
        total = context + k + 1
        io.bind_cpu_input("input_ids", np.array([[1]], np.int64))
        io.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        if "position_ids" in ins:
            io.bind_cpu_input("position_ids", np.array([[total - 1]], np.int64))
        t = time.perf_counter()
        session.run_with_iobinding(io)
        walls.append(time.perf_counter() - t)
    trace = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    nodes = set()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            ms = event["dur"] / 1000 / steps  # per step
            by_op[event["args"]["op_name"]] += ms
            if "lm_head" in event["name"]:  # the one matrix the two layouts store differently
                by_op["(of which lm_head)"] += ms
            nodes.add(event["name"])
    return {"wall_ms": 1000 * statistics.median(walls), "ops": dict(by_op), "nodes": len(nodes)}


def _head_dim(bundle: Path, info: ort.NodeArg) -> int:
    """The cache's last axis; genai's graphs name it symbolically (kv_cache_dim): its config has the size."""
    if isinstance(info.shape[3], int):
        return info.shape[3]
    return int(json.loads((bundle / "genai_config.json").read_text())["model"]["decoder"]["head_size"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved; the median of the rounds is kept")
    a = ap.parse_args()
    runs: dict[Path, list[dict]] = {b: [] for b in a.bundles}
    for _ in range(a.rounds):
        for b in a.bundles:
            runs[b].append(profile(b, a.context, a.steps, a.threads))
    rows = {}
    for b, rs in runs.items():
        ops = {op for r in rs for op in r["ops"]}
        rows[b] = {
            "wall_ms": statistics.median(r["wall_ms"] for r in rs),
            "nodes": rs[0]["nodes"],
            "ops": {op: statistics.median(r["ops"].get(op, 0.0) for r in rs) for op in ops},
        }
    ops = sorted(
        {op for r in rows.values() for op in r["ops"]}, key=lambda op: -max(r["ops"].get(op, 0) for r in rows.values())
    )
    names = [b.name for b in rows]
    print(
        f"decode step at {a.context} cached positions, {a.threads} threads, ms per step (median of {a.rounds} rounds)"
    )
    print("| op | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for op in ops:
        print(f"| {op} | " + " | ".join(f"{r['ops'].get(op, 0):.3f}" for r in rows.values()) + " |")
    print("| **sum of kernels** | " + " | ".join(f"{sum(r['ops'].values()):.3f}" for r in rows.values()) + " |")
    print("| **step wall time** | " + " | ".join(f"{r['wall_ms']:.3f}" for r in rows.values()) + " |")
    print("| nodes | " + " | ".join(str(r["nodes"]) for r in rows.values()) + " |")


if __name__ == "__main__":
    main()
