"""Check an exported graph against its PyTorch twin: logits through prefill and cached decode steps,
greedy tokens, and (for quantized exports) perplexity next to the fp32 figure."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit import CALIB_TEXT
from edgekit.errors import EdgekitError
from edgekit.quality.perplexity import perplexity, split_documents
from edgekit.runtime.session import DecoderSession

VERIFY_PROMPT = "Once upon a time, there was a little"
DEFAULT_TEXT = CALIB_TEXT
# fp32 graphs must match PyTorch to float rounding: |Δlogit| ≤ 1e-3 × the largest |logit| (and ≥ 1e-4).
FP32_REL_TOL = 1e-3


@dataclass
class VerifyReport:
    prompt_tokens: int
    decode_steps: int
    max_abs_logit_diff: float
    max_abs_logit: float
    top1_agreement: float
    greedy_tokens_onnx: list[int]
    greedy_tokens_torch: list[int]
    greedy_match: bool
    ppl_text: str | None = None
    ppl_onnx: float | None = None
    ppl_torch_fp32: float | None = None
    ppl_tokens: int | None = None
    # With attention removed: the unskipped fp32 model on the same tokens, what the skip set costs in all
    ppl_unskipped_fp32: float | None = None
    passed: bool = True
    tolerance: float | None = None
    # "full": the whole fp32 PyTorch model; "streaming": layer by layer from disk (verify_streaming.py)
    method: str = "full"

    def to_dict(self) -> dict:
        return asdict(self)


def _torch_greedy(model: Any, ids: list[int], steps: int) -> list[int]:
    from edgekit.skip.surgery import full_logits

    out = list(ids)
    for _ in range(steps):
        out.append(int(full_logits(model, out)[-1].argmax()))
    return out[len(ids) :]


def _onnx_greedy(session: DecoderSession, ids: list[int], steps: int) -> list[int]:
    logits, cache = session.forward(np.asarray([ids]))
    out = []
    for _ in range(steps):
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        logits, cache = session.forward(np.asarray([[tok]]), cache)
    return out


def verify(
    model_path: Path,
    torch_model: Any,
    encode: Any,
    quant_mode: str,
    text_path: Path | None = DEFAULT_TEXT,
    decode_steps: int = 8,
    greedy_steps: int = 16,
    ppl_token_budget: int = 2048,
    context: int = 512,
    score_ppl: bool | None = None,
) -> VerifyReport:
    """`score_ppl`: also perplexity of the graph and the reference [default: for quantized graphs]."""
    from edgekit.skip.surgery import full_logits

    session = DecoderSession(model_path)
    prompt = encode(VERIFY_PROMPT)
    greedy_torch = _torch_greedy(torch_model, prompt, max(decode_steps, greedy_steps))
    sequence = prompt + greedy_torch[:decode_steps]
    ref = full_logits(torch_model, sequence).numpy()

    # Prefill the prompt, then feed the continuation one token at a time through the KV cache.
    logits, cache = session.forward(np.asarray([prompt]))
    got = [logits[0]]
    for tok in sequence[len(prompt) :]:
        logits, cache = session.forward(np.asarray([[tok]]), cache)
        got.append(logits[0])
    onnx_logits = np.concatenate(got)

    diff = float(np.abs(onnx_logits - ref).max())
    scale = float(np.abs(ref).max())
    greedy_onnx = _onnx_greedy(session, prompt, greedy_steps)
    report = VerifyReport(
        prompt_tokens=len(prompt),
        decode_steps=decode_steps,
        max_abs_logit_diff=diff,
        max_abs_logit=scale,
        top1_agreement=float((onnx_logits.argmax(-1) == ref.argmax(-1)).mean()),
        greedy_tokens_onnx=greedy_onnx,
        greedy_tokens_torch=greedy_torch[:greedy_steps],
        greedy_match=greedy_onnx == greedy_torch[:greedy_steps],
    )
    if quant_mode == "fp32":
        report.tolerance = max(FP32_REL_TOL * scale, 1e-4)
        report.passed = diff <= report.tolerance and report.top1_agreement == 1.0
    if text_path is not None and (quant_mode != "fp32" if score_ppl is None else score_ppl):
        docs = _budgeted_docs(encode, text_path, ppl_token_budget)
        ppl_onnx = perplexity(session.logits, docs, window=context)
        ppl_torch = perplexity(lambda ids: full_logits(torch_model, ids).numpy(), docs, window=context)
        report.ppl_text = str(text_path.name)
        report.ppl_onnx, report.ppl_torch_fp32, report.ppl_tokens = (
            ppl_onnx.perplexity,
            ppl_torch.perplexity,
            ppl_onnx.tokens,
        )
    return report


def unskipped_perplexity(
    model: Any, encode: Any, text_path: Path, ppl_token_budget: int = 2048, context: int = 512
) -> float:
    """The unskipped fp32 model's perplexity on the tokens `verify` scored: the guard rail a skip set is
    judged by (a bundle can match its own skipped PyTorch twin perfectly and still be a wrecked model)."""
    from edgekit.skip.surgery import full_logits

    docs = _budgeted_docs(encode, text_path, ppl_token_budget)
    return perplexity(lambda ids: full_logits(model, ids).numpy(), docs, window=context).perplexity


def _budgeted_docs(encode: Any, text_path: Path, budget: int) -> list[list[int]]:
    try:
        text = text_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgekitError(f"cannot read text {text_path}: {e}") from e
    docs, used = [], 0
    for doc in split_documents(text):
        ids = encode(doc)
        docs.append(ids)
        used += len(ids)
        if used >= budget:
            break
    if not docs:
        raise EdgekitError(f"text {text_path} is empty")
    return docs
