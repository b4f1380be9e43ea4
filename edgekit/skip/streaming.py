"""A transformers model that holds one layer's weights at a time, for references too big for memory.

The model is built on the `meta` device and each module (embedding, each decoder layer, final norm,
lm_head) gets its weights from the checkpoint just before its forward and drops them right after, so a
7B reference needs one layer's fp32 weights (about 0.8 GB), not 27 GB. Each forward streams the whole
checkpoint from disk: callers batch every sequence they need into one forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgekit.checkpoint.load import Checkpoint, rebuild_computed_buffers
from edgekit.skip.skipset import SkipSet


class StreamingModel:
    """A transformers causal LM whose modules load their weights on entry and free them on exit."""

    def __init__(self, ckpt: Checkpoint, skip: SkipSet | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from edgekit.skip.surgery import apply_skip

        self.ckpt = ckpt
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(ckpt.config, dtype=torch.float32)
        rebuild_computed_buffers(model, ckpt.config)
        if skip is not None:
            apply_skip(model, skip)
        self.model = model.eval()
        self.loaded_bytes = 0  # the largest set of weights held at once, for the memory report
        streamed = [(model.model.embed_tokens, "model.embed_tokens.")]
        streamed += [(layer, f"model.layers.{i}.") for i, layer in enumerate(model.model.layers)]
        streamed += [(model.model.norm, "model.norm."), (model.lm_head, "lm_head.")]
        for module, prefix in streamed:
            module.register_forward_pre_hook(self._loader(prefix))
            module.register_forward_hook(self._unloader)

    def _source_name(self, name: str) -> str:
        w, embed = self.ckpt.weights, self.ckpt.family.names.embed
        if name not in w and name == "lm_head.weight" and self.ckpt.spec.tie_embeddings:
            return embed
        return name

    def _loader(self, prefix: str) -> Any:
        import torch

        def hook(module: Any, args: Any) -> None:
            state = {
                n: torch.from_numpy(self.ckpt.weights.get(self._source_name(prefix + n)))
                for n, _ in module.named_parameters()
            }
            self.loaded_bytes = max(self.loaded_bytes, sum(t.numel() * 4 for t in state.values()))
            module.load_state_dict(state, assign=True, strict=True)

        return hook

    @staticmethod
    def _unloader(module: Any, args: Any, output: Any) -> None:
        module.to_empty(device="meta")

    def logits(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Logits [len, vocab] of each sequence, all from one forward (one pass over the weights)."""
        import torch

        longest = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, s in enumerate(sequences):
            ids[r, : len(s)] = torch.as_tensor(list(s))
            mask[r, : len(s)] = 1
        kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
        if len(sequences) > 1:  # right padding: the real tokens never attend to it
            kwargs["attention_mask"] = mask
        with torch.no_grad():
            out = self.model(**kwargs).logits.float().numpy()
        return [out[r, : len(s)] for r, s in enumerate(sequences)]
