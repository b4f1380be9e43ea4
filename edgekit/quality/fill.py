"""Measure what a removed attention sublayer is replaced by: its mean output over calibration text.

The mean is measured in the model as it will be exported: layer by layer over all calibration chunks
(quality.layerwise), each removed layer's attention computed on the residual stream that already lacks
the earlier removed layers (and carries their fills), averaged per hidden channel. That constant becomes
what the skipped layer adds to the residual stream (skip.Fill), folded into the next norm's bias. The
compensation papers (arXiv 2507.18212, 2505.24680) take the same kind of statistic; measuring it in the
skipped model rather than the intact one keeps each fill consistent with what its layer will receive.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.quality.analyze import DEFAULT_TOKEN_BUDGET, open_layerwise
from edgekit.quality.streaming import should_stream
from edgekit.skip.skipset import FILLS, Fill, SkipSet

DEFAULT_FILL = "mean"  # measured on SmolLM2 and stories260K: BENCHMARKS.md, "Skipping attention"


def resolve_fill(ckpt: Any, kind: str | None) -> str:
    """The fill to use: the user's, else "mean" where the fp32 model fits in memory, else "zero"."""
    if kind is None:
        return "zero" if should_stream(ckpt) else DEFAULT_FILL
    if kind not in FILLS:
        raise EdgekitError(f"--fill {kind}: choose one of {', '.join(FILLS)}")
    return kind


def with_fill(
    ckpt: Any,
    skip: SkipSet,
    kind: str,
    calib: Path | None = None,
    tokens: int = DEFAULT_TOKEN_BUDGET,
    model: Any = None,
) -> SkipSet:
    """`skip` with its fill measured (kind "mean"), or unchanged (kind "zero")."""
    kind = resolve_fill(ckpt, kind)
    if kind == "zero" or not skip.skipped:
        return skip
    if model is None and should_stream(ckpt):
        raise EdgekitError(
            f"--fill mean measures on the fp32 model, and {ckpt.source_id} does not fit in memory in fp32; "
            "use --fill zero"
        )
    lw, text, _ = open_layerwise(ckpt, calib, tokens, model)
    fills = lw.trace(set(skip.skipped), "mean").fills
    return replace(skip, fill=Fill("mean", fills, Path(text).name, lw.tokens))
