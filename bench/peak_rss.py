"""Run a command and report its wall time and the peak RSS of its whole process tree.

`/usr/bin/time -v` reports the largest single process; an export may start helpers, so this sums the
resident memory of the command and all its descendants, sampled every 50 ms.

    python bench/peak_rss.py -- edgekit export bench/work/ckpt-llama2-7b --skip 8 --quant int4 -o out/x
    python bench/peak_rss.py --json -- python -c "import numpy; numpy.ones(10**8)"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time

import psutil


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # exited between listing and reading
            total += p.memory_info().rss
    return total


def run(cmd: list[str], interval: float = 0.05) -> dict:
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd)
    proc = psutil.Process(child.pid)
    peak = 0
    while child.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, tree_rss(proc))
        time.sleep(interval)
    return {
        "command": " ".join(cmd),
        "returncode": child.returncode,
        "wall_s": round(time.perf_counter() - t0, 2),
        "peak_rss_bytes": peak,
        "peak_rss_gib": round(peak / 1024**3, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ...")
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given")
    res = run(cmd)
    if args.json:
        print(json.dumps(res))
    else:
        print(f"wall {res['wall_s']} s, peak RSS (tree) {res['peak_rss_gib']} GiB, exit {res['returncode']}")
    sys.exit(res["returncode"])


if __name__ == "__main__":
    main()
