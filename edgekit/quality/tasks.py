"""Multiple-choice benchmarks from local JSONL files, scored by log-likelihood as lm-evaluation-harness does.

Each line is one question in the shape of HellaSwag (`ctx` or `ctx_a`/`ctx_b`, `endings`, `label`) or
ARC (`question`, `choices: {text, label}`, `answerKey`), or the plain form (`context`, `choices`,
`label`). The model picks the choice whose continuation has the highest summed log-probability
(`acc`), or the highest log-probability per byte of the continuation (`acc_norm`, which removes the
bias toward short answers).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.quality.perplexity import log_softmax

_CONTEXT_KEYS = ("context", "ctx", "query", "prompt", "question", "premise", "goal")
_CHOICE_KEYS = ("choices", "endings", "options", "answers")
_LABEL_KEYS = ("label", "gold", "answerKey", "answer", "answer_idx", "target")


@dataclass(frozen=True)
class Example:
    context: str
    choices: list[str]  # the answers as written (acc_norm divides by their byte length, as lm-eval)
    continuations: list[str]  # the same with the delimiter that joins them to the context
    gold: int


@dataclass
class TaskResult:
    task: str
    path: str
    examples: int
    acc: float
    acc_stderr: float
    acc_norm: float
    acc_norm_stderr: float
    chance: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _hellaswag_clean(text: str) -> str:
    # lm-evaluation-harness's HellaSwag preprocessing: WikiHow artefacts out, double spaces folded.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _join(context: str, choice: str) -> str:
    """lm-eval's target delimiter: one space between context and answer unless one side has it already."""
    return choice if not context or context[-1].isspace() or choice[:1].isspace() else " " + choice


def parse_example(row: dict[str, Any], where: str) -> Example:
    if not isinstance(row, dict):
        raise EdgekitError(f"{where}: expected a JSON object per line")
    hellaswag = "endings" in row and ("ctx" in row or "ctx_a" in row)
    if hellaswag:
        ctx = row.get("ctx") or (str(row.get("ctx_a", "")) + " " + str(row.get("ctx_b", "")).capitalize())
        context = _hellaswag_clean((f"{row['activity_label']}: " if row.get("activity_label") else "") + ctx)
    else:
        key = next((k for k in _CONTEXT_KEYS if isinstance(row.get(k), str)), None)
        if key is None:
            raise EdgekitError(f"{where}: no context field (one of {', '.join(_CONTEXT_KEYS)})")
        # ARC-shaped rows carry a bare question; lm-eval frames it as a Q/A prompt.
        context = f"Question: {row[key]}\nAnswer:" if key == "question" else row[key]
    ckey = next((k for k in _CHOICE_KEYS if k in row), None)
    if ckey is None:
        raise EdgekitError(f"{where}: no choices field (one of {', '.join(_CHOICE_KEYS)})")
    raw = row[ckey]
    letters: list[str] = []
    if isinstance(raw, dict):  # ARC: {"text": [...], "label": ["A", "B", ...]}
        letters = [str(x) for x in raw.get("label", [])]
        raw = raw.get("text")
    if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(c, str) for c in raw):
        raise EdgekitError(f"{where}: '{ckey}' must hold two or more strings")
    choices = [_hellaswag_clean(c) if hellaswag else c for c in raw]
    lkey = next((k for k in _LABEL_KEYS if k in row), None)
    if lkey is None:
        raise EdgekitError(f"{where}: no label field (one of {', '.join(_LABEL_KEYS)})")
    gold = _gold(row[lkey], letters, len(choices), where)
    return Example(context, choices, [_join(context, c) for c in choices], gold)


def _gold(label: Any, letters: list[str], n: int, where: str) -> int:
    if isinstance(label, bool):
        label = None
    elif isinstance(label, str) and label.strip() in letters:
        label = letters.index(label.strip())
    elif isinstance(label, str) and label.strip().isdigit():
        label = int(label.strip())
    elif isinstance(label, str) and len(label.strip()) == 1 and label.strip().isalpha():
        label = ord(label.strip().upper()) - ord("A")
    if not isinstance(label, int) or not 0 <= label < n:
        raise EdgekitError(f"{where}: label {label!r} does not name one of the {n} choices")
    return label


def load_task(path: Path, limit: int | None = None) -> list[Example]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EdgekitError(f"cannot read task file {path}: {e}") from e
    examples = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgekitError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        examples.append(parse_example(row, f"{path}:{n}"))
        if limit and len(examples) >= limit:
            break
    if not examples:
        raise EdgekitError(f"task file {path} holds no examples")
    return examples


def split_tokens(scorer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as lm-eval forms them: encode the whole, cut at the context's length
    (so a word split across the boundary tokenizes as it would in running text)."""
    n_space = len(context) - len(context.rstrip())
    if n_space:  # trailing spaces belong to the continuation, where SentencePiece expects them
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = scorer.encode(context + continuation)
    ctx = scorer.encode(context)
    if whole[: len(ctx)] != ctx or len(whole) == len(ctx):
        return ctx, scorer.encode(continuation, add_special_tokens=False)
    return ctx, whole[len(ctx) :]


def loglikelihood(scorer: Any, context: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation | context) and whether greedy decoding would produce exactly it."""
    ctx, cont = split_tokens(scorer, context, continuation)
    if not ctx:  # a tokenizer without BOS and an empty context: condition on BOS/EOS as lm-eval does
        prefix = scorer.bos_token_id if scorer.bos_token_id is not None else (scorer.eos_token_ids or (None,))[0]
        if prefix is None:
            raise EdgekitError("an empty context needs a BOS or EOS token to condition on; this model has neither")
        ctx = [prefix]
    if not cont:
        raise EdgekitError(f"continuation {continuation!r} has no tokens to score")
    ids = (ctx + cont)[-(scorer.max_context + 1) :]  # keep the continuation, drop the oldest context
    lp = log_softmax(scorer.logits(ids[:-1])[-len(cont) :])
    target = np.asarray(cont[-len(lp) :])
    total = float(lp[np.arange(len(target)), target].sum())
    return total, bool((lp.argmax(-1) == target).all())


def _stderr(hits: list[bool]) -> float:
    n = len(hits)
    p = sum(hits) / n
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0


def score_task(
    scorer: Any, path: Path, limit: int | None = None, progress: Callable[[int], None] | None = None
) -> TaskResult:
    examples = load_task(path, limit)
    acc: list[bool] = []
    acc_norm: list[bool] = []
    for ex in examples:
        lls = np.array([loglikelihood(scorer, ex.context, c)[0] for c in ex.continuations])
        lengths = np.array([max(len(c.encode("utf-8")), 1) for c in ex.choices])
        acc.append(int(lls.argmax()) == ex.gold)
        acc_norm.append(int((lls / lengths).argmax()) == ex.gold)
        if progress:
            progress(1)
    return TaskResult(
        task=path.stem,
        path=str(path),
        examples=len(examples),
        acc=sum(acc) / len(acc),
        acc_stderr=_stderr(acc),
        acc_norm=sum(acc_norm) / len(acc_norm),
        acc_norm_stderr=_stderr(acc_norm),
        chance=float(np.mean([1 / len(ex.choices) for ex in examples])),
    )
