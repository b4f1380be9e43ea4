"""Evaluate a checkpoint whose fp32 PyTorch copy does not fit in memory (Llama-2-7B is 27 GB).

The reference is `skip.streaming.StreamingModel`: one layer's weights in memory at a time, so each
forward reads the whole checkpoint. An evaluation is therefore run twice: a dry run records every
window it asks for (answering zeros), the windows go through the model in a few large batches, and
the real run reads their logits from that table. Every metric works unchanged; generation does not
(each token would need its own pass over the weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.quality.scorers import TorchScorer

T = TypeVar("T")
BATCH_TOKENS = 8192  # tokens per pass over the weights: bounds the activations a pass holds
AUTO_FRACTION = 0.8  # stream when the fp32 weights need more than this share of available memory


def fp32_bytes(ckpt: Any) -> int:
    return 4 * sum(int(np.prod(ckpt.weights.shape(n))) for n in ckpt.weights.names())


def should_stream(ckpt: Any) -> bool:
    import psutil

    return fp32_bytes(ckpt) > AUTO_FRACTION * psutil.virtual_memory().available


class StreamingScorer(TorchScorer):
    _table: dict[tuple[int, ...], np.ndarray] | None = None
    _asked: list[tuple[int, ...]] | None = None

    def logits(self, ids: list[int]) -> np.ndarray:
        key = tuple(ids)
        if self._asked is not None:
            self._asked.append(key)
            return np.zeros((len(ids), self.vocab), np.float32)
        if self._table is None or key not in self._table:
            raise EdgekitError("internal error: a streamed checkpoint was asked for a window outside its prefetch")
        return self._table[key]

    def run(self, measure: Callable[[], T]) -> T:
        """measure() twice: once to learn its windows, once with their logits computed in batches."""
        self._asked = []
        try:
            measure()
            windows = list(dict.fromkeys(self._asked))
        finally:
            self._asked = None
        self._table = {}
        batch: list[tuple[int, ...]] = []
        for w in sorted(windows, key=len):  # similar lengths together: little padding
            if batch and sum(map(len, batch)) + len(w) > BATCH_TOKENS:
                self._table.update(zip(batch, self.model.logits(batch), strict=True))
                batch = []
            batch.append(w)
        if batch:
            self._table.update(zip(batch, self.model.logits(batch), strict=True))
        try:
            return measure()
        finally:
            self._table = None

    def generate(self, ids: list[int], max_new_tokens: int, stop: list[str] | None = None) -> list[int]:
        raise EdgekitError(
            f"{self.name} does not fit in memory in fp32, and generating from it would read every weight once "
            "per token; export it and evaluate the bundle"
        )


def run_streamed(scorers: list[Any], measure: Callable[[], T]) -> T:
    """Run measure() through every streamed scorer's two passes (plain scorers just compute)."""
    for s in scorers:
        if isinstance(s, StreamingScorer):
            inner = measure
            measure = lambda s=s, inner=inner: s.run(inner)  # noqa: E731 - binds the loop variables
    return measure()
