"""Plugin execution providers: onnxruntime-qnn's QNN EP (the HTP simulator on Linux x86-64), registered by
edgekit when onnxruntime has no built-in QNN provider, and given the bundle's recipe options."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from edgekit.export.pipeline import ExportRequest, export
from edgekit.export.quantize import QuantConfig
from edgekit.runtime.generator import Generator
from edgekit.runtime.providers import RuntimeOptions, available, create_session, resolve, short_name
from edgekit.runtime.sampling import GenerationConfig
from edgekit.runtime.session import DecoderSession
from edgekit.targets.recipes import get_recipe

# onnxruntime-qnn ships its simulator wheel for Linux x86-64 only (manylinux_2_35); elsewhere the dev extra
# does not install it and these tests have nothing to run.
pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64", reason="onnxruntime-qnn: Linux x86-64 wheel only"
)


@pytest.fixture(scope="module")
def npu_bundle(tmp_path_factory, stories_path):
    out = tmp_path_factory.mktemp("qnn") / "b"
    recipe = get_recipe("qualcomm-npu")  # what `edgekit export --recipe qualcomm-npu` takes from it
    quant = QuantConfig(mode=recipe.quant)
    return export(
        ExportRequest(model=str(stories_path), recipe=recipe, flavour=recipe.flavour, quant=quant, output=out)
    ).bundle


def _on_qnn(placement) -> int:
    return sum(n for ep, n in placement.nodes.items() if short_name(ep) == "qnn")


def test_qnn_resolves_through_its_plugin_and_is_listed():
    assert resolve("qnn").plugin is not None
    assert "qnn" in available()


def test_the_fixed_graphs_run_whole_on_the_htp_simulator_and_agree_with_the_cpu(npu_bundle):
    opts = RuntimeOptions(provider="qnn", provider_options={"soc_model": "60", "htp_arch": "73"})
    for graph in ("prefill", "decode"):
        _, placement = create_session(npu_bundle / "fixed" / f"{graph}.onnx", opts)
        assert _on_qnn(placement) == placement.total > 300, placement.nodes
    # the dynamic graph: QNN takes a few nodes, the CPU the rest (what the fixed-window loop is for)
    _, placement = create_session(npu_bundle / "model.onnx", RuntimeOptions(provider="qnn"))
    assert 0 < _on_qnn(placement) < placement.total


def test_run_takes_the_recipes_provider_options_and_generates_the_cpu_tokens(npu_bundle):
    prompt = [1, 403, 407, 261, 378]
    gen = Generator(npu_bundle, RuntimeOptions(provider="qnn"))
    assert gen.options.provider_options["soc_model"] == "60"  # from the bundle's recipe
    assert _on_qnn(gen.placement) > 0
    ours = gen.generate(prompt, _greedy(16)).token_ids
    cpu = Generator(npu_bundle).generate(prompt, _greedy(16)).token_ids
    assert ours == cpu and len(ours) == 16
    logits = DecoderSession(npu_bundle / "model.onnx").logits(prompt)
    assert np.isfinite(logits).all()


def _greedy(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, stop_on_eos=False)
