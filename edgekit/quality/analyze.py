"""Which attention sublayers matter, and `--skip RULE:N`: per-layer scores and greedy skip sets.

Three rankings (quality.select says how each works): `auto` (the default) removes, greedily, the sublayer
whose removal *with the fill the export will use* raises calibration perplexity least; `cosine` the one
that turns the residual stream least (1 − cos, arXiv 2406.15786), re-scored after each removal; `gatenorm`
the one whose queries and keys couple least, from the weights alone (arXiv 2512.20636). With `measure`,
each sublayer is also removed on its own and the perplexity measured with nothing added and with its
mean output added (FinerCut, arXiv 2405.18218, ranks by the former).

Everything runs on quality.layerwise, one layer at a time over the calibration chunks. A ranking costs
minutes on a 135M model, so `auto_skip` keeps each result in the cache, keyed by the weights, the
calibration text and the settings: a second export of the same model (int8, then int4) does not rank again.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgekit import CALIB_TEXT, DATA_DIR
from edgekit.checkpoint.registry import calib_domain
from edgekit.errors import EdgekitError
from edgekit.quality.layerwise import LayerwiseModel
from edgekit.quality.perplexity import split_documents
from edgekit.quality.select import (
    DEFAULT_PREFILTER,
    Greedy,
    cosine_greedy,
    gate_norm_scores,
    measured_greedy,
    single_removal_costs,
)

DEFAULT_CALIB = CALIB_TEXT
# General English for every model not trained on TinyStories: 64 KB of WikiText-2's validation split
# (CC BY-SA 3.0, edgekit/data/README.md), taken from its second half so the first half stays held out.
# On SmolLM2-135M, ranking and filling on it instead of TinyStories took auto:8 from +118% to +45%
# perplexity on WikiText-2's first half (BENCHMARKS.md).
ENGLISH_CALIB = DATA_DIR / "calib-wikitext2.txt"


def default_calib(ckpt: Any) -> Path:
    """The calibration text that resembles what the model was trained on."""
    return DEFAULT_CALIB if calib_domain(ckpt.path, ckpt.source_id) == "tinystories" else ENGLISH_CALIB


# Calibration tokens for ranking and fills: on SmolLM2 the measured auto:8 picked the same layers in the
# same order from 2,048 tokens as from 4,096 (KL is a low-variance objective), in 164 s instead of 249 s.
DEFAULT_TOKEN_BUDGET = 2048
MAX_WINDOW = 1024  # calibration chunks longer than this buy nothing for a redundancy estimate


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


@dataclass
class LayerScore:
    layer: int
    importance: float  # 1 − cos(residual in, residual after attention), mean over tokens; in [0, 2]
    gate_norm: float  # query–key coupling from the weights (quality.select.gate_norm_scores)
    ppl_zero: float | None = None  # calibration perplexity with only this attention removed, nothing added
    ppl_mean: float | None = None  # the same with its mean output added instead (--fill mean)


@dataclass
class Recommendation:
    n: int
    auto: list[int]  # what --skip auto:N removes (measured greedy, with the analysis's fill), sorted
    cosine: list[int]  # --skip cosine:N (greedy 1 − cos), sorted
    gatenorm: list[int]  # --skip gatenorm:N (data-free), sorted
    one_shot: list[int]  # the N lowest 1 − cos of the intact model (the paper's ranking), sorted
    last_n: list[int]
    by_measured: list[int] | None  # the N layers whose single removal (with the fill) cost least
    ppl_after: dict[str, float | None]  # calibration perplexity of each rule's set, where the analysis knows it


@dataclass
class Analysis:
    model: str
    num_layers: int
    calib: str
    tokens: int
    documents: int
    fill: str
    layers: list[LayerScore]
    baseline_ppl: float  # the intact model on the calibration chunks
    auto: Greedy
    cosine: Greedy
    seconds: dict[str, float] = field(default_factory=dict)

    def ranking(self) -> list[int]:
        """Layers by 1 − cos of the intact model, least important first; ties keep later layers first."""
        return [s.layer for s in sorted(self.layers, key=lambda s: (s.importance, -s.layer))]

    def gate_norm_ranking(self) -> list[int]:
        return [s.layer for s in sorted(self.layers, key=lambda s: (s.gate_norm, -s.layer))]

    def measured_ranking(self) -> list[int] | None:
        key = "ppl_mean" if self.fill == "mean" else "ppl_zero"
        if any(getattr(s, key) is None for s in self.layers):
            return None
        return [s.layer for s in sorted(self.layers, key=lambda s: (getattr(s, key), -s.layer))]

    def recommend(self, n: int) -> Recommendation:
        if not 0 <= n < self.num_layers:
            raise EdgekitError(f"--n {n}: must be between 0 and {self.num_layers - 1} (keep at least one attention)")
        if n > len(self.auto.order):
            raise EdgekitError(f"analysis ran {len(self.auto.order)} greedy rounds; N={n} needs more")
        measured = self.measured_ranking()

        def after(g: Greedy) -> float | None:
            return self.baseline_ppl if n == 0 else (g.ppl_after[n - 1] if n <= len(g.ppl_after) else None)

        return Recommendation(
            n=n,
            auto=sorted(self.auto.order[:n]),
            cosine=sorted(self.cosine.order[:n]),
            gatenorm=sorted(self.gate_norm_ranking()[:n]),
            one_shot=sorted(self.ranking()[:n]),
            last_n=list(range(self.num_layers - n, self.num_layers)),
            by_measured=sorted(measured[:n]) if measured is not None else None,
            ppl_after={"auto": after(self.auto), "cosine": after(self.cosine)},
        )

    def to_dict(self, n: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "num_layers": self.num_layers,
            "calib": self.calib,
            "tokens": self.tokens,
            "documents": self.documents,
            "fill": self.fill,
            "score": "1 - cos(residual entering the layer, residual after its attention sublayer); low = redundant",
            "baseline_ppl": self.baseline_ppl,
            "layers": [asdict(s) for s in self.layers],
            "ranking": self.ranking(),
            "gate_norm_ranking": self.gate_norm_ranking(),
            "measured_ranking": self.measured_ranking(),
            "auto": asdict(self.auto) | {"fills": None},
            "cosine": asdict(self.cosine) | {"fills": None},
            "seconds": self.seconds,
        }
        if n is not None:
            out["recommendation"] = asdict(self.recommend(n))
        return out


def open_layerwise(ckpt: Any, calib: Path | None, token_budget: int, model: Any = None) -> tuple[Any, Path, int]:
    """The model over the calibration chunks, ready for quality.select; (LayerwiseModel, text, documents)."""
    from tokenizers import Tokenizer

    from edgekit.checkpoint.load import load_torch_model
    from edgekit.quality.streaming import should_stream

    calib = Path(calib) if calib is not None else default_calib(ckpt)
    tok_file = Path(ckpt.path) / "tokenizer.json"
    if not tok_file.is_file():
        raise EdgekitError(f"{ckpt.path} has no tokenizer.json, which analysis needs to read the calibration text")
    if model is None and should_stream(ckpt):
        raise EdgekitError(
            f"measuring layers runs the fp32 model, and {ckpt.source_id} does not fit in memory in fp32; "
            "rank from the weights alone with --skip gatenorm:N (and --fill zero)"
        )
    tokenizer = Tokenizer.from_file(str(tok_file))
    window = min(ckpt.spec.max_context, MAX_WINDOW)
    chunks, docs = calibration_chunks(lambda s: tokenizer.encode(s).ids, calib, token_budget, window)
    model = model if model is not None else load_torch_model(ckpt)
    return LayerwiseModel(model, chunks), calib, docs


def analyze_checkpoint(
    ckpt: Any,
    calib: Path | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    measure: bool = False,
    model: Any = None,
    rounds: int | None = None,
    fill: str = "mean",
    prefilter: int = DEFAULT_PREFILTER,
) -> Analysis:
    """Score every layer's attention sublayer on `calib` (default: `default_calib`) three ways.

    `rounds` greedy rounds are run for auto:N and cosine:N (default: a quarter of the layers).
    """
    times: dict[str, float] = {}
    t = time.perf_counter()
    lw, calib, docs = open_layerwise(ckpt, calib, token_budget, model)
    intact = lw.trace({}, fill)
    times["load_and_trace"] = time.perf_counter() - t
    rounds = max(1, ckpt.spec.num_layers // 4) if rounds is None else rounds
    gate = gate_norm_scores(ckpt)
    layers = [LayerScore(i, intact.importance[i], float(gate[i])) for i in range(lw.num_layers)]
    t = time.perf_counter()
    cosine = cosine_greedy(lw, rounds, fill, first=intact)
    times["cosine"] = time.perf_counter() - t
    t = time.perf_counter()
    auto = measured_greedy(lw, rounds, fill, prefilter)
    times["auto"] = time.perf_counter() - t
    if measure:
        t = time.perf_counter()
        for i, cost in single_removal_costs(lw, intact).items():
            layers[i].ppl_zero, layers[i].ppl_mean = cost.zero, cost.mean
        times["measure"] = time.perf_counter() - t
    return Analysis(
        model=ckpt.source_id,
        num_layers=ckpt.spec.num_layers,
        calib=calib.name,
        tokens=lw.tokens,
        documents=docs,
        fill=fill,
        layers=layers,
        baseline_ppl=math.exp(intact.nll),
        auto=auto,
        cosine=cosine,
        seconds={k: round(v, 1) for k, v in times.items()},
    )


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
        ax, base = axes[0][1], analysis.baseline_ppl
        width = 0.4
        zero = [100 * ((s.ppl_zero or base) / base - 1) for s in analysis.layers]
        mean = [100 * ((s.ppl_mean or base) / base - 1) for s in analysis.layers]
        ax.bar([x - width / 2 for x in xs], zero, width, color="tab:gray", label="nothing added")
        ax.bar([x + width / 2 for x in xs], mean, width, color="tab:green", label="mean output added")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("perplexity change when removed (%)")
        ax.set_title(f"measured, one at a time (intact: {base:.3f})")
        ax.set_xticks(xs)
        ax.legend(fontsize=8)
    fig.suptitle(f"{analysis.model} on {analysis.calib} ({analysis.tokens} tokens)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
