"""Reading GGUF files: random GGUFs written the way llama.cpp does (exact round trips, permutation, bad
input), and the real SmolLM2 GGUF (config, tensor types, tokenizer against transformers' own conversion)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf_testing import CHATML_TEMPLATE, llama_cpp_permute, write_random_gguf

from edgekit.checkpoint.gguf import read_gguf
from edgekit.checkpoint.gguf_tokenizer import write_tokenizer
from edgekit.errors import EdgekitError

CHATML_SAMPLE = "<|im_start|>user\nHi<|im_end|>\n"


def _assert_one_line_error(path: Path, match: str) -> str:
    with pytest.raises(EdgekitError, match=match) as info:
        read_gguf(path)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- random GGUF round trips


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_random_llama_round_trip(tmp_path: Path, qtype: str) -> None:
    path = tmp_path / "tiny.gguf"
    expected = write_random_gguf(path, qtype=qtype)
    model = read_gguf(path)

    assert model.architecture == "llama"
    assert sorted(model.weights.names()) == sorted(expected)
    assert "lm_head.weight" not in model.weights
    for name, value in expected.items():
        assert model.weights.shape(name) == value.shape
        got = model.weights.get(name)
        assert got.dtype == np.float32 and got.flags.writeable
        np.testing.assert_array_equal(got, value, err_msg=name)
    assert model.tensor_types["model.layers.0.self_attn.q_proj.weight"] == qtype
    assert model.tensor_types["model.norm.weight"] == "F32"


def test_qk_permutation_is_undone(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    expected = write_random_gguf(path, heads=4, kv_heads=2)
    model = read_gguf(path)
    for proj, n_head in (("q_proj", 4), ("k_proj", 2)):
        name = f"model.layers.1.self_attn.{proj}.weight"
        stored = model.weights._tensor(name).data  # rows as llama.cpp laid them out
        assert not np.array_equal(stored, expected[name]), "writer should have permuted the rows"
        np.testing.assert_array_equal(stored, llama_cpp_permute(expected[name], n_head))
        np.testing.assert_array_equal(model.weights.get(name), expected[name])


def test_raw_blocks_are_in_hf_row_order(tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    path = tmp_path / "tiny.gguf"
    expected = write_random_gguf(path, qtype="Q8_0")
    model = read_gguf(path)
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    ):
        type_name, blocks, shape = model.weights.raw(name)
        assert type_name == "Q8_0" and blocks.dtype == np.uint8 and shape == expected[name].shape
        assert blocks.shape == (shape[0], shape[1] // 32 * 34)
        np.testing.assert_array_equal(dequantize(blocks, GGMLQuantizationType.Q8_0), expected[name])


def test_untied_lm_head(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    expected = write_random_gguf(path, tie_embeddings=False)
    model = read_gguf(path)
    assert model.config["tie_word_embeddings"] is False
    np.testing.assert_array_equal(model.weights.get("lm_head.weight"), expected["lm_head.weight"])


def test_qwen2_biases_and_no_permutation(tmp_path: Path) -> None:
    from transformers import Qwen2Config

    path = tmp_path / "qwen.gguf"
    expected = write_random_gguf(path, arch="qwen2")
    model = read_gguf(path)
    assert model.config["model_type"] == "qwen2"
    assert model.config["architectures"] == ["Qwen2ForCausalLM"]
    assert "model.layers.0.self_attn.q_proj.bias" in model.weights
    for name, value in expected.items():
        np.testing.assert_array_equal(model.weights.get(name), value, err_msg=name)
    assert Qwen2Config(**model.config).num_key_value_heads == 2


def test_qwen3_q_k_norms_map_and_export_exactly(tmp_path: Path) -> None:
    from transformers import Qwen3Config

    from edgekit.bundle.folder import read_bundle
    from edgekit.export.pipeline import ExportRequest, export
    from edgekit.export.quantize import QuantConfig

    path = tmp_path / "qwen3.gguf"
    expected = write_random_gguf(path, arch="qwen3", n_layers=3)
    model = read_gguf(path)
    assert (model.config["model_type"], model.config["architectures"]) == ("qwen3", ["Qwen3ForCausalLM"])
    assert "model.layers.2.self_attn.k_norm.weight" in model.weights
    for name, value in expected.items():  # no Q/K permutation for Qwen3, as for Qwen2
        np.testing.assert_array_equal(model.weights.get(name), value, err_msg=name)
    config = Qwen3Config(**model.config)
    assert not config.attention_bias and not config.use_sliding_window
    out = tmp_path / "bundle"
    export(ExportRequest(model=str(path), skip_layers="1", quant=QuantConfig(mode="fp32"), output=out))
    v = read_bundle(out).manifest["verification"]
    assert v["passed"] and v["greedy_match"] and v["max_abs_logit_diff"] < 1e-4 * max(v["max_abs_logit"], 1.0), v


def test_config_round_trips_through_llamaconfig(tmp_path: Path) -> None:
    from transformers import LlamaConfig

    path = tmp_path / "tiny.gguf"
    write_random_gguf(path, rope_theta=500000.0, rms_eps=1e-6, context_length=512)
    config = read_gguf(path).config
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert config["rms_norm_eps"] == 1e-6
    assert config["max_position_embeddings"] == 512
    assert (config["head_dim"], config["num_key_value_heads"], config["vocab_size"]) == (16, 2, 265)
    round_trip = LlamaConfig(**config).to_dict()
    # torch_dtype is transformers 4's name; 5 folds it into dtype.
    for key, value in config.items():
        if key != "torch_dtype":
            assert round_trip[key] == value, key
    assert json.loads(json.dumps(config)) == config


@pytest.mark.slow
def test_forward_matches_transformers_gguf_loader(tmp_path: Path) -> None:
    """transformers' own GGUF loader (independent un-permute) must give the same logits as our weights."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    path = tmp_path / "tiny.gguf"
    write_random_gguf(path, qtype="Q8_0")
    model = read_gguf(path)
    ours = LlamaForCausalLM(LlamaConfig(**model.config))
    state = {n: torch.from_numpy(model.weights.get(n)) for n in model.weights.names()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    ours.load_state_dict(state)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, ref.eval()(ids).logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- tokenizer


def test_write_tokenizer_random(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    path = tmp_path / "tiny.gguf"
    write_random_gguf(path)
    out = tmp_path / "tok"
    files = write_tokenizer(path, out)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHATML_TEMPLATE
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert "is_local" not in config
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in (CHATML_SAMPLE, "Hi the world", " hello\n\nthere "):
        assert tok.encode(text).ids == ref(text)["input_ids"], text
    assert tok.encode(CHATML_SAMPLE).tokens[:1] == ["<|im_start|>"]


def test_write_tokenizer_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "notok.gguf"
    write_random_gguf(path, tokenizer=False)
    assert read_gguf(path).config["vocab_size"] == 128
    with pytest.raises(EdgekitError, match="has no tokenizer metadata"):
        write_tokenizer(path, tmp_path / "tok")


# ---------------------------------------------------------------- bad input


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(2000))
    _assert_one_line_error(path, "not a GGUF file")
    path.write_bytes(b"")
    _assert_one_line_error(path, "not a GGUF file")
    _assert_one_line_error(tmp_path / "missing.gguf", "cannot read")


@pytest.mark.parametrize("fraction", [0.5, 0.99, 0.02])
def test_truncated_random(tmp_path: Path, fraction: float) -> None:
    full = tmp_path / "full.gguf"
    write_random_gguf(full)
    data = full.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * fraction)])
    _assert_one_line_error(cut, "truncated")


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "phi.gguf"
    write_random_gguf(path, arch="phi3")
    message = _assert_one_line_error(path, "GGUF architecture 'phi3' is not supported")
    assert "llama" in message and "qwen2" in message


@pytest.mark.parametrize("dtype", [np.float64, np.int32])
def test_unsupported_tensor_type(tmp_path: Path, dtype: type) -> None:
    path = tmp_path / "odd.gguf"
    # An lm_head the gguf package has no dequantizer for (F64 / I32 are storage types, not quant types).
    write_random_gguf(path, tokenizer=False, extra_tensors={"output.weight": np.zeros((128, 64), dtype=dtype)})
    type_name = "F64" if dtype is np.float64 else "I32"
    _assert_one_line_error(path, f"tensor output.weight has type {type_name}")


def test_unknown_tensor(tmp_path: Path) -> None:
    path = tmp_path / "extra.gguf"
    write_random_gguf(path, tokenizer=False, extra_tensors={"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    _assert_one_line_error(path, "rope_freqs")


def test_unknown_name_lookup(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_random_gguf(path, tokenizer=False)
    model = read_gguf(path)
    with pytest.raises(EdgekitError, match=r"no tensor 'lm_head\.weight'"):
        model.weights.get("lm_head.weight")


# ---------------------------------------------------------------- real SmolLM2 GGUF


@pytest.mark.slow
def test_real_config_and_types(smollm2_gguf: Path) -> None:
    model = read_gguf(smollm2_gguf)
    cfg = model.config
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        576,
        30,
        9,
        3,
    )
    assert (cfg["vocab_size"], cfg["rms_norm_eps"], cfg["rope_parameters"]["rope_theta"]) == (49152, 1e-5, 100000.0)
    assert cfg["tie_word_embeddings"] is True
    assert model.tensor_types["model.embed_tokens.weight"] == "Q8_0"
    assert model.tensor_types["model.layers.0.mlp.down_proj.weight"] == "Q4_1"
    assert len(model.weights.names()) == 272
    q = model.weights.get("model.layers.0.self_attn.q_proj.weight")
    assert q.shape == (576, 576) and np.isfinite(q).all()


@pytest.mark.parametrize("cut", ["1mb", "half"])
def test_real_truncated(tmp_path: Path, cut: str, smollm2_gguf: Path) -> None:
    real = smollm2_gguf
    size = real.stat().st_size
    n = 1 << 20 if cut == "1mb" else size // 2
    path = tmp_path / "cut.gguf"
    with real.open("rb") as src:
        path.write_bytes(src.read(n))
    _assert_one_line_error(path, "truncated")


@pytest.mark.slow
def test_real_tokenizer_matches_transformers(tmp_path: Path, smollm2_gguf: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    real = smollm2_gguf
    files = write_tokenizer(real, tmp_path)
    assert "tokenizer.json" in files
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"].startswith("{% for message in messages %}")
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(str(real.parent), gguf_file=real.name)
    for text in (CHATML_SAMPLE, "The capital of France is Paris.", "  spaces\tand ünïcödé 日本語 123456"):
        assert tok.encode(text).ids == ref(text)["input_ids"], text
    assert tok.encode(CHATML_SAMPLE).ids == [1, 4093, 198, 26843, 2, 198]


def test_gemma3_with_k_quants_maps_and_exports_exactly(tmp_path: Path) -> None:
    """A Q4_K_M-style gemma3 GGUF (Q4_K matrices, a Q5_0 attn_v, a Q6_K embedding; norms stored as 1 + w):
    the reader gives transformers' weights and config, and the export matches its PyTorch twin."""
    from transformers import Gemma3TextConfig

    from edgekit.bundle.folder import read_bundle
    from edgekit.export.pipeline import ExportRequest, export
    from edgekit.export.quantize import QuantConfig

    path = tmp_path / "gemma3.gguf"
    expected = write_random_gguf(
        path, arch="gemma3", n_layers=6, hidden=256, heads=4, kv_heads=1, intermediate=512, qtype="Q4_K",
        embed_qtype="Q6_K", layer_qtypes={"attn_v": "Q5_0"}, sliding_window=4, rope_theta=1e6,
    )  # fmt: skip
    model = read_gguf(path)
    assert (model.config["model_type"], model.config["architectures"]) == ("gemma3_text", ["Gemma3ForCausalLM"])
    assert set(model.tensor_types.values()) == {"F32", "Q4_K", "Q5_0", "Q6_K"}
    assert model.tensor_types["model.layers.0.self_attn.v_proj.weight"] == "Q5_0"
    for name, value in expected.items():  # norms come back as w (the file holds 1 + w)
        np.testing.assert_array_equal(model.weights.get(name), value, err_msg=name)
    config = Gemma3TextConfig(**model.config)
    assert config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert (config.sliding_window, config.query_pre_attn_scalar, config.hidden_activation) == (
        4,
        64,
        "gelu_pytorch_tanh",
    )
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 1e4
    out = tmp_path / "bundle"
    export(ExportRequest(model=str(path), skip_layers="1,5", quant=QuantConfig(mode="fp32"), output=out))
    v = read_bundle(out).manifest["verification"]
    assert v["passed"] and v["greedy_match"] and v["max_abs_logit_diff"] < 1e-4 * max(v["max_abs_logit"], 1.0), v
