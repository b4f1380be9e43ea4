"""Which attention sublayers matter: per-layer importance on calibration text, and `--skip auto:N`.

The score follows "What Matters in Transformers? Not All Attention is Needed" (He et al. 2024,
arXiv 2406.15786): for each layer, 1 − cos(x, y) where x is the residual stream entering the layer and
y the residual stream after its attention sublayer (x + Attn(norm(x))), averaged over calibration
tokens. A score near 0 means the sublayer barely turns the hidden state, so removing it should cost
little; the sublayers with the lowest scores are the ones to skip. Cosine distance lies in [0, 2].

`auto:N` picks greedily: remove the lowest-scoring sublayer, score the remaining ones again on the
model without it, repeat N times. The first round is exactly the paper's one-shot ranking; later rounds
see how the layers interact. On stories260K this matters: layers 3 and 4 score within 4 % of each
other, the one-shot pair {2, 3} measures worse than simply the last two, the greedy pair {2, 4} better
(docs/sweeps/stories260k).

Optionally each sublayer is also removed on its own and the perplexity change measured (FinerCut,
arXiv 2405.18218, ranks by exactly this): slower, one evaluation per layer, but it measures the thing
the cosine score predicts.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import CALIB_TEXT, DATA_DIR
from edgekit.checkpoint.registry import calib_domain
from edgekit.errors import EdgekitError
from edgekit.quality.perplexity import perplexity, split_documents
from edgekit.skip.skipset import SkipSet, choose_skip

DEFAULT_CALIB = CALIB_TEXT
# General English for every model not trained on TinyStories: 64 KB of WikiText-2's validation split
# (CC BY-SA 3.0, edgekit/data/README.md), taken from its second half so the first half stays held out.
# On SmolLM2-135M, ranking and filling on it instead of TinyStories took auto:8 from +118% to +45%
# perplexity on WikiText-2's first half (BENCHMARKS.md).
ENGLISH_CALIB = DATA_DIR / "calib-wikitext2.txt"


def default_calib(ckpt: Any) -> Path:
    """The calibration text that resembles what the model was trained on."""
    return DEFAULT_CALIB if calib_domain(ckpt.path, ckpt.source_id) == "tinystories" else ENGLISH_CALIB


DEFAULT_TOKEN_BUDGET = 4096
MAX_WINDOW = 1024  # calibration chunks longer than this buy nothing for a redundancy estimate


@dataclass
class LayerScore:
    layer: int
    importance: float  # 1 − cos(residual in, residual after attention), mean over tokens; in [0, 2]
    ppl_skipped: float | None = None  # perplexity with only this layer's attention removed
    ppl_change: float | None = None  # relative to the intact model: 0.05 = 5 % worse


@dataclass
class Recommendation:
    n: int
    auto: list[int]  # what --skip auto:N removes (greedy re-scoring), sorted
    one_shot: list[int]  # the N lowest scores of the intact model (the paper's ranking), sorted
    last_n: list[int]
    by_measured: list[int] | None  # the N layers whose single removal raised perplexity least
    auto_agrees_with_last_n: bool
    measured_agrees_with_last_n: bool | None
    measured_agrees_with_auto: bool | None


@dataclass
class Analysis:
    model: str
    num_layers: int
    calib: str
    tokens: int
    documents: int
    layers: list[LayerScore]
    baseline_ppl: float | None = None
    auto_order: list[int] = field(default_factory=list)  # greedy picks, in the order they were removed
    auto_scores: list[dict[str, float]] = field(default_factory=list)  # every round's scores, by layer

    def ranking(self) -> list[int]:
        """Layers from least to most important (the order auto:N skips them in); ties keep later layers first."""
        return [s.layer for s in sorted(self.layers, key=lambda s: (s.importance, -s.layer))]

    def measured_ranking(self) -> list[int] | None:
        if any(s.ppl_skipped is None for s in self.layers):
            return None
        return [s.layer for s in sorted(self.layers, key=lambda s: (s.ppl_skipped, -s.layer))]

    def recommend(self, n: int) -> Recommendation:
        if not 0 <= n < self.num_layers:
            raise EdgekitError(f"--n {n}: must be between 0 and {self.num_layers - 1} (keep at least one attention)")
        if n > len(self.auto_order):
            raise EdgekitError(f"analysis ran {len(self.auto_order)} greedy rounds; N={n} needs more")
        auto = sorted(self.auto_order[:n])
        last = list(range(self.num_layers - n, self.num_layers))
        measured_rank = self.measured_ranking()
        meas = sorted(measured_rank[:n]) if measured_rank is not None else None
        return Recommendation(
            n=n,
            auto=auto,
            one_shot=sorted(self.ranking()[:n]),
            last_n=last,
            by_measured=meas,
            auto_agrees_with_last_n=auto == last,
            measured_agrees_with_last_n=None if meas is None else meas == last,
            measured_agrees_with_auto=None if meas is None else meas == auto,
        )

    def to_dict(self, n: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "num_layers": self.num_layers,
            "calib": self.calib,
            "tokens": self.tokens,
            "documents": self.documents,
            "score": "1 - cos(residual entering the layer, residual after its attention sublayer); low = redundant",
            "baseline_ppl": self.baseline_ppl,
            "layers": [asdict(s) for s in self.layers],
            "ranking": self.ranking(),
            "measured_ranking": self.measured_ranking(),
            "auto_order": self.auto_order,
            "auto_scores": self.auto_scores,
        }
        if n is not None:
            out["recommendation"] = asdict(self.recommend(n))
        return out

    def manifest_ranking(self) -> dict[str, Any]:
        """What a bundle exported with auto:N records about how its skip set was chosen."""
        return {
            "method": "1-cos(in, after attention) (arXiv 2406.15786), greedy: re-scored after each removal",
            "calib": self.calib,
            "tokens": self.tokens,
            "order": self.auto_order,
            "importance": {str(s.layer): round(s.importance, 6) for s in self.layers},
            "rounds": [{k: round(v, 6) for k, v in r.items()} for r in self.auto_scores],
        }


def calibration_chunks(encode: Any, text_path: Path, budget: int, window: int) -> tuple[list[list[int]], int]:
    """Token chunks of at most `window` tokens, documents split on <|endoftext|>, `budget` tokens in all.

    Returns (chunks, number of documents used).
    """
    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgekitError(f"cannot read calibration text {text_path}: {e}") from e
    if budget < 2:
        raise EdgekitError(f"token budget {budget}: need at least 2 tokens")
    chunks: list[list[int]] = []
    used = docs = 0
    for doc in split_documents(text):
        ids = encode(doc)[: budget - used]
        if len(ids) < 2:
            continue
        docs += 1
        chunks.extend(ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) >= 2)
        used += len(ids)
        if used >= budget:
            break
    if not chunks:
        raise EdgekitError(f"calibration text {text_path} has no document of two or more tokens")
    return chunks, docs


def attention_importance(model: Any, chunks: list[list[int]]) -> np.ndarray:
    """Mean over tokens of 1 − cos(x, x + Attn(norm(x))) for every layer (NaN where already removed).

    The residual entering layer i is what its input norm receives; the residual after the attention
    sublayer is what its post-attention norm receives, so the hooks need no knowledge of the layer's code.
    """
    import torch

    layers = model.model.layers
    sums = np.zeros(len(layers), np.float64)
    count = 0
    seen: dict[int, torch.Tensor] = {}

    def on_input(i: int):
        def hook(module: Any, args: tuple) -> None:
            seen[i] = args[0].detach()

        return hook

    def on_after_attention(i: int):
        def hook(module: Any, args: tuple) -> None:
            x, y = seen.pop(i).double(), args[0].detach().double()
            sums[i] += float((1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).sum())

        return hook

    handles = []
    try:
        for i, layer in enumerate(layers):
            if not hasattr(layer, "input_layernorm"):
                sums[i] = np.nan
                continue
            handles.append(layer.input_layernorm.register_forward_pre_hook(on_input(i)))
            handles.append(layer.post_attention_layernorm.register_forward_pre_hook(on_after_attention(i)))
        with torch.no_grad():
            for ids in chunks:
                model(input_ids=torch.as_tensor([ids], dtype=torch.long), use_cache=False)
                count += len(ids)
    finally:
        for h in handles:
            h.remove()
    return sums / max(count, 1)


def _ppl(model: Any, chunks: list[list[int]], window: int) -> float:
    from edgekit.skip.surgery import full_logits

    return perplexity(lambda ids: full_logits(model, ids).numpy(), chunks, window=window).perplexity


def greedy_order(model: Any, chunks: list[list[int]], rounds: int, first: np.ndarray) -> tuple[list, list]:
    """Remove the lowest-scoring attention sublayer, re-score the rest, `rounds` times (on a copy)."""
    from edgekit.skip.surgery import apply_skip

    num_layers = len(first)
    order: list[int] = []
    history: list[dict[str, float]] = []
    scores, work = first, None
    for r in range(rounds):
        if r:
            work = apply_skip(work if work is not None else copy.deepcopy(model), SkipSet.explicit(order, num_layers))
            scores = attention_importance(work, chunks)
        history.append({str(i): float(s) for i, s in enumerate(scores) if not np.isnan(s)})
        # Ties go to the later layer, the paper's rule of thumb.
        pick = min((i for i in range(num_layers) if i not in order), key=lambda i: (scores[i], -i))
        order.append(pick)
    return order, history


def analyze_checkpoint(
    ckpt: Any,
    calib: Path | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    measure: bool = False,
    model: Any = None,
    progress: Any = None,
    rounds: int | None = None,
) -> Analysis:
    """Score every layer's attention sublayer on `calib` (default: `default_calib`).

    `rounds` greedy rounds are run for auto:N (default: all but one layer, so any N can be recommended).
    """
    from tokenizers import Tokenizer

    from edgekit.checkpoint.load import load_torch_model
    from edgekit.skip.surgery import apply_skip

    calib = Path(calib) if calib is not None else default_calib(ckpt)
    tok_file = Path(ckpt.path) / "tokenizer.json"
    if not tok_file.is_file():
        raise EdgekitError(f"{ckpt.path} has no tokenizer.json, which analysis needs to read the calibration text")
    tokenizer = Tokenizer.from_file(str(tok_file))
    window = min(ckpt.spec.max_context, MAX_WINDOW)
    chunks, docs = calibration_chunks(lambda s: tokenizer.encode(s).ids, calib, token_budget, window)
    model = model if model is not None else load_torch_model(ckpt)
    scores = attention_importance(model, chunks)
    layers = [LayerScore(i, float(s)) for i, s in enumerate(scores)]
    rounds = ckpt.spec.num_layers - 1 if rounds is None else rounds
    order, history = greedy_order(model, chunks, rounds, scores)
    baseline = None
    if measure:
        # Each chunk is one window, the same for every layer, so the numbers compare across layers;
        # `edgekit eval`'s overlapping windows give slightly lower absolute perplexities.
        baseline = _ppl(model, chunks, window)
        for s in layers:
            skipped = apply_skip(copy.deepcopy(model), SkipSet.explicit([s.layer], ckpt.spec.num_layers))
            s.ppl_skipped = _ppl(skipped, chunks, window)
            s.ppl_change = s.ppl_skipped / baseline - 1
            del skipped
            if progress:
                progress(1)
    return Analysis(
        model=ckpt.source_id,
        num_layers=ckpt.spec.num_layers,
        calib=calib.name,
        tokens=sum(len(c) for c in chunks),
        documents=docs,
        layers=layers,
        baseline_ppl=baseline,
        auto_order=order,
        auto_scores=history,
    )


def auto_skip(ckpt: Any, n: int, calib: Path | None = None, token_budget: int = DEFAULT_TOKEN_BUDGET) -> SkipSet:
    """The N least important attention sublayers on the calibration text, ranking attached for the manifest."""
    layers = ckpt.spec.num_layers
    if not 0 <= n < layers:
        raise EdgekitError(f"--skip auto:{n}: the model has {layers} layers; N must be between 0 and {layers - 1}")
    if n == 0:
        return SkipSet.none(layers)
    analysis = analyze_checkpoint(ckpt, calib, token_budget, rounds=n)
    chosen = SkipSet.explicit(analysis.auto_order, layers, rule=f"auto:{n}")
    return SkipSet(chosen.num_layers, chosen.skipped, chosen.rule, ranking=analysis.manifest_ranking())


def plot_analysis(analysis: Analysis, path: Path, n: int | None = None) -> Path:
    """Bar chart of per-layer importance (and measured perplexity change, if any); skip candidates highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = analysis.measured_ranking() is not None
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(10 if measured else 6, 3.6), squeeze=False)
    chosen = set(analysis.recommend(n).auto) if n else set()
    xs = [s.layer for s in analysis.layers]
    colors = ["tab:orange" if i in chosen else "tab:blue" for i in xs]
    ax = axes[0][0]
    ax.bar(xs, [s.importance for s in analysis.layers], color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("1 − cos(in, after attention)")
    ax.set_title("attention sublayer importance" + (f" (orange: auto:{n})" if n else ""))
    ax.set_xticks(xs)
    if measured:
        ax = axes[0][1]
        ax.bar(xs, [100 * (s.ppl_change or 0) for s in analysis.layers], color=colors)
        ax.set_xlabel("layer")
        ax.set_ylabel("perplexity change when removed (%)")
        ax.set_title(f"measured (intact: {analysis.baseline_ppl:.3f})")
        ax.set_xticks(xs)
    fig.suptitle(f"{analysis.model} on {analysis.calib} ({analysis.tokens} tokens)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def select_skip(ckpt: Any, skip: int | str | None, skip_layers: str | None, calib: Path | None = None) -> SkipSet:
    """A checkpoint's skip set from the user's --skip/--skip-layers; auto:N is ranked on `calib`."""
    return choose_skip(ckpt.spec.num_layers, skip, skip_layers, rank=lambda n: auto_skip(ckpt, n, calib))
