"""edgekit sweep: real child processes on stories260K, killed midway and resumed, and a broken config."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from edgekit.sweep.report import pareto_front

# Tiny settings: the point is the sweep's bookkeeping, not the numbers.
QUICK = ["--no-verify", "--max-tokens", "64", "--runs", "1", "--gen-len", "2", "--prompt-len", "8", "--jobs", "1"]


def _sweep(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "edgekit", "sweep", "stories260k", "-o", str(out), *args, *QUICK]


def test_killed_sweep_resumes_without_redoing_finished_configs(tmp_path):
    out = tmp_path / "sw"
    cmd = _sweep(out, "--skip", "0,1", "--quant", "fp32")
    first, second = out / "results" / "skip0-fp32.json", out / "results" / "last1-fp32.json"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.exists(), proc.communicate()[1] if proc.poll() is not None else "no result in time"
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not second.exists(), "the sweep finished before it could be interrupted"
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"steps outlived the killed sweep: {alive}"
    kept = (first.stat().st_mtime_ns, first.read_bytes())
    assert json.loads(kept[1])["status"] == "ok"

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 already done, 1 to run" in r.stderr
    assert (first.stat().st_mtime_ns, first.read_bytes()) == kept  # not redone, not rewritten
    done = json.loads(second.read_text())
    assert done["status"] == "ok" and done["skipped"] == [4] and done["decode_ms"] > 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["name"] for row in rows] == ["skip0-fp32", "last1-fp32"]
    assert not any((out / "bundles").iterdir())  # bundles go once profiled unless --keep-bundles


def test_broken_config_is_recorded_and_the_report_still_written(tmp_path):
    out = tmp_path / "sw"
    # stories260K has 5 layers: skipping 7 cannot be exported.
    r = subprocess.run(
        _sweep(out, "--skip", "0,7", "--quant", "int8"), capture_output=True, text=True, timeout=300, check=False
    )
    assert r.returncode == 0, r.stderr
    assert "1 failed" in r.stdout
    bad = json.loads((out / "results" / "last7-int8.json").read_text())
    assert bad["status"] == "failed" and bad["stage"] == "export" and "5 layers" in bad["error"]
    good = json.loads((out / "results" / "skip0-int8.json").read_text())
    assert good["status"] == "ok" and good["perplexity"] > 1 and good["bundle_bytes"] > 0
    report = (out / "report.md").read_text()
    assert "| skip0-int8 |" in report and "FAILED (export)" in report and "pareto.png" in report
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert os.path.getsize(out / "report.html") > 0
    rows = {row["name"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert rows["last7-int8"]["status"] == "failed" and rows["skip0-int8"]["pareto_speed"] == "True"
    # A rerun keeps the good configuration and tries the failed one again.
    r = subprocess.run(
        _sweep(out, "--skip", "0,7", "--quant", "int8"), capture_output=True, text=True, timeout=300, check=False
    )
    assert "1 already done, 1 to run" in r.stderr and "1 failed" in r.stdout


def test_pareto_front():
    pts = [(1.0, 5.0), (2.0, 4.0), (2.0, 6.0), (3.0, 4.0), (0.5, 9.0), (1.0, 5.0)]
    # (2,6) is beaten by (1,5); (3,4) by (2,4); the two equal (1,5) points do not beat each other.
    assert pareto_front(pts) == [True, True, False, False, True, True]
