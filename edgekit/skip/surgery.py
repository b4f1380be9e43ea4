"""Remove attention sublayers from a PyTorch model, for verification and evaluation.

The export never goes through this (the graph builder simply does not emit the skipped sublayers);
this is the PyTorch twin the export is checked against, and what `eval --skip` measures.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgekit.checkpoint.families import LayerModules, family_for
from edgekit.skip.skipset import SkipSet


class AttentionFreeDecoderLayer(nn.Module):
    """A decoder layer without its attention sublayer: h + MLP(pre_mlp_norm(h)) (then its output norm,
    where the family has one: Gemma 3).

    Holds only the MLP and its norms, under the layer's own attribute names (so parameter names match
    the checkpoint's); the input norm, q/k/v/o projections, the attention output's norm (Gemma 3) and the
    layer's KV cache are gone, not zeroed.
    """

    def __init__(self, layer: nn.Module, modules: LayerModules, fill: Any = None) -> None:
        super().__init__()
        self._norm_names = (modules.mlp_norm, modules.mlp_out_norm)
        for name in self._norm_names:
            if name:
                setattr(self, name, getattr(layer, name))
        self.mlp = layer.mlp
        # The removed sublayer's stand-in (SkipSet.fill): a constant added to the residual stream. A plain
        # attribute, not a buffer: the streaming model empties each layer's tensors after its forward
        # (skip.streaming), and a fill is a statistic of the skip set, not a weight it could reload.
        self.fill = torch.zeros(0) if fill is None else torch.as_tensor(fill, dtype=torch.float32)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.fill.numel():
            hidden_states = hidden_states + self.fill.to(hidden_states.dtype)
        norm, out_norm = (getattr(self, n) if n else None for n in self._norm_names)
        out = self.mlp(norm(hidden_states))
        return hidden_states + (out_norm(out) if out_norm is not None else out)


def apply_skip(model: Any, skip: SkipSet) -> Any:
    """Replace the skipped layers in place; returns the same model for chaining."""
    modules = family_for(model.config).modules
    layers = model.model.layers
    for i in skip.skipped:
        old = layers[i]
        if isinstance(old, AttentionFreeDecoderLayer):
            continue
        layers[i] = AttentionFreeDecoderLayer(old, modules, skip.fill_for(i))
    return model


@torch.no_grad()
def full_logits(model: Any, input_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """Logits [seq, vocab] of one sequence in a single forward pass with no cache.

    A skipped model is always run without a KV cache here: transformers' cache reads the sequence
    length from layer 0, which may be one of the layers that no longer has attention.
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    return model(input_ids=ids, use_cache=False).logits[0].float()
