"""A checkpoint's skip set from what the user typed, its fill measured: what export, eval and sweep call.

`--skip RULE:N` ranks on the model (quality.select); the ranking is cached under
`$EDGEKIT_CACHE/skip-rankings/`, keyed by the weight files, the calibration text and every setting that
changes the answer, because a measured auto:8 on SmolLM2 takes about two minutes on two cores and users
export the same model several times (int8, int4, a mobile target).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgekit.checkpoint.fetch import cache_dir
from edgekit.errors import EdgekitError
from edgekit.quality.analyze import DEFAULT_TOKEN_BUDGET, default_calib, open_layerwise
from edgekit.quality.fill import resolve_fill, with_fill
from edgekit.quality.select import DEFAULT_PREFILTER, Greedy, cosine_greedy, gate_norm_scores, measured_greedy
from edgekit.skip.skipset import SkipSet, choose_skip

RANKING_VERSION = 1  # bump when a ranking's algorithm changes, so cached orders are not reused


def _cache_key(ckpt: Any, rule: str, fill: str, calib: Path, tokens: int, prefilter: int) -> str:
    """N is not part of the key: a greedy order for N removals starts with the order for fewer."""
    h = hashlib.sha256()
    for f in ckpt.weight_files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(hashlib.sha256(Path(calib).read_bytes()).digest())
    h.update(json.dumps([RANKING_VERSION, rule, fill, tokens, prefilter, ckpt.config_sha256]).encode())
    return h.hexdigest()[:32]


def rank(
    ckpt: Any,
    rule: str,
    n: int,
    fill: str,
    calib: Path | None = None,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    prefilter: int = DEFAULT_PREFILTER,
) -> dict[str, Any]:
    """The greedy order of `rule` ("auto", "cosine", "gatenorm") for N removals, and what it measured."""
    if rule == "gatenorm":  # data-free: no calibration text, milliseconds
        scores = gate_norm_scores(ckpt)
        order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))[:n]
        return {
            "method": "gate-norm (query-key coupling from the weights, arXiv 2512.20636)",
            "order": order,
            "scores": {str(i): round(float(s), 6) for i, s in enumerate(scores)},
        }
    calib = Path(calib) if calib is not None else default_calib(ckpt)
    path = cache_dir() / "skip-rankings" / f"{_cache_key(ckpt, rule, fill, calib, token_budget, prefilter)}.json"
    start = None
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if len(cached["order"]) >= n:
            return cached | {k: cached[k][:n] for k in ("order", "rounds", "ppl_after")}
        start = Greedy(cached["order"], cached["rounds"], cached["ppl_after"])  # continue it, don't redo it
    except (OSError, ValueError, KeyError, TypeError):
        pass
    lw, calib, _ = open_layerwise(ckpt, calib, token_budget)
    if rule == "auto":
        greedy = measured_greedy(lw, n, fill, prefilter, start=start)
        method = (
            f"measured greedy: KL from the intact model's next-token distributions with each candidate removed "
            f"(fill {fill}), the {prefilter} lowest 1-cos tried per round, successive halving over the tokens"
        )
    else:
        greedy = cosine_greedy(lw, n, fill, start=start)
        method = "1-cos(in, after attention) (arXiv 2406.15786), greedy: re-scored after each removal"
    record = {
        "method": method,
        "calib": calib.name,
        "tokens": lw.tokens,
        "fill": fill,
        "order": greedy.order,
        "rounds": greedy.rounds,
        "ppl_after": [round(p, 4) for p in greedy.ppl_after],
    }
    try:  # the cache is an optimisation: a read-only home must not fail the export
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass
    return record


def auto_skip(
    ckpt: Any, rule: str, n: int, fill: str, calib: Path | None = None, token_budget: int = DEFAULT_TOKEN_BUDGET
) -> SkipSet:
    """The N layers `rule` removes first, with the ranking attached for the manifest."""
    layers = ckpt.spec.num_layers
    if not 0 <= n < layers:
        raise EdgekitError(f"--skip {rule}:{n}: the model has {layers} layers; N must be between 0 and {layers - 1}")
    if n == 0:
        return SkipSet.none(layers)
    record = rank(ckpt, rule, n, fill, calib, token_budget)
    chosen = SkipSet.explicit(record["order"], layers, rule=f"{rule}:{n}")
    return replace(chosen, ranking=record)


def select_skip(
    ckpt: Any,
    skip: int | str | None,
    skip_layers: str | None,
    calib: Path | None = None,
    fill: str | None = None,
) -> SkipSet:
    """A checkpoint's skip set from --skip/--skip-layers, with its fill (None: resolve_fill's default)."""
    kind = resolve_fill(ckpt, fill)
    chosen = choose_skip(
        ckpt.spec.num_layers, skip, skip_layers, rank=lambda rule, n: auto_skip(ckpt, rule, n, kind, calib)
    )
    return with_fill(ckpt, chosen, kind, calib)


def suggest(ckpt: Any, n: int, fill: str, calib: Path | None = None) -> tuple[list[int], float, float]:
    """A cheap alternative to the last N (the cosine greedy, one forward per round) for the export's warning.

    Returns (layers, calibration perplexity with them removed, the intact model's on the same tokens).
    """
    lw, _, _ = open_layerwise(ckpt, calib, DEFAULT_TOKEN_BUDGET)
    intact = lw.trace({}, fill)
    greedy = cosine_greedy(lw, n, fill, first=intact)
    return sorted(greedy.order), greedy.ppl_after[-1], math.exp(intact.nll)
