"""Export the 7B-shaped random checkpoint with edgekit and record wall time, peak RSS of the process
tree, bundle size and the manifest's timings/verification, one configuration at a time (never two
7B jobs at once: each holds several GB).

    python bench/export_7b.py                                   # int4/int8 x skip 0/8
    python bench/export_7b.py --config int4:8 --max-memory 8GB  # one configuration

Results are appended as JSON lines to bench/work/export-7b.jsonl; bundles go to bench/work/bundles/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_checkpoint import WORK, make_checkpoint
from peak_rss import run

CONFIGS = ("int4:8", "int4:0", "int8:8", "int8:0")


def manifest_record(bundle: Path) -> dict:
    """What a benchmark keeps of an exported bundle's manifest: size, timings, memory plan, verification."""
    m = json.loads((bundle / "edgekit.json").read_text())
    v = m.get("verification") or {}
    keys = (
        "method",
        "max_abs_logit_diff",
        "top1_agreement",
        "greedy_match",
        "ppl_onnx",
        "ppl_torch_fp32",
        "ppl_tokens",
    )
    return {
        "bundle_bytes": sum(f["bytes"] for f in m["files"].values()),
        "timings_s": m["timings_s"],
        "export_memory": m.get("export_memory"),
        "verification": {k: v.get(k) for k in keys},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--config", action="append", help="QUANT:SKIP, repeatable [default: all four]")
    ap.add_argument("--max-memory", help="passed to edgekit export")
    ap.add_argument("--extra", default="", help="more edgekit export arguments")
    args = ap.parse_args()
    ckpt = make_checkpoint(args.shape, WORK / f"ckpt-{args.shape}")
    edgekit = str(Path(sys.executable).with_name("edgekit"))
    for cfg in args.config or CONFIGS:
        quant, skip = cfg.split(":")
        out = WORK / "bundles" / f"{args.shape}-skip{skip}-{quant}"
        cmd = [edgekit, "export", str(ckpt), "--skip", skip, "--quant", quant, "-o", str(out), "--force"]
        if args.max_memory:
            cmd += ["--max-memory", args.max_memory]
        cmd += args.extra.split()
        load_before = os.getloadavg()
        res = run(cmd)
        res["loadavg_before"] = load_before
        res["loadavg_after"] = os.getloadavg()
        res["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, shared"
        res["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if res["returncode"] == 0:
            res |= manifest_record(out)
        print(json.dumps(res), flush=True)
        with open(WORK / "export-7b.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
