"""The export's memory estimate (manifest `memory`) next to the peak a fresh process really reaches.

For each bundle: run `edgekit.runtime.profile.measure` (load, prompt, generate) in a new Python process and read
its VmHWM from /proc (the high-water mark of that process image; `ru_maxrss` would include the peak of
the process that spawned it, which Linux carries across exec). Linux only.

    python bench/memory_estimate.py out/stories260k-skip2-int4 out/stories260k-laptop-avx512
    python bench/memory_estimate.py --prompt-len 128 --gen-len 64 --json BUNDLE...
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = (
    "import json, sys\n"
    "from edgekit.runtime.profile import measure\n"
    "measure(json.loads(sys.argv[1]))\n"
    "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
)


def measure_peak(bundle: str, prompt_len: int, gen_len: int) -> int:
    spec = {
        "bundle": bundle,
        "prompt_lens": [prompt_len],
        "gen_len": gen_len,
        "warmup": 2,
        "provider": "cpu",
        "threads": None,
        "affinity": None,
        "spin": True,
    }
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=True)
    return int(r.stdout.split()[-1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for b in args.bundles:
        with open(f"{b}/edgekit.json", encoding="utf-8") as f:
            mem = json.load(f)["memory"]
        peak = measure_peak(b, args.prompt_len, args.gen_len)
        rows.append({"bundle": b, **mem, "measured_peak_bytes": peak, "peak_over_estimate": peak / mem["total_bytes"]})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    mb = 1024**2
    print(f"{'bundle':40} {'estimate MB':>12} {'weights est':>12} {'file bytes':>12} {'peak MB':>9} {'peak/est':>9}")
    for r in rows:
        print(
            f"{r['bundle']:40} {r['total_bytes'] / mb:12.1f} {r['weights_bytes']:12d} {r['model_file_bytes']:12d} "
            f"{r['measured_peak_bytes'] / mb:9.1f} {r['peak_over_estimate']:9.2f}"
        )


if __name__ == "__main__":
    main()
