"""A transformers decoder run one layer at a time over calibration chunks, attention removed where asked.

Why not `model(input_ids)`: measuring which attention sublayers to remove, and what to fill them with,
needs two things a whole-model forward cannot give cheaply.
- Each layer's input for every chunk, kept: a candidate removal at layer c is then evaluated from layer c
  on, not from the embedding (on SmolLM2 the candidates sit in the second half, so this halves the cost).
- The mean output of a removed layer's attention measured in the model *as exported*, with the earlier
  removals and their fills already applied: all chunks must pass layer i before layer i+1 starts.

The model itself is never edited: removal is virtual (the layer's attention is simply not added, or its
fill is added instead), so one loaded model serves every candidate. Layers have the shape the surgery
assumes too: input_layernorm, self_attn, mlp and the family's norm names (checkpoint.families.LayerModules);
where layer types differ (Gemma 3's local and global layers) each gets its own rotary table and mask.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Fills = Mapping[int, Any]  # removed layer → float32 [hidden] added instead of its attention, or None (zero)


@dataclass
class Trace:
    """One layer-major pass: what every layer saw and what its attention contributed."""

    inputs: list[list[Any]]  # [layer][chunk] residual stream entering the layer, torch [1, len, hidden]
    attention_mean: dict[int, np.ndarray]  # layer → its attention output averaged over all tokens
    importance: dict[int, float]  # kept layer → mean 1 − cos(residual in, residual after attention)
    fills: dict[int, Any]  # removed layer → the vector that was added (None for zero)
    nll: float  # mean next-token negative log-likelihood over the chunks
    finals: list[Any]  # [chunk] the residual stream after the last layer


class LayerwiseModel:
    """`model` (a transformers causal LM, fp32, intact) over fixed token chunks."""

    def __init__(self, model: Any, chunks: list[list[int]]) -> None:
        import torch

        from edgekit.checkpoint.families import family_for

        self.model = model
        self.layers = model.model.layers
        self.modules = family_for(model.config).modules
        config = model.config
        self.layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * len(self.layers))
        per_type_rope = "layer_type" in inspect.signature(model.model.rotary_emb.forward).parameters
        self.num_layers = len(self.layers)
        self.chunks = [torch.as_tensor([c], dtype=torch.long) for c in chunks]
        self.tokens = sum(len(c) for c in chunks)
        self._context: list[dict[str, Any]] = []
        self._teacher: list[Any] | None = None  # the intact model's log-probabilities per chunk (fp16)
        with torch.no_grad():
            for ids in self.chunks:
                n = ids.shape[1]
                pos = torch.arange(n).unsqueeze(0)
                embedded = model.model.embed_tokens(ids)
                # An explicit additive causal mask: correct for every attention implementation (eager
                # ignores is_causal when handed no mask); a sliding layer also masks what is past its window.
                causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
                window = getattr(config, "sliding_window", None) or n
                sliding = causal.masked_fill(torch.ones(n, n, dtype=torch.bool).tril(-window), float("-inf"))
                by_type = {}
                for kind in set(self.layer_types):
                    rotary = (
                        model.model.rotary_emb(embedded, position_ids=pos, layer_type=kind)
                        if per_type_rope
                        else model.model.rotary_emb(embedded, position_ids=pos)
                    )
                    by_type[kind] = (rotary, sliding if kind == "sliding_attention" else causal)
                self._context.append({"embedded": embedded, "position_ids": pos, "by_type": by_type})

    def _attention(self, i: int, h: Any, c: int) -> Any:
        layer, ctx = self.layers[i], self._context[c]
        rotary, mask = ctx["by_type"][self.layer_types[i]]
        out = layer.self_attn(
            hidden_states=layer.input_layernorm(h),
            position_embeddings=rotary,
            attention_mask=mask,
            position_ids=ctx["position_ids"],
        )
        out = out[0] if isinstance(out, tuple) else out
        if self.modules.attn_out_norm:  # what joins the residual stream is the normalized output (Gemma 3)
            out = getattr(layer, self.modules.attn_out_norm)(out)
        return out

    def _mlp(self, i: int, h: Any) -> Any:
        layer, names = self.layers[i], self.modules
        out = layer.mlp(getattr(layer, names.mlp_norm)(h))
        return h + (getattr(layer, names.mlp_out_norm)(out) if names.mlp_out_norm else out)

    def _chunk_nll(self, h: Any, c: int) -> tuple[float, int]:
        """Summed next-token NLL of chunk `c` from its final residual stream, and the tokens it scored."""
        import torch

        ids = self.chunks[c]
        with torch.no_grad():
            logits = self.model.lm_head(self.model.model.norm(h))[0, :-1].float()
            return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")), ids.shape[1] - 1

    def _teacher_logprobs(self) -> list[Any]:
        """The intact model's next-token log-probabilities per chunk, computed once and kept in fp16
        (SmolLM2: 2,048 tokens × 49,152 ids = 200 MB)."""
        import torch

        if self._teacher is None:
            finals = self.trace({}).finals
            with torch.no_grad():
                self._teacher = [
                    torch.log_softmax(self.model.lm_head(self.model.model.norm(h))[0].float(), -1).half()
                    for h in finals
                ]
        return self._teacher

    def _chunk_kl(self, h: Any, c: int) -> tuple[float, int]:
        """Summed KL(intact ‖ this) of chunk `c`'s next-token distributions, and the positions it covered."""
        import torch

        teacher = self._teacher_logprobs()[c].float()
        with torch.no_grad():
            logp = torch.log_softmax(self.model.lm_head(self.model.model.norm(h))[0].float(), -1)
            return float((teacher.exp() * (teacher - logp)).sum()), logp.shape[0]

    def _nll(self, finals: list[Any]) -> float:
        scored = [self._chunk_nll(h, c) for c, h in enumerate(finals)]
        return sum(s for s, _ in scored) / max(sum(n for _, n in scored), 1)

    def trace(self, removed: Fills | set[int] | tuple[int, ...], fill: str = "zero") -> Trace:
        """Run the model with `removed` layers' attention replaced.

        `removed` may map layers to given fill vectors; a bare set of layers gets, with fill "mean", each
        layer's attention mean measured in this very pass (earlier removals applied), or nothing ("zero").
        """
        import torch

        given = dict(removed) if isinstance(removed, Mapping) else dict.fromkeys(removed)
        inputs: list[list[Any]] = []
        means: dict[int, np.ndarray] = {}
        importance: dict[int, float] = {}
        fills: dict[int, Any] = {}
        with torch.no_grad():
            hs = [ctx["embedded"] for ctx in self._context]
            for i in range(self.num_layers):
                inputs.append(hs)
                attn = [self._attention(i, h, c) for c, h in enumerate(hs)]
                total = sum(a.double().sum(dim=(0, 1)) for a in attn)
                means[i] = (total / self.tokens).float().numpy()
                if i in given:
                    vec = given[i] if given[i] is not None else (means[i] if fill == "mean" else None)
                    fills[i] = vec
                    add = torch.as_tensor(vec) if vec is not None else None
                    hs = [self._mlp(i, h if add is None else h + add) for h in hs]
                    continue
                after = [h + a for h, a in zip(hs, attn, strict=True)]
                cos = sum(
                    float((1 - torch.nn.functional.cosine_similarity(h.double(), y.double(), dim=-1)).sum())
                    for h, y in zip(hs, after, strict=True)
                )
                importance[i] = cos / self.tokens
                hs = [self._mlp(i, y) for y in after]
        return Trace(inputs, means, importance, fills, self._nll(hs), hs)

    def _run_from(self, start: int, h: Any, c: int, fills: Fills) -> Any:
        import torch

        with torch.no_grad():
            for i in range(start, self.num_layers):
                if i in fills:
                    h = self._mlp(i, h if fills[i] is None else h + torch.as_tensor(fills[i]))
                else:
                    h = self._mlp(i, h + self._attention(i, h, c))
        return h

    def chunk_kl_from(self, start: int, h: Any, c: int, fills: Fills) -> tuple[float, int]:
        """Chunk `c`'s summed KL from the intact model when the layers in `fills` lose their attention.

        `h` is what layer `start` receives for that chunk (Trace.inputs[start][c]): only valid if no layer
        before `start` is removed differently from the trace it came from.
        """
        return self._chunk_kl(self._run_from(start, h, c, fills), c)

    def nll_from(self, start: int, inputs: list[Any], fills: Fills) -> float:
        """Mean NLL over every chunk when the layers in `fills` lose their attention (see chunk_kl_from)."""
        scored = [self._chunk_nll(self._run_from(start, h, c, fills), c) for c, h in enumerate(inputs)]
        return sum(s for s, _ in scored) / max(sum(n for _, n in scored), 1)
