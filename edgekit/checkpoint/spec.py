"""The shapes a checkpoint's config describes, read once: what the graph builders and runtime need."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgekit.checkpoint.families import Family


@dataclass(frozen=True)
class ModelSpec:
    """The shapes the graph builder and runtime need, read once from the config."""

    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_context: int
    rms_eps: float
    tie_embeddings: bool
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    attn_scale: float = 0.0  # the factor on q·k; 1/sqrt(head_dim) unless the config says otherwise
    layer_types: tuple[str, ...] = ()  # per layer: "sliding_attention" (windowed) or "full_attention"
    rope_by_layer_type: bool = False  # each layer type has its own rotary table (Gemma 3)

    def window(self, i: int, context: int) -> int | None:
        """Layer i's sliding window, or None where it attends to the whole `context`."""
        sliding = not self.layer_types or self.layer_types[i] == "sliding_attention"
        if sliding and self.sliding_window and self.sliding_window < context:
            return self.sliding_window
        return None

    def rope_kind(self, i: int) -> str:
        """The rotary table layer i uses ("" where all layers share one)."""
        return self.layer_types[i] if self.rope_by_layer_type else ""

    @staticmethod
    def from_config(config: Any, family: Family) -> ModelSpec:
        heads = config.num_attention_heads
        eos = getattr(config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        window = getattr(config, "sliding_window", None) if family.uses_sliding_window else None
        if family.name == "qwen2" and not getattr(config, "use_sliding_window", False):
            window = None
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layer_types: tuple[str, ...] = ()
        if family.local_global_layers:
            layer_types = tuple(getattr(config, "layer_types", None) or ("full_attention",) * config.num_hidden_layers)
        scalar = getattr(config, "query_pre_attn_scalar", None) or head_dim
        return ModelSpec(
            num_layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab=config.vocab_size,
            max_context=config.max_position_embeddings,
            rms_eps=config.rms_norm_eps,
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            sliding_window=window,
            bos_token_id=getattr(config, "bos_token_id", None),
            eos_token_ids=eos_ids,
            attn_scale=1.0 / math.sqrt(scalar),
            layer_types=layer_types,
            rope_by_layer_type=family.local_global_layers,
        )

    def to_manifest(self, context: int) -> dict[str, Any]:
        """The manifest's architecture section; `context` is what the bundle serves (at most max_context)."""
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "max_context": context,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": list(self.eos_token_ids),
            **self._layer_kinds_manifest(),
        }

    def _layer_kinds_manifest(self) -> dict[str, Any]:
        if not self.layer_types:
            return {}
        return {"layer_types": list(self.layer_types), "sliding_window": self.sliding_window}

    def kv_bytes_per_token(self, kept_layers: int, bytes_per_value: int = 4) -> int:
        return 2 * kept_layers * self.kv_heads * self.head_dim * bytes_per_value
