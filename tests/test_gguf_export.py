"""GGUF in, bundle out: random GGUFs written the way llama.cpp writes them, through the real export."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from gguf_testing import write_random_gguf

from edgekit.checkpoint.resolve import resolve_model
from edgekit.export.pipeline import ExportRequest, export
from edgekit.export.quantize import QuantConfig


def _export(gguf: Path, out: Path, **quant) -> dict:
    return export(ExportRequest(model=str(gguf), quant=QuantConfig(**quant), output=out)).manifest


def test_q8_gguf_exports_at_fp32_parity_and_records_its_source(tmp_path):
    gguf = tmp_path / "tiny.gguf"
    write_random_gguf(gguf, qtype="Q8_0", n_layers=3)
    m = _export(gguf, tmp_path / "b")
    v = m["verification"]
    assert v["passed"] and v["greedy_match"], v  # against the dequantized PyTorch model, fp32 tolerance
    src = m["source"]["gguf"]
    assert src["sha256"] == hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert src["file"] == "tiny.gguf" and src["tensor_types"]["Q8_0"] == 1 + 3 * 7
    assert src["tensor_type_by_name"]["model.layers.0.self_attn.q_proj.weight"] == "Q8_0"
    assert m["architecture"]["num_layers"] == 3 and m["architecture"]["tie_word_embeddings"] is True
    assert (tmp_path / "b" / "tokenizer_config.json").is_file()


def test_keep_uses_the_gguf_blocks_without_a_second_rounding(tmp_path):
    """Q4_1 matrices and a Q8_0 embedding (SmolLM2's mix): kept blocks match the dequantized model to fp32
    rounding (accuracy level 0: fp32 compute), where requantizing to int4 moves the logits far more."""
    gguf = tmp_path / "q41.gguf"
    write_random_gguf(gguf, qtype="Q4_1", embed_qtype="Q8_0", n_layers=2)
    keep = _export(gguf, tmp_path / "keep", mode="keep", accuracy_level=0)["verification"]
    int4 = _export(gguf, tmp_path / "int4", mode="int4", accuracy_level=0, lm_head_bits=8)["verification"]
    assert keep["max_abs_logit_diff"] < 1e-4 * max(1.0, keep["max_abs_logit"]), keep
    assert keep["top1_agreement"] == 1.0 and keep["greedy_match"]
    assert int4["max_abs_logit_diff"] > 50 * keep["max_abs_logit_diff"], (keep, int4)
    import onnx

    nodes = onnx.load(str(tmp_path / "keep" / "model.onnx"), load_external_data=False).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert nbits and any(n.op_type == "GatherBlockQuantized" for n in nodes)
    # Q4_1 runs on MatMulNBits' default zero points (the int8-compute kernel), its minimum as block offsets:
    # no float zero points, which would put every matrix on MLAS's slow float path.
    assert all(len(n.input) == 3 for n in nbits), [list(n.input) for n in nbits][:3]
    assert sum(n.name.endswith("/add_offsets") for n in nodes) == 2 * 5  # qkv, o, gate, up, down per layer


def test_keep_refuses_a_model_that_is_not_gguf(tmp_path, stories_path):
    from edgekit.errors import EdgekitError

    with pytest.raises(EdgekitError, match=r"keep.*GGUF"):
        export(ExportRequest(model=str(stories_path), quant=QuantConfig(mode="keep"), output=tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_a_folder_holding_one_gguf_resolves_to_it(tmp_path):
    write_random_gguf(tmp_path / "only.gguf")
    r = resolve_model(str(tmp_path))
    assert r.path == (tmp_path / "only.gguf").resolve() and r.how == "local-gguf"


def test_int4_q4_1_rounds_like_llama_cpp_and_recovers_a_q4_1_source(tmp_path):
    """--int4-algo q4_1 quantizes with llama.cpp's Q4_1 (gguf.quants): from a Q4_1 source it finds the same
    blocks again (near-keep error), where onnxruntime's rtn rounds each block's zero point to an integer."""
    gguf = tmp_path / "q41.gguf"
    write_random_gguf(gguf, qtype="Q4_1", embed_qtype="Q8_0", n_layers=2)
    common = dict(mode="int4", accuracy_level=0, lm_head_bits=8, quantize_embedding=False)  # matrices only
    q41 = _export(gguf, tmp_path / "q41", int4_algo="q4_1", **common)
    rtn = _export(gguf, tmp_path / "rtn", int4_algo="rtn", **common)
    assert "Q4_1" in q41["quantization"]["quantizer"]
    d_q41, d_rtn = q41["verification"]["max_abs_logit_diff"], rtn["verification"]["max_abs_logit_diff"]
    assert d_q41 * 10 < d_rtn, (d_q41, d_rtn)


def test_int4_q4_1_needs_blocks_of_32():
    from edgekit.errors import EdgekitError

    with pytest.raises(EdgekitError, match=r"q4_1 has blocks of 32"):
        QuantConfig(mode="int4", int4_algo="q4_1", block_size=128)


def test_a_gguf_is_recognised_without_reading_it(tmp_path, stories_path):
    from edgekit.export.pipeline import default_quant

    (tmp_path / "m.gguf").write_bytes(b"not even read")
    assert default_quant(str(tmp_path / "m.gguf")) == "keep"
    assert default_quant(str(tmp_path)) == "keep"  # a folder holding one, and no config.json
    assert default_quant("smollm2-135m-instruct") == "keep"
    assert default_quant("stories260k") == "fp32" and default_quant(str(stories_path)) == "fp32"
