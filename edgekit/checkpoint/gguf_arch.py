"""What each GGUF architecture becomes in Hugging Face terms: one small record per llama.cpp arch.

gguf.py reads these instead of branching on the arch name; adding a Llama-layout arch is one entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Metadata = Callable[[str, Any], Any]  # (key under "{arch}.", default) -> the GGUF's value


@dataclass(frozen=True)
class GGUFArch:
    """What one GGUF architecture becomes in Hugging Face terms."""

    hf_architecture: str
    model_type: str
    # convert_hf_to_gguf.py permutes Q/K only in LlamaModel (and subclasses such as Mistral), to turn HF's
    # rotate-half RoPE layout into GGML's interleaved one; Qwen2Model/Qwen3Model write them untouched
    # (transformers' loader agrees: only the "llama" arch gets LlamaTensorProcessor).
    permuted_qk: bool
    # GGUF name -> HF name, beyond (or replacing) gguf.py's _LAYER_NAMES
    extra_layer_names: tuple[tuple[str, str], ...] = ()
    config: tuple[tuple[str, Any], ...] = ()  # HF config keys set (None: removed) after the common ones
    # what convert_hf_to_gguf.py added to every *norm.weight (Gemma stores w - 1; the GGUF holds w)
    norm_shift: float = 0.0
    finish_config: Callable[[dict[str, Any], Metadata], None] | None = None  # keys that need the metadata


_QWEN2_BIAS_NAMES = (
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
)
_QK_NORM_NAMES = (("attn_q_norm.weight", "self_attn.q_norm.weight"), ("attn_k_norm.weight", "self_attn.k_norm.weight"))
# llama.cpp runs every Qwen layer with full attention, whatever the HF config said about windows.
_FULL_ATTENTION = (("use_sliding_window", False),)

_GEMMA3_NAMES = (
    *_QK_NORM_NAMES,
    ("post_attention_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
    ("post_ffw_norm.weight", "post_feedforward_layernorm.weight"),
)


def _gemma3_config(config: dict[str, Any], metadata: Metadata) -> None:
    """What llama.cpp's gemma3 graph hard-codes rather than stores (src/llama-model.cpp, LLM_ARCH_GEMMA3):
    every sixth layer global, local layers on a 10k rotary base without scaling, and the attention scale
    1/sqrt(head_dim) except for the 27B shape (62 layers: 1/sqrt(hidden/heads))."""
    layers = config["num_hidden_layers"]
    config["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    config["sliding_window"] = int(metadata("attention.sliding_window", 512))
    config["rope_parameters"] = {
        "full_attention": config["rope_parameters"],
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }
    scalar = config["hidden_size"] // config["num_attention_heads"] if layers == 62 else config["head_dim"]
    config["query_pre_attn_scalar"] = scalar


# llama.cpp has no "mistral" arch for text models (Mistral 7B converts as "llama"); "mistral" is accepted
# in case a writer used it anyway.
ARCHITECTURES: dict[str, GGUFArch] = {
    "llama": GGUFArch("LlamaForCausalLM", "llama", True),
    "mistral": GGUFArch("LlamaForCausalLM", "llama", True),
    # Qwen2 attention hard-codes q/k/v biases: its config has no attention_bias/mlp_bias keys
    "qwen2": GGUFArch(
        "Qwen2ForCausalLM",
        "qwen2",
        False,
        _QWEN2_BIAS_NAMES,
        (("attention_bias", None), ("mlp_bias", None), *_FULL_ATTENTION),
    ),
    "qwen3": GGUFArch("Qwen3ForCausalLM", "qwen3", False, _QK_NORM_NAMES, (("mlp_bias", None), *_FULL_ATTENTION)),
    "gemma3": GGUFArch(
        "Gemma3ForCausalLM",
        "gemma3_text",
        False,
        _GEMMA3_NAMES,
        (("hidden_act", None), ("hidden_activation", "gelu_pytorch_tanh"), ("mlp_bias", None)),
        norm_shift=1.0,
        finish_config=_gemma3_config,
    ),
}
