"""`eval`: what skipping and quantization cost in quality. Perplexity on a text, agreement with a
reference model (top-1 and KL of next-token distributions), and multiple-choice accuracy, for a
bundle or a checkpoint with a skip set (see `models.py` and `scorers.py`). This module only sequences the metrics.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.quality.models import open_scorer
from edgekit.quality.perplexity import DOC_SEPARATOR, PerplexityResult, scored_windows, split_documents, summarize
from edgekit.quality.scorers import Scorer
from edgekit.quality.streaming import run_streamed
from edgekit.quality.tasks import TaskResult, score_task


@dataclass
class EvalRequest:
    target: str  # bundle folder or MODEL
    skip: int | str | None = None
    skip_layers: str | None = None
    calib: Path | None = None  # auto:N ranking and --fill text [default: quality.analyze.default_calib]
    fill: str | None = None  # checkpoints: what replaces a removed sublayer [default: quality.fill.resolve_fill]
    text: Path | None = None
    separator: str | None = DOC_SEPARATOR
    window: int | None = None  # default: min(model context, 1024)
    stride: int | None = None  # default: window // 2
    reference: str | None = None
    tasks: list[Path] = field(default_factory=list)
    limit: int | None = None  # documents of the text, examples per task
    max_tokens: int | None = None  # tokens of the text, over all documents
    check_integrity: bool = True
    threads: int | None = None  # intra-op threads for onnxruntime and torch [default: theirs]
    streaming: bool | None = None  # checkpoints one layer at a time; None: when fp32 does not fit in memory
    allow_download: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    progress: bool = False


@dataclass
class TextStats:
    path: str
    documents: int
    tokens: int
    window: int
    stride: int
    separator: str | None


@dataclass
class Agreement:
    reference: str
    positions: int
    top1_agreement: float
    mean_kl: float  # KL(reference ‖ model) in nats, averaged over scored positions
    max_kl: float
    reference_perplexity: float


@dataclass
class EvalResult:
    model: dict[str, Any]
    text: TextStats | None = None
    perplexity: PerplexityResult | None = None
    agreement: Agreement | None = None
    reference_model: dict[str, Any] | None = None
    tasks: list[TaskResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "text": asdict(self.text) if self.text else None,
            "perplexity": self.perplexity.to_dict() if self.perplexity else None,
            "agreement": asdict(self.agreement) if self.agreement else None,
            "reference_model": self.reference_model,
            "tasks": [t.to_dict() for t in self.tasks],
        }


def read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise EdgekitError(f"text {path} does not exist") from e
    except (OSError, UnicodeDecodeError) as e:
        raise EdgekitError(f"cannot read text {path}: {e}") from e
    if not text.strip():
        raise EdgekitError(f"text {path} is empty")
    return text


def load_documents(
    scorer: Scorer, text: str, separator: str | None, limit: int | None = None, max_tokens: int | None = None
) -> list[list[int]]:
    """Documents as token ids (each with the tokenizer's BOS), cut to `limit` documents and `max_tokens`."""
    docs: list[list[int]] = []
    used = 0
    for part in split_documents(text, separator):
        ids = scorer.encode(part)
        if max_tokens is not None and used + len(ids) > max_tokens:
            ids = ids[: max_tokens - used]
        if len(ids) >= 2:
            docs.append(ids)
            used += len(ids)
        if (limit and len(docs) >= limit) or (max_tokens is not None and used >= max_tokens):
            break
    return docs


def _check_scorable(docs: list[list[int]], path: Path | str) -> None:
    if not docs:
        raise EdgekitError(f"text {path} has no scorable tokens (every document is shorter than two tokens)")


def eval_perplexity(
    scorer: Scorer, docs: list[list[int]], window: int, stride: int, progress: bool = False
) -> PerplexityResult:
    per_doc = []
    with _bar(len(docs), "perplexity", progress) as bar:
        for ids in docs:
            nll = [-lp[np.arange(len(t)), t] for lp, t in scored_windows(scorer.logits, ids, window, stride)]
            per_doc.append(np.concatenate(nll) if nll else np.zeros(0))
            bar.update(1)
    return summarize(per_doc)


def eval_agreement(
    scorer: Scorer, reference: Scorer, docs: list[list[int]], window: int, stride: int, progress: bool = False
) -> tuple[PerplexityResult, Agreement]:
    """Both models on the same windows: the model's perplexity, and how far its next-token
    distributions are from the reference's (top-1 match, KL(reference ‖ model))."""
    if reference.vocab != scorer.vocab:
        raise EdgekitError(f"reference {reference.name} has a vocabulary of {reference.vocab}, not {scorer.vocab}")
    per_doc, ref_doc, kl_all, hit_all = [], [], [], []
    with _bar(len(docs), "agreement", progress) as bar:
        for ids in docs:
            nll, ref_nll = [], []
            pairs = zip(
                scored_windows(scorer.logits, ids, window, stride),
                scored_windows(reference.logits, ids, window, stride),
                strict=True,
            )
            for (lp, t), (lr, _) in pairs:
                rows = np.arange(len(t))
                nll.append(-lp[rows, t])
                ref_nll.append(-lr[rows, t])
                kl_all.append((np.exp(lr) * (lr - lp)).sum(-1))
                hit_all.append(lp.argmax(-1) == lr.argmax(-1))
            per_doc.append(np.concatenate(nll))
            ref_doc.append(np.concatenate(ref_nll))
            bar.update(1)
    kl = np.maximum(np.concatenate(kl_all), 0.0)  # rounding can leave -1e-17 where the two agree
    agreement = Agreement(
        reference=reference.name,
        positions=len(kl),
        top1_agreement=float(np.concatenate(hit_all).mean()),
        mean_kl=float(kl.mean()),
        max_kl=float(kl.max()),
        reference_perplexity=summarize(ref_doc).perplexity,
    )
    return summarize(per_doc), agreement


def _check_tokenizers(scorer: Scorer, reference: Scorer, text: str) -> None:
    sample = text[:2000]
    if scorer.encode(sample) != reference.encode(sample):
        raise EdgekitError(f"reference {reference.name} tokenizes the text differently; it must share the tokenizer")


def evaluate(req: EvalRequest) -> EvalResult:
    if req.reference and req.text is None:
        raise EdgekitError("--reference compares next-token distributions on a text: give --text too")
    if req.text is None and not req.tasks:
        raise EdgekitError("nothing to evaluate: give --text FILE and/or --tasks FILE.jsonl")
    for p in req.tasks:
        if not p.is_file():
            raise EdgekitError(f"task file {p} does not exist")
    text = read_text(req.text) if req.text is not None else None
    opts = {
        "check_integrity": req.check_integrity,
        "allow_download": req.allow_download,
        "trust_remote_code": req.trust_remote_code,
        "allow_pickle": req.allow_pickle,
        "threads": req.threads,
        "streaming": req.streaming,
        "calib": req.calib,
    }
    scorer = open_scorer(req.target, req.skip, req.skip_layers, fill=req.fill, **opts)
    result = EvalResult(model=scorer.describe())
    if text is not None and req.text is not None:
        window = req.window or min(scorer.max_context, 1024)
        if not 2 <= window <= scorer.max_context:
            raise EdgekitError(f"--window {window}: must be between 2 and the model's context {scorer.max_context}")
        stride = req.stride or max(1, window // 2)
        if not 1 <= stride <= window:
            raise EdgekitError(f"--stride {stride}: must be between 1 and the window ({window})")
        docs = load_documents(scorer, text, req.separator, req.limit, req.max_tokens)
        _check_scorable(docs, req.text)
        result.text = TextStats(str(req.text), len(docs), sum(map(len, docs)), window, stride, req.separator)
        if req.reference:
            reference = open_scorer(req.reference, **opts)
            _check_tokenizers(scorer, reference, text)
            result.reference_model = reference.describe()
            result.perplexity, result.agreement = run_streamed(
                [scorer, reference], lambda: eval_agreement(scorer, reference, docs, window, stride, req.progress)
            )
        else:
            result.perplexity = run_streamed(
                [scorer], lambda: eval_perplexity(scorer, docs, window, stride, req.progress)
            )
    for path in req.tasks:
        n = req.limit or sum(1 for line in path.open(encoding="utf-8", errors="replace") if line.strip())
        with _bar(n, path.stem, req.progress, unit="question") as bar:
            result.tasks.append(run_streamed([scorer], lambda: score_task(scorer, path, req.limit, bar.update)))  # noqa: B023
    return result


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None: ...

    def update(self, n: int) -> None: ...


def _bar(total: int, desc: str, enabled: bool, unit: str = "doc") -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
