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
    post_norm: str = "model.layers.{i}.post_attention_layernorm.weight"  # the norm before the MLP
    # "sandwich" norms on a sublayer's output before it joins the residual stream (Gemma 3); "" if none
    attn_out_norm: str = ""
    mlp_out_norm: str = ""
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
        return [n.format(i=i) for n in (self.post_norm, self.gate, self.up, self.down, self.mlp_out_norm) if n]


@dataclass(frozen=True)
class LayerModules:
    """Attribute names of a transformers decoder layer's norms (surgery and the layerwise model use them)."""

    mlp_norm: str = "post_attention_layernorm"
    attn_out_norm: str = ""  # applied to the attention output before the residual add; "" if none
    mlp_out_norm: str = ""


GEMMA3_NAMES = WeightNames(
    post_norm="model.layers.{i}.pre_feedforward_layernorm.weight",
    attn_out_norm="model.layers.{i}.post_attention_layernorm.weight",
    mlp_out_norm="model.layers.{i}.post_feedforward_layernorm.weight",
)
GEMMA3_MODULES = LayerModules("pre_feedforward_layernorm", "post_attention_layernorm", "post_feedforward_layernorm")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    qkv_bias: bool = False
    qk_norm: bool = False  # an RMSNorm over each head of q and k before rotary
    uses_sliding_window: bool = False
    names: WeightNames = WeightNames()
    modules: LayerModules = LayerModules()
    activation: str = "silu"  # the gated MLP's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    activation_keys: tuple[str, ...] = ("hidden_act",)  # config keys that name it, first found wins
    accepted_activations: tuple[str, ...] = ("silu", "swish")
    norm_offset: float = 0.0  # RMSNorm multiplies by (offset + weight): Gemma stores weight - 1
    scaled_embedding: bool = False  # the embedding output times sqrt(hidden) (Gemma)
    local_global_layers: bool = False  # config.layer_types mixes sliding-window and full-attention layers

    def attention_weights(self, i: int) -> list[str]:
        names = self.names.attention_weights(i, self.qkv_bias, self.qk_norm)
        return names + ([self.names.attn_out_norm.format(i=i)] if self.names.attn_out_norm else [])


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",), uses_sliding_window=True),
    Family("qwen2", ("qwen2",), qkv_bias=True, uses_sliding_window=True),
    Family("qwen3", ("qwen3",), qk_norm=True, uses_sliding_window=True),
    Family(
        "gemma3",
        ("gemma3_text",),
        qk_norm=True,
        uses_sliding_window=True,
        names=GEMMA3_NAMES,
        modules=GEMMA3_MODULES,
        activation="gelu_tanh",
        activation_keys=("hidden_activation", "hidden_act"),
        accepted_activations=("gelu_pytorch_tanh",),
        norm_offset=1.0,
        scaled_embedding=True,
        local_global_layers=True,
    ),
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
    if model_type == "gemma3":
        raise EdgekitError(
            "unsupported architecture 'gemma3': Gemma 3 4B and larger are multimodal (Gemma3ForConditionalGeneration); "
            "edgekit exports the text-only gemma3_text models (Gemma 3 270M, 1B)"
        )
    raise EdgekitError(
        f"unsupported architecture '{model_type}': edgekit removes attention sublayers from decoders with the "
        f"Llama layer layout ({supported})"
    )


def check_supported(config: Any, family: Family) -> None:
    """Refuse configurations whose graph edgekit would build wrongly, rather than export them silently."""
    act = next((getattr(config, k) for k in family.activation_keys if getattr(config, k, None)), "silu")
    if act not in family.accepted_activations:
        raise EdgekitError(
            f"unsupported activation '{act}' for {family.name}: edgekit's graph implements "
            f"{' or '.join(family.accepted_activations)} there"
        )
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None) is not None:
            raise EdgekitError(f"unsupported: {key} (tanh soft-capping, Gemma 2) is not in edgekit's graph")
    if getattr(config, "use_bidirectional_attention", False):
        raise EdgekitError("unsupported: bidirectional attention (an encoder, not a decoder)")
    if getattr(config, "mlp_bias", False):
        raise EdgekitError("unsupported: MLP projections with bias")
    if getattr(config, "attention_bias", False) and not family.qkv_bias:
        raise EdgekitError("unsupported: attention projections with bias in a family that does not expect them")
    for layer_type in layer_kinds(config, family):
        rope = rope_parameters(config, layer_type)
        if rope.get("rope_type", "default") not in STATIC_ROPE_TYPES:
            raise EdgekitError(f"unsupported rotary scaling '{rope.get('rope_type')}': only static tables are exported")
    heads, kv_heads = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    if heads % kv_heads:
        raise EdgekitError(f"unsupported: {heads} attention heads do not divide into {kv_heads} KV heads")
    layer_types = set(getattr(config, "layer_types", None) or ())
    if len(layer_types) > 1 and not family.local_global_layers:
        raise EdgekitError(
            f"unsupported: layers of different attention kinds ({', '.join(sorted(layer_types))}) in "
            f"{family.name}; edgekit's graph gives every layer of this family the same window"
        )
    unknown = layer_types - set(LAYER_TYPES)
    if unknown:
        raise EdgekitError(f"unsupported layer type(s) {', '.join(sorted(unknown))}: edgekit knows {LAYER_TYPES}")


LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_kinds(config: Any, family: Family) -> tuple[str, ...]:
    """The distinct rotary tables a model needs: one per layer type where the family keys rotary by it
    (Gemma 3: local layers 10k, global 1M), else one shared table ("")."""
    if not family.local_global_layers:
        return ("",)
    return tuple(sorted(set(getattr(config, "layer_types", None) or ("full_attention",))))


def rope_parameters(config: Any, layer_type: str = "") -> dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if layer_type and isinstance(params.get(layer_type), dict):  # keyed by layer type (Gemma 3)
        return dict(params[layer_type])
    return params
