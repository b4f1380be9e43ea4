"""Agreement across machines: the probe on each graph, the verdicts, and real aarch64 onnxruntime under qemu.

The emulated tests run PyPI's aarch64 onnxruntime wheel (make arm-tools installs qemu-user-static; the
environment is built once into $EDGEKIT_CACHE/arm64 and reused by make check-arm, which runs the matrix).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from edgekit.bundle.folder import open_bundle
from edgekit.errors import EdgekitError
from edgekit.runtime import GenerationConfig, Generator
from edgekit.runtime.agreement import Probe, compare, probe, text_perplexity
from edgekit.targets import arm_env
from edgekit.targets.emulate import bundle_graphs, check_cores, probe_jobs, run_on_core
from edgekit.targets.recipes import parse_recipe


def _probe(logits: np.ndarray, greedy: list[int]) -> Probe:
    return Probe(greedy, logits.astype(np.float32))


def test_verdicts_follow_the_greedy_text_the_top1_and_the_perplexity():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 50)) * 4
    text = list(rng.integers(0, 50, 40))
    host = _probe(logits, [1, 2, 3, 4])
    assert compare(host, _probe(logits + 1e-6, [1, 2, 3, 4]), text).verdict == "exact"
    noisy = logits + rng.normal(size=logits.shape) * 0.05
    a = compare(host, _probe(noisy, [1, 2, 3, 4]), text)
    assert a.verdict in ("agrees", "exact") and a.max_abs_dlogit > 1e-3
    assert a.verdict == "agrees"  # 0.05 noise on a scale of ~16: beyond exact, top-1 barely moves
    close = compare(host, _probe(noisy, [1, 2, 9, 9]), text)
    assert close.verdict == "close" and close.greedy_same == 2
    worse = logits.copy()
    worse[np.arange(39), text[1:]] -= 2.0  # every next token 2 nats less likely: another quality
    assert compare(host, _probe(worse, [1, 2, 9, 9]), text).verdict == "differs"


def test_text_perplexity_is_exp_of_the_mean_next_token_nll():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    ppl = text_perplexity(logits, [2, 0, 1])  # p(0 | pos 0) = 0.5, p(1 | pos 1) = 0.8
    assert ppl == pytest.approx(np.exp(-(np.log(0.5) + np.log(0.8)) / 2))


def test_the_probe_greedy_tokens_are_the_generators(bundle_factory):
    bundle = open_bundle(bundle_factory(skip=2, quant="int8"))
    job = probe_jobs(bundle, graphs=["onnx"], tokens=40, new_tokens=12)[0]
    result = probe(job)
    gen = Generator(bundle).generate(job.prompt_ids, GenerationConfig(max_new_tokens=12, stop_on_eos=False))
    assert result.greedy == gen.token_ids
    assert result.logits.shape == (40, 512)


def test_every_graph_of_a_mobile_bundle_probes_alike(tmp_path):
    out = tmp_path / "android-fp32"
    cmd = [sys.executable, "-m", "edgekit", "export", "stories260k", "--recipe", "android-arm64", "--quant", "fp32"]
    subprocess.run([*cmd, "--skip", "2", "-o", str(out)], check=True, capture_output=True)
    bundle = open_bundle(out)
    assert bundle_graphs(bundle) == ["onnx", "ort", "fixed"]
    jobs = probe_jobs(bundle, tokens=48, new_tokens=16)
    onnx, ort, fixed = (probe(j) for j in jobs)
    for other in (ort, fixed):  # the .ort twin and the fixed-window pair compute what model.onnx does
        assert compare(onnx, other, jobs[0].text_ids).verdict == "exact"


def test_missing_qemu_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(arm_env.shutil, "which", lambda name: None)
    with pytest.raises(EdgekitError, match="apt-get install qemu-user-static"):
        arm_env.qemu_binary()


def test_a_recipe_records_verdicts_per_emulated_core():
    base = (arm_env.Path(arm_env.__file__).parent.parent / "data" / "recipes" / "raspberry-pi-4.yaml").read_text()
    assert parse_recipe(base, "pi4").emulated == {"cortex-a72": "exact", "cortex-a53": "exact"}
    with pytest.raises(EdgekitError, match="core 'cortex-a99'"):
        parse_recipe(base.replace("cortex-a53: exact", "cortex-a99: exact"), "pi4")
    with pytest.raises(EdgekitError, match="verdict 'perfect'"):
        parse_recipe(base.replace("cortex-a53: exact", "cortex-a53: perfect"), "pi4")


@pytest.fixture(scope="module")
def arm():
    return arm_env.arm_environment()


def test_the_environment_is_built_once_and_its_cpuinfo_is_arm(arm):
    again = arm_env.arm_environment()
    assert again.home == arm.home and (arm.home / "ready").is_file()
    cpuinfo = (arm_env.core_root(arm, "cortex-a76") / "proc" / "cpuinfo").read_text()
    assert "CPU part\t: 0xd0b" in cpuinfo and " asimddp" in cpuinfo  # the A76 has dot products
    assert " asimddp" not in (arm_env.core_root(arm, "cortex-a72") / "proc" / "cpuinfo").read_text()


def test_fp32_is_exact_on_aarch64_and_level4_int4_falls_back_to_fp32_without_dot_products(arm, bundle_factory):
    fp32 = open_bundle(bundle_factory(skip=2, quant="fp32"))
    level4 = open_bundle(bundle_factory(skip=2, quant="int4"))
    level1 = open_bundle(bundle_factory(skip=2, quant="int4", accuracy_level=1))
    jobs = [probe_jobs(b, tokens=64, new_tokens=16)[0] for b in (fp32, level4, level1)]
    on_a72, _ = run_on_core(arm, "cortex-a72", jobs)
    host = [probe(j) for j in jobs]
    text = jobs[0].text_ids
    assert compare(host[0], on_a72[0], text).verdict == "exact"
    assert compare(host[2], on_a72[2], text).verdict == "exact"  # level 1: fp32 compute everywhere
    # the A72 computes level 4 exactly as level 1 (no int8 dot products: the fp32 fallback) ...
    assert np.array_equal(on_a72[1].logits, on_a72[2].logits)
    # ... and so not as x86 does, which computes level 4 in int8
    assert compare(host[1], on_a72[1], text).max_abs_dlogit > 1e-3


def test_verify_emulate_reports_each_core_as_json(bundle_factory):
    bundle = str(bundle_factory(skip=2, quant="fp32"))
    r = subprocess.run(
        [sys.executable, "-m", "edgekit", "verify", bundle, "--emulate", "cortex-a53,neoverse-n1", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and [c["core"] for c in out["emulated"]] == ["cortex-a53", "neoverse-n1"]
    assert all(c["agreement"]["verdict"] == "exact" for c in out["emulated"])


def test_a_graph_the_guest_cannot_open_comes_back_as_its_error(arm, bundle_factory):
    bundle = open_bundle(bundle_factory(skip=2, quant="fp32"))
    job = probe_jobs(bundle, tokens=16, new_tokens=4)[0]
    missing = {"ort": "no model.ort", "fixed": "no fixed-shape graphs"}
    for graph, message in missing.items():
        with pytest.raises(EdgekitError, match=message):
            probe(replace(job, graph=graph))
    results, _ = run_on_core(arm, "cortex-a76", [job, *(replace(job, graph=g) for g in missing)])
    assert isinstance(results[0], Probe)
    assert [m in r for m, r in zip(missing.values(), results[1:], strict=True)] == [True, True]
    checks = check_cores([job], ["cortex-a76"], env=arm)
    assert checks[0].error is None and checks[0].agreement.verdict == "exact"
