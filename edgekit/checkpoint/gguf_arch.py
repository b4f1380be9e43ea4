"""What each GGUF architecture becomes in Hugging Face terms: one small record per llama.cpp arch.

gguf.py reads these instead of branching on the arch name; adding a Llama-layout arch is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GGUFArch:
    """What one GGUF architecture becomes in Hugging Face terms."""

    hf_architecture: str
    model_type: str
    # convert_hf_to_gguf.py permutes Q/K only in LlamaModel (and subclasses such as Mistral), to turn HF's
    # rotate-half RoPE layout into GGML's interleaved one; Qwen2Model/Qwen3Model write them untouched
    # (transformers' loader agrees: only the "llama" arch gets LlamaTensorProcessor).
    permuted_qk: bool
    extra_layer_names: tuple[tuple[str, str], ...] = ()  # GGUF name -> HF name, beyond gguf.py's _LAYER_NAMES
    config: tuple[tuple[str, Any], ...] = ()  # HF config keys set (None: removed) after the common ones


_QWEN2_BIAS_NAMES = (
    ("attn_q.bias", "self_attn.q_proj.bias"),
    ("attn_k.bias", "self_attn.k_proj.bias"),
    ("attn_v.bias", "self_attn.v_proj.bias"),
)
_QK_NORM_NAMES = (("attn_q_norm.weight", "self_attn.q_norm.weight"), ("attn_k_norm.weight", "self_attn.k_norm.weight"))
# llama.cpp runs every Qwen layer with full attention, whatever the HF config said about windows.
_FULL_ATTENTION = (("use_sliding_window", False),)

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
}
