"""Parity on random-weight models with shapes stories260K does not have: untied lm_head, 4:1 GQA,
head_dim 32 (no padding), attention biases (Qwen2), sliding-window config (Mistral)."""

import pytest
import torch
from conftest import SMALL_SHAPE, save_random_model

from edgekit.bundle.folder import read_bundle
from edgekit.export.pipeline import ExportRequest, export
from edgekit.export.quantize import QuantConfig


def _make(kind: str, folder, stories_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = SMALL_SHAPE
    config = {
        "llama": lambda: LlamaConfig(**common, head_dim=32),
        "qwen2": lambda: Qwen2Config(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=4096),
    }[kind]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if kind == "qwen2":  # biases start at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return save_random_model(model, folder)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_random_model_parity(kind, tmp_path, stories_path):
    src = _make(kind, tmp_path / kind, stories_path)
    for skip_layers, quant in [("1,3", "fp32"), ("3", "int4")]:
        out = tmp_path / f"{kind}-{quant}"
        result = export(
            ExportRequest(model=str(src), skip_layers=skip_layers, quant=QuantConfig(mode=quant), output=out)
        )
        v = read_bundle(result.bundle).manifest["verification"]
        if quant == "fp32":
            assert v["passed"] and v["top1_agreement"] == 1.0 and v["greedy_match"], v
            assert v["max_abs_logit_diff"] < 1e-3 * max(v["max_abs_logit"], 0.1)
        else:
            # random weights give near-flat distributions, so top-1 is noise; perplexity is the signal
            assert abs(v["ppl_onnx"] - v["ppl_torch_fp32"]) < 0.1 * v["ppl_torch_fp32"], v
        assert result.manifest["skip"]["skipped"] == [int(i) for i in skip_layers.split(",")]
        assert result.manifest["graph"]["head_dim"] == 32
