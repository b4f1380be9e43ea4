"""Verification for models whose fp32 PyTorch copy does not fit in memory (a 7B model is 27 GB).

The reference is still transformers' own model, so it computes exactly what the full-model check
computes, but it is built on the `meta` device and each module (embedding, each decoder layer, final
norm, lm_head) gets its weights from the memory-mapped safetensors just before its forward and drops
them right after: one layer's fp32 weights are in memory at a time.

Each forward therefore streams the whole checkpoint from disk, so the check is arranged to need one:
the ONNX graph runs first (prefill, cached decode steps, greedy tokens, perplexity windows) and is
released, then every sequence the comparison needs goes through the reference in a single batched
forward. Greedy agreement is checked teacher-forced: PyTorch's argmax after each prefix of the ONNX
greedy continuation. The two greedy sequences are equal exactly when all those argmaxes match, so
`greedy_match` means the same as in the full check; only after a first mismatch do the listed
PyTorch tokens differ from a free-running PyTorch generation.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.checkpoint.load import Checkpoint
from edgekit.export.verify import DEFAULT_TEXT, FP32_REL_TOL, VERIFY_PROMPT, VerifyReport, _budgeted_docs
from edgekit.quality.perplexity import perplexity
from edgekit.runtime.session import DecoderSession
from edgekit.skip.skipset import SkipSet
from edgekit.skip.streaming import StreamingModel

STREAMING_PPL_TOKENS = 256  # each reference forward reads the whole checkpoint; keep its batch small


def verify_streaming(
    model_path: Path,
    ckpt: Checkpoint,
    skip: SkipSet,
    encode: Any,
    quant_mode: str,
    text_path: Path | None = DEFAULT_TEXT,
    decode_steps: int = 8,
    greedy_steps: int = 16,
    ppl_token_budget: int = STREAMING_PPL_TOKENS,
    context: int = 512,
    session_options: Any = None,
) -> VerifyReport:
    """The same checks as `verify.verify`, against a reference that never holds the whole model."""
    prompt = encode(VERIFY_PROMPT)
    steps = max(decode_steps, greedy_steps)

    # 1. The ONNX graph: prefill, then its own greedy tokens fed back through the KV cache.
    session = DecoderSession(model_path, options=session_options)
    logits, cache = session.forward(np.asarray([prompt]))
    rows, greedy_onnx = [logits[0]], []
    for _ in range(steps):
        tok = int(rows[-1][-1].argmax())
        greedy_onnx.append(tok)
        logits, cache = session.forward(np.asarray([[tok]]), cache)
        rows.append(logits[0])
    onnx_logits = np.concatenate(rows)[: len(prompt) + decode_steps]
    docs: list[list[int]] = []
    ppl_onnx = None
    if text_path is not None and quant_mode != "fp32":
        docs = _budgeted_docs(encode, text_path, ppl_token_budget)
        docs = _trim(docs, ppl_token_budget)
        ppl_onnx = perplexity(session.logits, docs, window=context)
    del session, cache, logits, rows
    gc.collect()

    # 2. Every window the reference must score, found by a dry run of the same perplexity code.
    windows: list[tuple[int, ...]] = []
    if docs:
        perplexity(lambda ids: _record(windows, ids, ckpt.spec.vocab), docs, window=context)
    sequence = prompt + greedy_onnx
    model = StreamingModel(ckpt, skip)
    ref_all = model.logits([sequence, *windows])
    ref_seq, by_window = ref_all[0], dict(zip(windows, ref_all[1:], strict=True))
    del model, ref_all
    gc.collect()

    ref = ref_seq[: len(prompt) + decode_steps]
    diff = float(np.abs(onnx_logits - ref).max())
    scale = float(np.abs(ref).max())
    greedy_torch = [int(t) for t in ref_seq[len(prompt) - 1 : len(prompt) - 1 + greedy_steps].argmax(-1)]
    report = VerifyReport(
        prompt_tokens=len(prompt),
        decode_steps=decode_steps,
        max_abs_logit_diff=diff,
        max_abs_logit=scale,
        top1_agreement=float((onnx_logits.argmax(-1) == ref.argmax(-1)).mean()),
        greedy_tokens_onnx=greedy_onnx[:greedy_steps],
        greedy_tokens_torch=greedy_torch,
        greedy_match=greedy_onnx[:greedy_steps] == greedy_torch,
    )
    report.method = "streaming"
    if quant_mode == "fp32":
        report.tolerance = max(FP32_REL_TOL * scale, 1e-4)
        report.passed = diff <= report.tolerance and report.top1_agreement == 1.0
    if ppl_onnx is not None:
        ppl_torch = perplexity(lambda ids: by_window[tuple(ids)], docs, window=context)
        report.ppl_text = str(text_path.name) if text_path else None
        report.ppl_onnx, report.ppl_torch_fp32, report.ppl_tokens = (
            ppl_onnx.perplexity,
            ppl_torch.perplexity,
            ppl_onnx.tokens,
        )
    return report


def _record(windows: list[tuple[int, ...]], ids: list[int], vocab: int) -> np.ndarray:
    key = tuple(ids)
    if key not in windows:
        windows.append(key)
    return np.zeros((len(ids), vocab), np.float32)


def _trim(docs: list[list[int]], budget: int) -> list[list[int]]:
    """Cut the last document so the total is the budget: here every token costs a pass's compute."""
    out, used = [], 0
    for d in docs:
        if used >= budget:
            break
        out.append(d[: max(budget - used, 2)])
        used += len(out[-1])
    return out
