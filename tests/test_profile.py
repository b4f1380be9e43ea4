"""`edgekit profile` and `edgekit run` as a user calls them: real child processes, real bundles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from edgekit.runtime.providers import PROVIDERS

EDGEKIT = str(Path(sys.executable).with_name("edgekit"))


def _edgekit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EDGEKIT, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def twins(bundle_factory):
    return bundle_factory(skip=0, quant="fp32"), bundle_factory(skip=2, quant="fp32")


def test_profile_json_has_every_field_with_sane_values(twins):
    proc = _edgekit("profile", str(twins[1]), "--prompt-len", "16,64", "--gen-len", "8", "--runs", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (b,) = report["bundles"]
    assert report["ratios"] == []
    assert b["kept_layers"] == 3 and b["num_layers"] == 5 and b["quant"] == "fp32"
    assert b["model_bytes"] > 100_000
    # 3 kept layers × key+value × 4 KV heads × head_dim 16 (padded) × 4 bytes, at the 512-token context
    assert b["kv_bytes_per_token"] == 3 * 2 * 4 * 16 * 4
    assert b["kv_bytes_max_context"] == 512 * b["kv_bytes_per_token"]
    assert b["placement"]["total"] > 0 and b["placement"]["cpu_fallback"] == 0

    def sane(stat: dict) -> None:
        assert len(stat["runs"]) == 2 and all(v > 0 for v in stat["runs"])
        assert stat["min"] <= stat["median"] <= stat["max"]

    sane(b["load_s"])
    sane(b["peak_rss_bytes"])
    assert 20 * 2**20 < b["peak_rss_bytes"]["median"] < 2 * 2**30  # python + onnxruntime + a 1 MB model
    assert [s["prompt_len"] for s in b["settings"]] == [16, 64]
    for s in b["settings"]:
        keys = ("ttft_ms", "prefill_tokens_per_s", "decode_ms_median", "decode_ms_p90", "decode_tokens_per_s")
        for key in (*keys, "ttft_cpu_ms", "decode_cpu_ms_median"):
            sane(s[key])
        assert s["gen_len"] == 8
        for med, p90 in zip(s["decode_ms_median"]["runs"], s["decode_ms_p90"]["runs"], strict=True):
            assert p90 >= med
        assert s["decode_ms_p90"]["median"] >= s["decode_ms_median"]["median"]
    assert report["settings"]["runs"] == 2 and report["machine"]["onnxruntime"] == ort.__version__


def test_profile_compare_prints_ratios(twins):
    proc = _edgekit("profile", *map(str, twins), "--compare", "--prompt-len", "32,128", "--gen-len", "8", "--runs", "2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "A: " in out and "B: " in out and "attention in 3/5 layers" in out
    ratio_rows = [ln for ln in out.splitlines() if ln.startswith("B vs A")]
    assert len(ratio_rows) == 2 and all("0.60×" in ln and ln.count("×") == 8 for ln in ratio_rows)
    assert "first-token speedup" in out and "decode speedup" in out


def test_profile_compare_json_ratios(twins):
    proc = _edgekit(
        "profile", *map(str, twins), "--compare", "--prompt-len", "32", "--gen-len", "4", "--runs", "1", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    (r,) = json.loads(proc.stdout)["ratios"]
    assert r["prompt_len"] == 32 and r["kv_bytes_ratio"] == pytest.approx(3 / 5)
    assert r["decode_speedup"]["median"] > 0 and r["ttft_speedup"]["median"] > 0
    assert r["decode_cpu_speedup"]["median"] > 0 and r["ttft_cpu_speedup"]["median"] > 0


def test_profile_needs_compare_for_several_bundles(twins):
    proc = _edgekit("profile", *map(str, twins))
    assert proc.returncode == 1 and "--compare" in proc.stderr and "Traceback" not in proc.stderr


def test_unavailable_provider_exits_with_one_line(twins):
    present = set(ort.get_available_providers())
    missing = next(k for k, p in PROVIDERS.items() if p.ort_name not in present)
    for cmd in (["run", str(twins[0]), "hi"], ["profile", str(twins[0])]):
        proc = _edgekit(*cmd, "--provider", missing)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgekit: error: provider")
        assert "cpu" in lines[0] and "comes with" in lines[0] and "Traceback" not in proc.stderr


def test_run_streams_a_story(twins):
    proc = _edgekit("run", str(twins[0]), "Once upon a time", "--max-new-tokens", "40")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Once upon a time, there was a little girl named Lily")
    assert "40 tokens" in proc.stderr and "ms/token" in proc.stderr


def test_run_json_and_sampling_options(twins):
    args = ["run", str(twins[1]), "Once upon a time", "--max-new-tokens", "10", "--temperature", "0.9"]
    runs = [_edgekit(*args, "--top-k", "20", "--top-p", "0.9", "--seed", "5", "--json") for _ in range(2)]
    assert all(p.returncode == 0 for p in runs), runs[0].stderr
    a, b = (json.loads(p.stdout) for p in runs)
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 10
    assert "".join(a["pieces"]) == a["text"] and a["prefill_s"] > 0 and len(a["step_s"]) == 9


def test_run_over_long_prompt_is_one_line(twins):
    proc = _edgekit("run", str(twins[0]), "Once upon a time " * 200)
    assert proc.returncode == 1
    assert "this bundle serves at most 512" in proc.stderr and "Traceback" not in proc.stderr


def test_threads_affinity_and_spin_options(twins):
    ok = _edgekit(
        "run", str(twins[1]), "Once", "--max-new-tokens", "4", "--threads", "2", "--affinity", "2", "--no-spin"
    )
    assert ok.returncode == 0, ok.stderr
    bad = _edgekit("run", str(twins[1]), "Once", "--threads", "2", "--affinity", "999")
    assert bad.returncode == 1 and "--affinity '999'" in bad.stderr and "onnxruntime could not" not in bad.stderr
