"""Execution providers in their own onnxruntime build (OpenVINO, edgekit.targets.ep_env) and the recipes'
`coverage:` records that bench/ep_coverage.py (make check-eps) re-checks."""

from __future__ import annotations

import platform
from dataclasses import replace

import pytest

from edgekit.bundle.folder import open_bundle
from edgekit.errors import EdgekitError
from edgekit.export.pipeline import ExportRequest, export
from edgekit.export.quantize import QuantConfig
from edgekit.runtime.agreement import compare, probe
from edgekit.targets.emulate import probe_jobs
from edgekit.targets.ep_env import provider_environment, run_in_environment
from edgekit.targets.recipes import RECIPES_DIR, get_recipe, parse_coverage, parse_recipe


def test_a_recipe_records_coverage_per_provider_and_graph():
    base = (RECIPES_DIR / "qualcomm-npu.yaml").read_text()
    recipe = parse_recipe(base, "qnn")
    assert parse_coverage(recipe.coverage)["qnn"]["fixed"] == (100, "agrees")
    assert recipe.to_manifest()["coverage"] == recipe.coverage
    fixed_line = "    fixed: 100% agrees\n"
    assert base.count(fixed_line) == 2  # qnn's, then openvino's
    for old, new, message in (
        ("  qnn:\n", "  xnnpack:\n", "provider 'xnnpack'"),
        (fixed_line, "    fixed: 100% perfect\n", "expected 'N% verdict'"),
        (fixed_line, "    fixed: 120% agrees\n", "expected 'N% verdict'"),
        (fixed_line, "    ort: 100% agrees\n", "graph 'ort'"),
    ):
        with pytest.raises(EdgekitError, match=message):
            parse_recipe(base.replace(old, new, 1), "qnn")


def test_an_unknown_separate_build_is_one_line():
    with pytest.raises(EdgekitError, match="no separate onnxruntime build"):
        provider_environment("tensorrt")


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="manylinux x86-64 wheel")
def test_openvino_runs_the_standard_graph_whole_in_its_own_environment(tmp_path, stories_path):
    """pip onnxruntime-openvino replaces onnxruntime, so it runs in a cached virtual environment; the
    Qualcomm recipe's fp16 standard graph and its fixed pair go to OpenVINO whole and compute what the
    host's CPU EP does."""
    recipe = get_recipe("qualcomm-npu")
    request = ExportRequest(
        model=str(stories_path), recipe=recipe, flavour=recipe.flavour, quant=QuantConfig(mode=recipe.quant)
    )
    bundle = export(replace(request, output=tmp_path / "b")).bundle
    jobs = probe_jobs(open_bundle(bundle), graphs=["onnx", "fixed"], tokens=64, new_tokens=16)
    host = [probe(job) for job in jobs]
    env = provider_environment("openvino")
    theirs = run_in_environment(env, [replace(job, provider="openvino") for job in jobs])
    for job, mine, other in zip(jobs, host, theirs, strict=True):
        assert not isinstance(other, str), other
        assert set(other.nodes) == {"OpenVINOExecutionProvider"} and sum(other.nodes.values()) > 100, other.nodes
        assert compare(mine, other, job.text_ids).verdict in ("exact", "agrees"), job.graph
    # a graph the build cannot load comes back as that job's one-line error, not a crash
    broken = tmp_path / "b" / "model.onnx"
    broken.write_bytes(b"not a model")
    (error,) = run_in_environment(env, [replace(jobs[0], provider="openvino")])
    assert isinstance(error, str) and "model.onnx" in error
