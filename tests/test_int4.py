"""--int4-algo: onnxruntime's quantizers applied one weight at a time, pinned against onnxruntime's own
whole-model quantizer, and measured on the real stories260K (held-out TinyStories)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.checkpoint.load import open_checkpoint
from edgekit.export.int4 import InputHessian, gptq_blocks, int4_matmul, integer_zero_points
from edgekit.export.pipeline import ExportRequest, export
from edgekit.export.quantize import QuantConfig, more_bits_layers
from edgekit.quality.evaluate import EvalRequest, evaluate

K, N, BLOCK = 128, 96, 32


def _weight(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((K, N)) * rng.uniform(0.5, 2, size=(1, N))).astype(np.float32)


def _one_matmul(w: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        [numpy_helper.from_array(w, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _initializers(nodes_inits) -> dict[str, np.ndarray]:
    _, inits = nodes_inits
    return {t.name: numpy_helper.to_array(t) for t in inits}


def _dequantized(inits: dict[str, np.ndarray]) -> np.ndarray:
    """W [K, N] back from MatMulNBits' initializers (packed [N, blocks, 16], scales, packed zero points)."""
    packed = next(v for k, v in inits.items() if "_Q4" in k)
    scale = next(v for k, v in inits.items() if k.endswith("_scale")).reshape(N, -1)
    zp_packed = next(v for k, v in inits.items() if k.endswith("_zp")).reshape(-1)
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, -1, BLOCK).astype(np.float64)
    zp = np.stack([zp_packed & 0x0F, zp_packed >> 4], axis=-1).reshape(-1)[: scale.size].reshape(scale.shape)
    return ((q - zp[..., None]) * scale[..., None]).reshape(N, K).T


def test_kquant_per_weight_is_byte_identical_to_onnxruntimes_whole_model_quantizer():
    from onnxruntime.quantization.matmul_nbits_quantizer import KQuantWeightOnlyQuantConfig, MatMulNBitsQuantizer

    w = _weight()
    whole = MatMulNBitsQuantizer(_one_matmul(w), block_size=BLOCK, algo_config=KQuantWeightOnlyQuantConfig())
    whole.process()
    theirs = {t.name: numpy_helper.to_array(t) for t in whole.model.model.graph.initializer}
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    ours = _initializers(int4_matmul(node, w, BLOCK, 0, "kquant"))
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert ours[name].tobytes() == theirs[name].tobytes(), name


def test_hqq_integer_zero_points_beat_rounding_hqqs_and_rtns():
    """HQQ's float zero points rounded and its scales refitted: every block at most as far from the weight
    as HQQ with its zero point merely rounded, and the whole weight closer than onnxruntime's RTN."""
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor

    w = _weight(1)
    blocks = w.T.reshape(-1, BLOCK).astype(np.float64)
    hqq = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=BLOCK))
    _, s, z = hqq.quantize_internal(torch.from_numpy(np.ascontiguousarray(w.T)), bits=4, group_size=BLOCK)
    s, z = s.reshape(-1, 1).double().numpy(), z.reshape(-1, 1).double().numpy()
    z_round = np.clip(np.round(z), 0, 15)
    rounded = (np.clip(np.round(blocks / s + z_round), 0, 15) - z_round) * s
    q, s_int, z_int = integer_zero_points(blocks, s, z)
    ours = (q - z_int) * s_int
    assert z_int.dtype == np.uint8 and z_int.max() <= 15
    # float32 arithmetic (int4.integer_zero_points runs in torch): equal up to its rounding
    assert np.all(((ours - blocks) ** 2).sum(1) <= ((rounded - blocks) ** 2).sum(1) * (1 + 1e-5) + 1e-9)
    qr, sr, zr = quant_tensor(w.T, 4, BLOCK, "asym", "uint")
    rtn = (qr - zr) * sr
    assert ((ours - blocks) ** 2).sum() < 0.95 * ((rtn - blocks) ** 2).sum()  # measured: 0.92
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    inits = _initializers(int4_matmul(node, w, BLOCK, 4, "hqq"))
    np.testing.assert_allclose(_dequantized(inits), ours.reshape(N, K).T, rtol=1e-5, atol=1e-6)


def test_an_odd_number_of_blocks_per_row_packs_zero_points_per_row():
    """K = 96 is three blocks of 32: MatMulNBits reads zero points [N, 2] per row; the bundle's MatMul must
    equal the dequantized weight (onnxruntime's packer would run the rows together)."""
    import onnxruntime as ort

    w = _weight(5)[:96]
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    nodes, inits = int4_matmul(node, w, BLOCK, 0, "hqq")
    graph = helper.make_graph(
        nodes,
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 96])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    x = np.random.default_rng(6).standard_normal((1, 96)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    blocks = w.T.reshape(-1, BLOCK).astype(np.float64)
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    hqq = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=BLOCK))
    _, s, z = hqq.quantize_internal(torch.from_numpy(np.ascontiguousarray(w.T)), bits=4, group_size=BLOCK)
    q, s, z = integer_zero_points(blocks, s.reshape(-1, 1).double().numpy(), z.reshape(-1, 1).double().numpy())
    w_hat = ((q - z) * s).reshape(N, 96).T
    np.testing.assert_allclose(y, x @ w_hat, rtol=1e-4, atol=1e-4)
    assert np.abs(y - x @ w).max() < 0.2 * np.abs(x @ w).max()


def _correlated_inputs(seed: int = 2) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((K, K)) * 0.3
    return [(rng.standard_normal((1, 256, K)) @ mix + rng.standard_normal((1, 256, K))) for _ in range(4)]


def test_onnxruntimes_gptq_is_rtn_so_ours_is_written_here():
    """onnxruntime 1.32's gptq() feeds errors forward through the zero lower half of an upper Cholesky factor:
    its output is min/max RTN. If this fails, onnxruntime fixed it: compare and consider calling theirs."""
    from onnxruntime.quantization.neural_compressor.weight_only import gptq, quant_tensor

    w, hessian = _weight(3), InputHessian()
    for x in _correlated_inputs():
        hessian.add(x)
    fake = gptq(w.copy(), hessian.value.copy(), 4, BLOCK, "asym", 128, 0.01, False, False, True)
    q, s, z = quant_tensor(w.T, 4, BLOCK, "asym", "uint")
    np.testing.assert_allclose(fake, ((q - z) * s).reshape(N, K).T, atol=1e-5)


def test_gptq_lowers_the_output_error_on_correlated_inputs():
    """What GPTQ is for: ‖X(Ŵ − W)‖² (the Hessian-weighted error), well below RTN's, for a plain MSE that is
    allowed to be higher."""
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor

    w, hessian = _weight(4), InputHessian()
    xs = _correlated_inputs()
    for x in xs:
        hessian.add(x)
    x_all = np.concatenate([x.reshape(-1, K) for x in xs])
    np.testing.assert_allclose(hessian.value, 2 / len(xs) * x_all.T @ x_all / 1, rtol=1e-9)  # onnxruntime's form

    def output_error(w_hat: np.ndarray) -> float:
        return float(np.linalg.norm(x_all @ (w_hat - w)) ** 2)

    q, s, z = quant_tensor(w.T, 4, BLOCK, "asym", "uint")
    rtn = ((q - z) * s).reshape(N, K).T
    q, s, z = gptq_blocks(w, hessian.value, BLOCK)
    ours = ((q - z) * s).reshape(N, K).T
    assert output_error(ours) < 0.7 * output_error(rtn)
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    inits = _initializers(int4_matmul(node, w, BLOCK, 4, "gptq", hessian=hessian.value))
    np.testing.assert_allclose(_dequantized(inits), ours, rtol=1e-5, atol=1e-6)


def test_per_token_hessian_keeps_outlier_tokens_from_taking_the_whole_error_budget():
    """A few tokens 100x larger than the rest in a handful of channels (attention sinks, as in SmolLM2): the
    plain Hessian fits them and leaves the ordinary tokens worse off; scaled per token, GPTQ fits those."""
    rng = np.random.default_rng(7)
    w = _weight(8)
    xs = _correlated_inputs(9)
    for x in xs:
        x[0, :3, :4] *= 100.0  # the first tokens of every batch, four channels
    plain, per_token = InputHessian(), InputHessian(per_token=True)
    for x in xs:
        plain.add(x)
        per_token.add(x)
    ordinary = np.concatenate([x[0, 3:] for x in xs]) + 0.0 * rng.standard_normal(1)

    def error(h: np.ndarray) -> float:
        q, s, z = gptq_blocks(w, h, BLOCK)
        return float(np.linalg.norm(ordinary @ (((q - z) * s).reshape(N, K).T - w)) ** 2)

    assert error(per_token.value) < 0.8 * error(plain.value)


@pytest.fixture(scope="module")
def stories_int4(tmp_path_factory, stories_path):
    """stories260K exported at each --int4-algo (lm_head 8-bit, the default; every layer 4-bit, so the
    algorithms are compared on the same matrices), and at fp32."""
    root = tmp_path_factory.mktemp("int4")
    out = {}
    for algo in ("fp32", "rtn", "hqq", "gptq"):
        quant = QuantConfig(mode="fp32")
        if algo != "fp32":
            quant = QuantConfig(mode="int4", int4_algo=algo, lm_head_bits=8, int4_mix="none")
        out[algo] = export(ExportRequest(model=str(stories_path), quant=quant, output=root / algo))
    return out


def test_hqq_and_gptq_keep_more_of_stories260k_than_rtn_on_held_out_text(stories_int4, corpora):
    """TinyStories valid (held out; calibration is the train split), 20,000 tokens. Measured: fp32 5.41,
    rtn 6.07, hqq 5.91, gptq (per-token Hessian) 5.65 (BENCHMARKS.md)."""
    text = corpora / "tinystories-valid-subset.txt"
    ppl = {
        algo: evaluate(EvalRequest(target=str(r.bundle), text=text, max_tokens=20000)).perplexity.perplexity
        for algo, r in stories_int4.items()
    }
    assert ppl["gptq"] < 0.96 * ppl["rtn"] and ppl["hqq"] < 0.99 * ppl["rtn"], ppl
    assert ppl["gptq"] < 1.07 * ppl["fp32"], ppl


def test_every_algorithm_passes_verification_and_the_manifest_says_how(stories_int4):
    for algo in ("rtn", "hqq", "gptq"):
        m = stories_int4[algo].manifest
        assert m["verification"]["passed"], (algo, m["verification"])
        assert m["quantization"]["int4_algo"] == algo
    assert "HQQ" in stories_int4["hqq"].manifest["quantization"]["quantizer"]
    calib = stories_int4["gptq"].manifest["quantization_calibration"]
    assert calib["text"] == "calib-tinystories.txt" and calib["tokens"] > 1000 and calib["matmuls"] > 10
    nodes = onnx.load(str(stories_int4["gptq"].bundle / "model.onnx"), load_external_data=False).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    # uint8 zero points (4 inputs), never float ones: the int8-compute kernel, not the slow float path
    assert nbits and all(len(n.input) == 4 for n in nbits if "lm_head" not in n.name)


def test_the_q4_k_m_mix_is_llama_cpps_use_more_bits_rule():
    """src/llama-quant.cpp: i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2 (integer division)."""
    assert more_bits_layers("q4_k_m", 30) == (0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29)
    assert more_bits_layers("q4_k_m", 32) == (0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31)
    assert more_bits_layers("q4_k_m", 5) == (2, 4)
    assert more_bits_layers("none", 30) == ()


def test_the_q4_k_m_mix_keeps_v_and_down_at_8_bits_in_the_rule_layers(tmp_path, stories_path):
    """int4 with the q4_k_m mix on stories260K: layers 2 and 4's v_proj (split from q/k) and down_proj are
    8-bit MatMulNBits, every other matrix 4-bit; `--int4-mix none` has none; the manifest and the memory
    estimate say so."""
    from edgekit.export.budget import estimate_memory

    def bits_by_matrix(bundle):
        nodes = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph.node
        return {
            n.name.rsplit("/", 1)[0]: next(a.i for a in n.attribute if a.name == "bits")
            for n in nodes
            if n.op_type == "MatMulNBits"
        }

    mixed_quant = QuantConfig(mode="int4", int4_algo="rtn", int4_mix="q4_k_m")
    mixed = export(ExportRequest(model=str(stories_path), quant=mixed_quant, output=tmp_path / "m"))
    plain = export(
        ExportRequest(
            model=str(stories_path),
            quant=QuantConfig(mode="int4", int4_algo="rtn", int4_mix="none"),
            output=tmp_path / "p",
        )
    )
    raised = {f"/model/layers.{i}/{m}" for i in (2, 4) for m in ("attn/v_proj", "mlp/down_proj")}
    got = bits_by_matrix(mixed.bundle)
    assert {name for name, b in got.items() if b == 8} - {"/lm_head"} == raised
    assert got["/model/layers.2/attn/qk_proj"] == 4 and "/model/layers.3/attn/qkv_proj" in got
    assert set(bits_by_matrix(plain.bundle).values()) == {4}  # lm_head too: the Python API's default
    assert mixed.manifest["verification"]["passed"], mixed.manifest["verification"]
    assert list(mixed.manifest["quantization"]["int8_layers"]) == [2, 4]
    assert list(plain.manifest["quantization"]["int8_layers"]) == []
    spec = open_checkpoint(stories_path, "stories260k").spec
    est = {
        mix: estimate_memory(spec, 5, QuantConfig(mode="int4", int4_mix=mix), 256, 16).weights_bytes
        for mix in ("q4_k_m", "none")
    }
    assert est["q4_k_m"] > est["none"]


@pytest.mark.parametrize("mode", ["int8", "fp32", "keep"])
def test_the_int4_mix_outside_int4_is_refused_in_one_line(mode):
    from edgekit.errors import EdgekitError

    with pytest.raises(
        EdgekitError, match=r"^--int4-mix q4_k_m mixes 8-bit matrices into an int4 export: needs --quant int4$"
    ):
        QuantConfig(mode=mode, int4_mix="q4_k_m")
