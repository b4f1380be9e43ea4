"""Perplexity over documents with sliding windows, for any backend that maps tokens to logits.

The same function serves an ONNX bundle and a PyTorch checkpoint, so their numbers are computed the
same way and can be compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

LogitsFn = Callable[[list[int]], np.ndarray]  # token ids → logits [len, vocab] (float32)
DOC_SEPARATOR = "<|endoftext|>"


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int
    documents: int
    ci95: tuple[float, float]  # perplexity interval from the spread of per-document mean NLL

    def to_dict(self) -> dict:
        return {
            "perplexity": self.perplexity,
            "mean_nll": self.mean_nll,
            "tokens": self.tokens,
            "documents": self.documents,
            "ci95": list(self.ci95),
        }


def split_documents(text: str, separator: str | None = DOC_SEPARATOR) -> list[str]:
    parts = text.split(separator) if separator and separator in text else [text]
    return [p.strip() for p in parts if p.strip()]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def token_nlls(logits_fn: LogitsFn, ids: list[int], window: int, stride: int) -> np.ndarray:
    """NLL of every token after the first, each scored exactly once (the Hugging Face recipe).

    Windows of up to `window` tokens start every `stride` tokens; each scores only the tokens no
    earlier window scored, so late tokens keep at least window - stride tokens of context.
    """
    nll: list[np.ndarray] = []
    scored_to = 1  # token 0 has no context and is never scored
    for begin in range(0, max(len(ids) - 1, 0), stride):
        end = min(begin + window, len(ids))
        chunk = ids[begin:end]
        lp = log_softmax(logits_fn(chunk))
        targets = np.asarray(chunk[1:])
        per_token = -lp[np.arange(len(targets)), targets]  # per_token[k] scores position begin + k + 1
        nll.append(per_token[scored_to - begin - 1 :])
        scored_to = end
        if end == len(ids):
            break
    return np.concatenate(nll) if nll else np.zeros(0)


def perplexity(
    logits_fn: LogitsFn,
    documents: Iterable[list[int]],
    window: int,
    stride: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    stride = stride or window // 2
    per_doc: list[np.ndarray] = []
    for ids in documents:
        nll = token_nlls(logits_fn, ids, window, stride)
        if len(nll):
            per_doc.append(nll)
        if progress:
            progress(1)
    if not per_doc:
        raise ValueError("no document has two or more tokens to score")
    all_nll = np.concatenate(per_doc)
    mean = float(all_nll.mean())
    # Tokens within a document are correlated, so the interval comes from the spread between documents.
    doc_means = np.array([d.mean() for d in per_doc])
    weights = np.array([len(d) for d in per_doc], dtype=np.float64)
    if len(per_doc) > 1:
        var = np.average((doc_means - mean) ** 2, weights=weights) / (len(per_doc) - 1)
        half = 1.96 * math.sqrt(var)
    else:
        half = 1.96 * float(all_nll.std(ddof=1)) / math.sqrt(len(all_nll)) if len(all_nll) > 1 else 0.0
    return PerplexityResult(
        math.exp(mean), mean, len(all_nll), len(per_doc), (math.exp(mean - half), math.exp(mean + half))
    )
