"""Three ways to rank attention sublayers for removal, and the measured costs behind them.

- **measured** (`--skip auto:N`, the default): greedy on what removal does to the model. Each round
  removes, one at a time, each remaining candidate (with the fill the export will use) and keeps the
  removal whose next-token distributions stay closest to the intact model's (KL divergence on the
  calibration text); the next round starts from that model. The cosine score prefilters the candidates
  (the `prefilter` lowest), successive halving over the tokens drops clear losers early, and each
  candidate runs from its own layer on (quality.layerwise). FinerCut (arXiv 2405.18218) ranks by a
  measured effect too; greedy re-measurement is what sees how removals interact.
  Why KL, not calibration perplexity: on SmolLM2 the perplexity objective chose sets that fit the
  calibration text's domain (WikiText) and cost far more on TinyStories (8.14 vs 7.15 at N=2);
  staying close to the model's own predictions carries over to text it was not measured on.
- **cosine** (`--skip cosine:N`): 1 − cos(residual in, residual after attention), lowest first, greedy
  re-scored after each removal (arXiv 2406.15786). One forward per round, no perplexity.
- **gate-norm** (`--skip gatenorm:N`): data-free, from the weights alone, in the spirit of Gate-Norm
  (arXiv 2512.20636): a layer whose queries and keys barely couple has near-uniform attention, so its
  output is close to a running average of its values, which a constant fill stands in for well. Our
  score (the paper's exact normalisation may differ): for each head, the Frobenius norm of the bilinear
  form the logits use, ‖diag(γ) W_Qᵀ W_K diag(γ)‖_F / √d_head (γ the input norm's weight, GQA heads
  paired with their key head), averaged over heads. Milliseconds, no data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.quality.layerwise import LayerwiseModel

DEFAULT_PREFILTER = 8  # candidates a measured round tries; see BENCHMARKS.md for what fewer/more changed
RANKINGS = ("auto", "cosine", "gatenorm")


@dataclass
class Greedy:
    order: list[int]  # picks in the order they were removed
    rounds: list[dict[str, float]]  # per round: candidate layer → its score (KL per token, or 1 − cos)
    ppl_after: list[float] = field(default_factory=list)  # calibration perplexity after each pick
    fills: dict[int, Any] = field(default_factory=dict)  # the final model's fill per removed layer


def _fill_vector(trace: Any, layer: int, fill: str) -> Any:
    return trace.attention_mean[layer] if fill == "mean" else None


RACE_STAGES = 4  # successive-halving stages: each scores the survivors on another quarter of the tokens


def _stages(lw: LayerwiseModel, stages: int) -> list[list[int]]:
    """Chunk indices in `stages` consecutive groups of about equal token counts."""
    groups: list[list[int]] = [[]]
    done = 0
    for c, ids in enumerate(lw.chunks):
        if done >= len(groups) * lw.tokens / stages and len(groups) < stages:
            groups.append([])
        groups[-1].append(c)
        done += ids.shape[1]
    return groups


def race(lw: LayerwiseModel, trace: Any, candidates: list[int], fill: str) -> dict[int, tuple[float, int]]:
    """Each candidate's divergence from the intact model with it removed, by successive halving over the tokens.

    All candidates are scored on the first quarter of the calibration tokens, the better half goes on to
    the next quarter, and so on: a clearly worse removal stops costing forwards early, and the winner is
    judged on every token. Returns candidate → (mean KL per token over the tokens it was scored on, tokens).
    """
    totals = {c: [0.0, 0] for c in candidates}
    alive = list(candidates)
    stages = _stages(lw, RACE_STAGES)
    for s, chunks in enumerate(stages):
        for c in alive:
            fills = {**trace.fills, c: _fill_vector(trace, c, fill)}
            for j in chunks:
                kl, n = lw.chunk_kl_from(c, trace.inputs[c][j], j, fills)
                totals[c][0] += kl
                totals[c][1] += n
        if s < len(stages) - 1 and len(alive) > 1:
            alive = sorted(alive, key=lambda c: (totals[c][0] / totals[c][1], -c))[: math.ceil(len(alive) / 2)]
    return {c: (t / n, n) for c, (t, n) in totals.items()}


def _resume(lw: LayerwiseModel, fill: str, start: Greedy | None) -> tuple[Any, Greedy]:
    """The trace to continue from and the result so far: a greedy order is a prefix of every longer one."""
    if start is None:
        return lw.trace({}, fill), Greedy([], [])
    result = Greedy(list(start.order), list(start.rounds), list(start.ppl_after))
    return lw.trace(set(result.order), fill), result


def measured_greedy(
    lw: LayerwiseModel, n: int, fill: str, prefilter: int = DEFAULT_PREFILTER, start: Greedy | None = None
) -> Greedy:
    """N greedy removals by measured KL; `start` (an earlier, shorter run on the same settings) is continued."""
    trace, result = _resume(lw, fill, start)
    while len(result.order) < n:
        candidates = sorted(trace.importance, key=lambda i: (trace.importance[i], -i))[:prefilter]
        scores = race(lw, trace, candidates, fill)
        most = max(tokens for _, tokens in scores.values())
        # the winner is among those scored on every chunk; ties go to the later layer
        pick = min((c for c, (_, t) in scores.items() if t == most), key=lambda c: (scores[c][0], -c))
        result.order.append(pick)
        result.rounds.append({str(k): round(v[0], 6) for k, v in sorted(scores.items())})
        trace = lw.trace(set(result.order), fill)  # fills re-measured with the pick removed
        result.ppl_after.append(math.exp(trace.nll))
    result.fills = trace.fills
    return result


def cosine_greedy(lw: LayerwiseModel, n: int, fill: str, first: Any = None, start: Greedy | None = None) -> Greedy:
    """N greedy removals by 1 − cos; `first` is the intact model's trace if already run."""
    trace, result = (first, Greedy([], [])) if first is not None and start is None else _resume(lw, fill, start)
    while len(result.order) < n:
        scores = trace.importance
        pick = min(scores, key=lambda i: (scores[i], -i))
        result.order.append(pick)
        result.rounds.append({str(k): v for k, v in sorted(scores.items())})
        trace = lw.trace(set(result.order), fill)
        result.ppl_after.append(math.exp(trace.nll))
    result.fills = trace.fills
    return result


def gate_norm_scores(ckpt: Any) -> np.ndarray:
    """Query–key coupling per layer, from the checkpoint's weights (low = the attention barely discriminates).

    Reads only each layer's q, k and input norm, so it works on a 7B checkpoint without loading a model.
    """
    spec, names, w = ckpt.spec, ckpt.family.names, ckpt.weights
    group = spec.heads // spec.kv_heads
    out = np.zeros(spec.num_layers)
    for i in range(spec.num_layers):
        gamma = ckpt.norm_weight(names.input_norm.format(i=i)).astype(np.float64)
        q = (w.get(names.q.format(i=i, p="weight")) * gamma).reshape(spec.heads, spec.head_dim, -1)
        k = (w.get(names.k.format(i=i, p="weight")) * gamma).reshape(spec.kv_heads, spec.head_dim, -1)
        # ‖Qᵀ K‖_F² = tr((Q Qᵀ)(K Kᵀ)): two [head_dim, head_dim] Gram matrices, never a [hidden, hidden] one
        gram_q = q @ q.transpose(0, 2, 1)
        gram_k = np.repeat(k @ k.transpose(0, 2, 1), group, axis=0)
        per_head = np.sqrt(np.clip((gram_q * gram_k).sum(axis=(1, 2)), 0, None)) / np.sqrt(spec.head_dim)
        out[i] = float(per_head.mean())
    return out


@dataclass
class SingleCost:
    zero: float  # calibration perplexity with only this layer's attention removed, nothing added
    mean: float  # the same, its mean output added instead


def single_removal_costs(lw: LayerwiseModel, intact: Any) -> dict[int, SingleCost]:
    """Each layer removed on its own from the intact model, with and without the mean fill."""
    out = {}
    for i in range(lw.num_layers):
        zero = math.exp(lw.nll_from(i, intact.inputs[i], {i: None}))
        mean = math.exp(lw.nll_from(i, intact.inputs[i], {i: intact.attention_mean[i]}))
        out[i] = SingleCost(zero, mean)
    return out
