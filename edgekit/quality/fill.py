"""Measure what a removed attention sublayer is replaced by: its mean output over calibration text.

One forward pass of the intact fp32 model over the calibration tokens, a hook on each chosen layer's
attention module summing its output; the mean per hidden channel becomes the constant the skipped layer
adds to the residual stream (skip.Fill). Measured on the intact model, as the compensation papers do
(arXiv 2507.18212, 2505.24680): each layer's stand-in is what that layer contributed on average.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.checkpoint.load import load_torch_model
from edgekit.errors import EdgekitError
from edgekit.quality.analyze import MAX_WINDOW, calibration_chunks, default_calib
from edgekit.quality.scorers import load_tokenizer
from edgekit.quality.streaming import should_stream
from edgekit.skip.skipset import FILLS, Fill, SkipSet

DEFAULT_FILL_TOKENS = 4096


def mean_outputs(model: Any, layers: list[int], chunks: list[list[int]]) -> dict[int, np.ndarray]:
    """Each layer's attention output averaged over every token of `chunks` (float64 sums)."""
    import torch

    sums = {i: torch.zeros(model.config.hidden_size, dtype=torch.float64) for i in layers}
    count = 0

    def hook(i: int) -> Any:
        def add(module: Any, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            sums[i] += out.detach().double().sum(dim=(0, 1))

        return add

    handles = [model.model.layers[i].self_attn.register_forward_hook(hook(i)) for i in layers]
    try:
        with torch.no_grad():
            for ids in chunks:
                model(input_ids=torch.as_tensor([ids]), use_cache=False)
                count += len(ids)
    finally:
        for h in handles:
            h.remove()
    return {i: (s / count).float().numpy() for i, s in sums.items()}


def with_fill(
    ckpt: Any, skip: SkipSet, kind: str, calib: Path | None = None, tokens: int = DEFAULT_FILL_TOKENS
) -> SkipSet:
    """`skip` with its fill measured (kind "mean"), or unchanged (kind "zero")."""
    if kind not in FILLS:
        raise EdgekitError(f"--fill {kind}: choose one of {', '.join(FILLS)}")
    if kind == "zero" or not skip.skipped:
        return skip
    if should_stream(ckpt):
        raise EdgekitError(
            f"--fill mean measures on the fp32 model, and {ckpt.source_id} does not fit in memory in fp32; "
            "use --fill zero"
        )
    text = calib or default_calib(ckpt)
    tokenizer = load_tokenizer(ckpt.path)
    chunks, _ = calibration_chunks(
        lambda s: tokenizer.encode(s).ids, text, tokens, min(MAX_WINDOW, ckpt.spec.max_context)
    )
    vectors = mean_outputs(load_torch_model(ckpt), list(skip.skipped), chunks)
    fill = Fill("mean", vectors, Path(text).name, sum(len(c) for c in chunks))
    return replace(skip, fill=fill)
