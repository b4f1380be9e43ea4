"""What differs per model family, in one small record each (the optimum-exporters idea).

Everything downstream (graph builder, torch surgery, verification) reads these records instead of
branching on `model_type`. Adding a family with the Llama layer layout is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgekit.errors import EdgekitError


@dataclass(frozen=True)
class WeightNames:
    """Hugging Face parameter names; `{i}` is the layer index."""

    embed: str = "model.embed_tokens.weight"
    final_norm: str = "model.norm.weight"
    lm_head: str = "lm_head.weight"
    input_norm: str = "model.layers.{i}.input_layernorm.weight"
    q: str = "model.layers.{i}.self_attn.q_proj.{p}"
    k: str = "model.layers.{i}.self_attn.k_proj.{p}"
    v: str = "model.layers.{i}.self_attn.v_proj.{p}"
    o: str = "model.layers.{i}.self_attn.o_proj.weight"
    q_norm: str = "model.layers.{i}.self_attn.q_norm.weight"  # per-head RMSNorm of q and k (Qwen3)
    k_norm: str = "model.layers.{i}.self_attn.k_norm.weight"
    post_norm: str = "model.layers.{i}.post_attention_layernorm.weight"
    gate: str = "model.layers.{i}.mlp.gate_proj.weight"
    up: str = "model.layers.{i}.mlp.up_proj.weight"
    down: str = "model.layers.{i}.mlp.down_proj.weight"

    def attention_weights(self, i: int, qkv_bias: bool, qk_norm: bool = False) -> list[str]:
        names = [self.input_norm, self.q, self.k, self.v, self.o]
        out = [n.format(i=i, p="weight") for n in names]
        if qkv_bias:
            out += [n.format(i=i, p="bias") for n in (self.q, self.k, self.v)]
        if qk_norm:
            out += [self.q_norm.format(i=i), self.k_norm.format(i=i)]
        return out

    def mlp_weights(self, i: int) -> list[str]:
        return [n.format(i=i) for n in (self.post_norm, self.gate, self.up, self.down)]


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    qkv_bias: bool = False
    qk_norm: bool = False  # an RMSNorm over each head of q and k before rotary
    uses_sliding_window: bool = False
    names: WeightNames = WeightNames()

    def attention_weights(self, i: int) -> list[str]:
        return self.names.attention_weights(i, self.qkv_bias, self.qk_norm)


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",), uses_sliding_window=True),
    Family("qwen2", ("qwen2",), qkv_bias=True, uses_sliding_window=True),
    Family("qwen3", ("qwen3",), qk_norm=True, uses_sliding_window=True),
)

# Rotary variants whose inverse frequencies are fixed at load time, so a cos/sin table baked into the
# graph is exact. "dynamic" NTK rescales with the running length and "longrope" switches tables by
# length: neither fits one static table.
STATIC_ROPE_TYPES = {"default", "linear", "llama3", "yarn"}


def family_for(config: Any) -> Family:
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise EdgekitError(
        f"unsupported architecture '{model_type}': edgekit removes attention sublayers from decoders with the "
        f"Llama layer layout ({supported})"
    )


def check_supported(config: Any, family: Family) -> None:
    """Refuse configurations whose graph edgekit would build wrongly, rather than export them silently."""
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise EdgekitError(f"unsupported activation '{act}': edgekit's graph implements SiLU-gated MLPs")
    if getattr(config, "mlp_bias", False):
        raise EdgekitError("unsupported: MLP projections with bias")
    if getattr(config, "attention_bias", False) and not family.qkv_bias:
        raise EdgekitError("unsupported: attention projections with bias in a family that does not expect them")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in STATIC_ROPE_TYPES:
        raise EdgekitError(f"unsupported rotary scaling '{rope.get('rope_type')}': only static tables are exported")
    heads, kv_heads = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    if heads % kv_heads:
        raise EdgekitError(f"unsupported: {heads} attention heads do not divide into {kv_heads} KV heads")
    layer_types = set(getattr(config, "layer_types", None) or ())
    if len(layer_types) > 1:
        raise EdgekitError(
            f"unsupported: layers of different attention kinds ({', '.join(sorted(layer_types))}); edgekit's graph "
            "gives every layer the same window"
        )


def rope_parameters(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return dict(params)
