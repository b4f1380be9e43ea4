"""Gemma 3 (gemma3_text) on random weights against transformers' own Gemma3ForCausalLM: the scaled
embedding, (1+w) norms, the sandwich norms, GeGLU, query_pre_attn_scalar, and local (sliding-window)
layers interleaved with global ones, each type on its own rotary table, checked through a prefill and 64
cached decode steps past the window, in both graph flavours and with local and global layers skipped."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import check_fp32_parity_and_int4, save_random_model

from edgekit.bundle.folder import read_bundle
from edgekit.export.pipeline import ExportRequest, export
from edgekit.export.quantize import QuantConfig

WINDOW = 8
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2  # global layers 2 and 5


def _config(**overrides):
    from transformers import Gemma3TextConfig

    shape = dict(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
        layer_types=LAYER_TYPES, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        initializer_range=0.08,
        # global layers: 1M base with linear scaling (as Gemma 3 4B+); local: 10k, unscaled
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    )  # fmt: skip
    return Gemma3TextConfig(**{**shape, **overrides})


def _model(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # Gemma's norm weights start at zero (a gain of 1): make all nine kinds matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return save_random_model(_model(_config()), tmp_path_factory.mktemp("gemma3") / "src")


def _reference_logits(src, skipped, ids):
    from transformers import AutoModelForCausalLM

    from edgekit.skip.skipset import SkipSet
    from edgekit.skip.surgery import apply_skip

    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    if skipped:
        apply_skip(ref, SkipSet.explicit(list(skipped), 6))
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy()


def _cached_logits(bundle, ids, prompt):
    from edgekit.runtime.session import DecoderSession

    return DecoderSession(read_bundle(bundle).model_file).cached_logits(ids, prompt)


IDS = [int(t) for t in np.random.default_rng(0).integers(3, 512, WINDOW + 64)]


@pytest.mark.parametrize("flavour", ["fused", "standard"])
@pytest.mark.parametrize("skipped", [(), (1, 5)])  # one local and one global layer
def test_gemma3_parity_through_64_cached_steps_past_the_window(gemma3, tmp_path, flavour, skipped):
    out = tmp_path / "b"
    req = ExportRequest(model=str(gemma3), quant=QuantConfig(mode="fp32"), output=out, flavour=flavour, fill="zero")
    result = export(replace(req, skip_layers=",".join(map(str, skipped)) or None))
    v = result.manifest["verification"]
    assert v["passed"] and v["greedy_match"], v
    assert result.manifest["architecture"]["layer_types"] == LAYER_TYPES
    want = _reference_logits(gemma3, skipped, IDS)
    got = _cached_logits(out, IDS, WINDOW)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < 1e-4 * scale
    slots = [s["layer"] for s in result.manifest["graph"]["kv_slots"]]
    assert slots == [i for i in range(6) if i not in skipped]


def test_the_window_and_the_two_rotary_tables_matter(gemma3):
    """The parity above would not notice a graph that ignored the window or used one rotary table for both
    layer types if those made no difference here: they do."""
    from transformers import AutoModelForCausalLM

    base = _reference_logits(gemma3, (), IDS)
    scale = np.abs(base).max()
    for changed in (
        _config(sliding_window=4096),
        _config(rope_parameters={k: {"rope_type": "default", "rope_theta": 1e4} for k in set(LAYER_TYPES)}),
    ):
        model = AutoModelForCausalLM.from_config(changed).eval()
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(gemma3).state_dict())
        with torch.no_grad():
            other = model(torch.tensor([IDS])).logits[0].numpy()
        assert np.abs(other[WINDOW:] - base[WINDOW:]).max() > 1e-2 * scale


def test_gemma3_surgery_removes_the_attention_output_norm_too(gemma3):
    from transformers import AutoModelForCausalLM

    from edgekit.skip.skipset import SkipSet
    from edgekit.skip.surgery import apply_skip

    model = apply_skip(AutoModelForCausalLM.from_pretrained(gemma3), SkipSet.explicit([5], 6))
    names = {n for n, _ in model.named_parameters()}
    for gone in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm"):
        assert f"model.layers.5.{gone}.weight" not in names
    for kept in ("pre_feedforward_layernorm", "post_feedforward_layernorm", "mlp.gate_proj"):
        assert f"model.layers.5.{kept}.weight" in names
    assert "model.layers.4.post_attention_layernorm.weight" in names


@pytest.mark.parametrize(
    ("quant", "flavour"), [("int8", "fused"), ("int4", "fused"), ("fp16", "fused"), ("int8", "standard")]
)
def test_gemma3_quantized_bundles_stay_close(gemma3, tmp_path, quant, flavour):
    out = tmp_path / "b"
    export(
        ExportRequest(model=str(gemma3), skip_layers="4", quant=QuantConfig(mode=quant), output=out, flavour=flavour)
    )
    v = read_bundle(out).manifest["verification"]
    # random weights give near-flat distributions, so top-1 is noise; perplexity is the signal
    assert abs(v["ppl_onnx"] - v["ppl_torch_fp32"]) < 0.1 * v["ppl_torch_fp32"], v


def test_gemma3_auto_skip_with_the_mean_fill_matches_its_pytorch_twin(gemma3, tmp_path):
    out = tmp_path / "b"
    m = export(ExportRequest(model=str(gemma3), skip="auto:2", quant=QuantConfig(mode="fp32"), output=out)).manifest
    assert len(m["skip"]["skipped"]) == 2 and m["skip"]["fill"]["kind"] == "mean"
    v = m["verification"]
    assert v["passed"] and abs(v["ppl_onnx"] - v["ppl_torch_fp32"]) < 1e-4 * v["ppl_torch_fp32"], v


def test_onnxruntime_genai_runs_a_gemma3_int4_bundle_as_edgekit_does(gemma3, tmp_path):
    from test_targets import genai_tokens

    from edgekit.runtime.generator import GenerationConfig, Generator

    out = tmp_path / "b"
    export(ExportRequest(model=str(gemma3), skip_layers="1", quant=QuantConfig(mode="int4"), output=out))
    assert json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 5
    prompt = IDS[:WINDOW]
    ours = Generator(out).generate(prompt, GenerationConfig(max_new_tokens=2 * WINDOW)).token_ids
    theirs = genai_tokens(out, prompt, 2 * WINDOW)
    if theirs and theirs[-1] == 2:  # genai includes the EOS it stopped on; edgekit's runtime does not
        theirs = theirs[:-1]
    assert len(ours) >= WINDOW and theirs == ours


def test_gemma3_at_the_real_270m_layer_shape(tmp_path):
    """Gemma 3 270M's layer (hidden 640, 4 query heads and 1 KV head of 256, query_pre_attn_scalar 256,
    window 512, local 10k / global 1M rotary), three of its 18 layers, random weights, vocabulary cut to
    512: fp32 parity with a global layer's attention removed, and int4 close to it."""
    config = _config(
        hidden_size=640, intermediate_size=2048, num_hidden_layers=3, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=512, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=1024, rms_norm_eps=1e-6,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    )  # fmt: skip
    src = save_random_model(_model(config), tmp_path / "gemma3-270m-shape")
    check_fp32_parity_and_int4(src, "2", tmp_path)


def test_a_bf16_gemma3_checkpoint_missing_a_sandwich_norm_is_refused_in_one_line(tmp_path):
    """Real Gemma 3 checkpoints ship bf16 safetensors: one exports; one without a post-feedforward norm
    is refused up front, naming the tensor, not half-way through the graph."""
    from safetensors.torch import load_file, save_file

    from edgekit.errors import EdgekitError

    model = _model(_config(num_hidden_layers=3, layer_types=LAYER_TYPES[:3])).to(torch.bfloat16)
    src = save_random_model(model, tmp_path / "bf16")
    out = tmp_path / "b"
    export(ExportRequest(model=str(src), skip_layers="2", quant=QuantConfig(mode="fp32"), output=out))
    v = read_bundle(out).manifest["verification"]
    assert v["passed"] and v["max_abs_logit_diff"] < 1e-4 * v["max_abs_logit"], v
    weights = src / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.1.post_feedforward_layernorm.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(
        EdgekitError, match=r"^weights: model\.layers\.1\.post_feedforward_layernorm\.weight is missing"
    ):
        export(ExportRequest(model=str(src), quant=QuantConfig(mode="fp32"), output=tmp_path / "c"))
