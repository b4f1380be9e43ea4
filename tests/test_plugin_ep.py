"""Plugin execution providers: onnxruntime-qnn's QNN EP (the HTP simulator on Linux x86-64), registered by
edgekit when onnxruntime has no built-in QNN provider, and given the bundle's recipe options."""

from __future__ import annotations

import platform

import numpy as np
import pytest

from edgekit.export.pipeline import ExportRequest, export
from edgekit.export.quantize import QuantConfig
from edgekit.runtime.fixed_engine import FixedEngine
from edgekit.runtime.generator import Generator
from edgekit.runtime.kv_engine import KVEngine
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
        _, placement = create_session(npu_bundle / f"fixed-{graph}.onnx", opts)
        assert _on_qnn(placement) == placement.total > 200, placement.nodes
    # the dynamic graph: QNN takes a few nodes, the CPU the rest (what the fixed-window loop is for)
    _, placement = create_session(npu_bundle / "model.onnx", RuntimeOptions(provider="qnn"))
    assert 0 < _on_qnn(placement) < placement.total
    assert sum(placement.cpu_ops.values()) == placement.fallback and placement.cpu_ops["MatMul"] > 10
    assert "fell back to CPU: " in placement.summary() and "MatMul" in placement.summary()


def test_on_qnn_the_runtime_drives_the_fixed_graphs_whole_and_generates_the_cpu_tokens(npu_bundle):
    """32 greedy tokens of stories260K on the HTP simulator (fixed prefill/decode, FixedEngine) against
    the dynamic graph on the CPU, and the same pair on the CPU (the window loop itself)."""
    prompt = [1, 403, 407, 261, 378, 308, 260, 403, 429, 414]
    gen = Generator(npu_bundle, RuntimeOptions(provider="qnn"))
    assert gen.options.provider_options["soc_model"] == "60"  # from the bundle's recipe
    assert isinstance(gen.engine, FixedEngine)
    assert _on_qnn(gen.placement) == gen.placement.total > 400, gen.placement.nodes  # prefill + decode
    ours = gen.generate(prompt, _greedy(32)).token_ids
    cpu = Generator(npu_bundle).generate(prompt, _greedy(32)).token_ids
    assert isinstance(Generator(npu_bundle).engine, KVEngine)
    assert ours == cpu and len(ours) == 32


def test_the_fixed_window_engine_matches_one_prefill_of_the_dynamic_graph(npu_bundle):
    """Chunks of P through fixed-prefill.onnx, then single tokens through fixed-decode.onnx, on the CPU: the
    same logits as the dynamic graph's one prefill, and a rewind (chat's truncate) re-feeds correctly."""
    fixed = {g: create_session(npu_bundle / f"fixed-{g}.onnx", RuntimeOptions())[0] for g in ("prefill", "decode")}
    engine = FixedEngine(fixed["prefill"], fixed["decode"])
    ids = [1, *range(300, 380)]  # 81 tokens: two prefill chunks of 64, the second padded
    whole = DecoderSession(npu_bundle / "model.onnx").logits(ids)
    got = np.concatenate([engine.forward(ids[:70]), *(engine.forward([t]) for t in ids[70:])])
    np.testing.assert_allclose(got, whole, atol=5e-2)  # fp16 graph
    engine.truncate(40)
    assert engine.length == 40
    np.testing.assert_allclose(engine.forward(ids[40:45]), whole[40:45], atol=5e-2)


def _greedy(n: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, stop_on_eos=False)


def test_inspect_places_every_graph_of_the_bundle_on_the_provider(npu_bundle):
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "edgekit", "inspect", str(npu_bundle), "--provider", "qnn", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    placed = json.loads(out.stdout)["placement"]
    assert set(placed) == {"model", "prefill", "decode"}
    assert placed["decode"]["cpu_fallback"] == placed["prefill"]["cpu_fallback"] == 0
    assert placed["model"]["cpu_fallback_ops"]["MatMul"] > 10


@pytest.fixture(scope="module")
def qdq_bundle(tmp_path_factory, stories_path):
    out = tmp_path_factory.mktemp("qnn-qdq") / "b"
    recipe = get_recipe("qualcomm-npu-qdq")
    quant = QuantConfig(mode=recipe.quant)
    return export(
        ExportRequest(model=str(stories_path), recipe=recipe, flavour=recipe.flavour, quant=quant, output=out)
    ).bundle


def test_the_qdq_pair_runs_on_htp_as_integers_and_stays_close_to_fp32(qdq_bundle):
    import onnx

    from edgekit.bundle.folder import read_bundle

    qdq = read_bundle(qdq_bundle).manifest["fixed_shapes"]["qdq"]
    assert (qdq["activations"], qdq["weights"]) == ("uint16", "uint8") and qdq["calib_feeds"]["decode"] > 50
    decode = onnx.load(str(qdq_bundle / "fixed-decode.onnx"))
    ops = {n.op_type for n in decode.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [i for i in decode.graph.initializer if i.data_type == onnx.TensorProto.UINT8]
    assert sum(int(np.prod(w.dims)) for w in weights) > 200_000  # the MatMul weights are 8-bit now
    gen = Generator(qdq_bundle, RuntimeOptions(provider="qnn"))
    assert isinstance(gen.engine, FixedEngine)
    # all but the graph-boundary conversions of the float inputs/outputs run on QNN
    assert _on_qnn(gen.placement) > 0.97 * gen.placement.total, gen.placement.nodes
    assert set(gen.placement.cpu_ops) <= {"QuantizeLinear", "DequantizeLinear"}
    prompt = "Once upon a time, there was a little girl"  # a prompt the model is sure of; see BENCHMARKS.md
    on_htp = gen.generate(prompt, _greedy(24)).token_ids
    fp32 = Generator(qdq_bundle).generate(prompt, _greedy(24)).token_ids  # model.onnx stays fp32
    same = next((i for i, (a, b) in enumerate(zip(on_htp, fp32, strict=True)) if a != b), 24)
    assert same >= 16, (on_htp, fp32)
    assert qdq["check_vs_fp32_cpu"]["top1"] > 0.9


def test_the_standard_rms_norm_survives_residual_values_whose_squares_overflow_fp16_on_htp(tmp_path):
    """SmolLM2's residual stream reaches 24,215; HTP runs the norm's float32 in fp16, where 24,215² is inf.
    The plain Pow/ReduceMean/Sqrt form gave zeros for such a row there (the fp16 SmolLM2 pair: ppl 892,645)."""
    import onnx
    from onnx import TensorProto, helper

    from edgekit.export.graph_standard import _Builder
    from edgekit.export.onnx_writer import OPSET, GraphWriter, TensorSink

    hidden, eps = 576, 1e-5
    sink = TensorSink(tmp_path / "w.data")
    g = GraphWriter(sink, QuantConfig(mode="fp16"))
    gamma = np.random.default_rng(1).uniform(0.5, 1.5, hidden).astype(np.float32)
    out = _Builder(g, QuantConfig(mode="fp16"), TensorProto.FLOAT16).rms_norm("x", gamma, eps, "/norm")
    sink.close()
    graph = helper.make_graph(
        [*g.nodes, helper.make_node("Identity", [out], ["y"])],
        "norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4, hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4, hidden])],
        sink.tensors,
    )
    path = tmp_path / "norm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10), path)

    x = np.random.default_rng(0).standard_normal((1, 4, hidden)).astype(np.float32)
    x[0, 0] *= 0.003  # rms near sqrt(eps): eps still counts
    x[0, 2, 5] = 24215.0  # one massive activation
    x[0, 3] *= 300.0  # every square past fp16's 65,504
    x = x.astype(np.float16).astype(np.float32)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * gamma
    opts = RuntimeOptions(
        provider="qnn", provider_options={"soc_model": "60", "htp_arch": "73", "enable_htp_fp16_precision": "1"}
    )
    session, placement = create_session(path, opts)
    assert _on_qnn(placement) == placement.total
    got = session.run(None, {"x": x.astype(np.float16)})[0].astype(np.float32)
    scale = np.abs(want).max(-1)
    assert (np.abs(got - want).max(-1) <= 0.01 * scale).all(), np.abs(got - want).max(-1)
