"""A shorter CI run of bench/soak.py: one Generator, many calls, resident memory stays flat."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def test_rss_stays_flat_over_thousands_of_tokens(bundle_factory):
    bundle = bundle_factory(skip=2, quant="int4")
    # A fresh process, so the numbers are the runtime's own and not pytest's allocations.
    r = subprocess.run(
        [sys.executable, str(SOAK), "--bundle", str(bundle), "--tokens", "4000", "--chunk", "200", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads(r.stdout)
    assert report["tokens"] == 4000 and report["calls"] == 20
    assert report["growth_after_warmup"] <= 0.03, report
    assert r.returncode == 0, r.stderr
    assert report["torch_imported"] is False, "what is measured is what a device app carries"
