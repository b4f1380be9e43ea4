"""Perplexity over documents with sliding windows, for any backend that maps tokens to logits.

The same function serves an ONNX bundle and a PyTorch checkpoint, so their numbers are computed the
same way and can be compared. `scored_windows` is the one place that decides which token is scored
with which context; perplexity and agreement with a reference both walk it.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable, Iterable, Iterator
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


def parse_separator(text: str | None) -> str | None:
    """What the user typed for --separator: backslash escapes (`\\n`, `\\n\\n`) read as in Python;
    'none' or '' means the whole text is one document."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    return codecs.decode(text, "unicode_escape") if "\\" in text else text


def split_documents(text: str, separator: str | None = DOC_SEPARATOR) -> list[str]:
    parts = text.split(separator) if separator and separator in text else [text]
    return [p.strip() for p in parts if p.strip()]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def windows(n_tokens: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, skip) for each window: tokens begin..end-1 go in, and the predictions for
    positions begin+1+skip .. end-1 are the ones this window scores (each token exactly once).

    Windows of up to `window` tokens start every `stride` tokens, so late tokens keep at least
    window - stride tokens of context (the Hugging Face recipe). Token 0 has no context and is never scored.
    """
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    stride = max(1, min(stride, window - 1))
    scored_to = 1
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + window, n_tokens)
        yield begin, end, scored_to - begin - 1
        scored_to = end
        if end == n_tokens:
            break


def scored_windows(
    logits_fn: LogitsFn, ids: list[int], window: int, stride: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per window: log-probabilities [n, vocab] (float64) and the target ids [n] of the tokens it scores."""
    for begin, end, skip in windows(len(ids), window, stride):
        chunk = ids[begin:end]
        lp = log_softmax(logits_fn(chunk)[:-1])  # row k predicts chunk[k + 1]
        yield lp[skip:], np.asarray(chunk[1 + skip :])


def token_nlls(logits_fn: LogitsFn, ids: list[int], window: int, stride: int) -> np.ndarray:
    """NLL of every token after the first, each scored exactly once."""
    nll = [-lp[np.arange(len(t)), t] for lp, t in scored_windows(logits_fn, ids, window, stride)]
    return np.concatenate(nll) if nll else np.zeros(0)


def summarize(per_doc: list[np.ndarray]) -> PerplexityResult:
    """Token-weighted perplexity of per-document NLL arrays, with a 95% interval."""
    per_doc = [d for d in per_doc if len(d)]
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


def perplexity(
    logits_fn: LogitsFn,
    documents: Iterable[list[int]],
    window: int,
    stride: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> PerplexityResult:
    stride = stride or max(1, window // 2)
    per_doc: list[np.ndarray] = []
    for ids in documents:
        per_doc.append(token_nlls(logits_fn, ids, window, stride))
        if progress:
            progress(1)
    return summarize(per_doc)
