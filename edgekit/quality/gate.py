"""The export's quality gate: the new bundle's perplexity on a calibration text against the UNSKIPPED
fp32 PyTorch model's, so the bound covers everything the export changed (skipping and quantization).

`export` calls `quality_gate` inside its temporary bundle folder; raising here removes that folder,
so a bundle that breaks the bound never appears.
"""

from __future__ import annotations

import gc
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgekit.checkpoint.load import load_torch_model
from edgekit.errors import EdgekitError
from edgekit.quality.evaluate import eval_perplexity, load_documents, read_text
from edgekit.quality.models import graph_scorer, open_folder_scorer, streaming_scorer
from edgekit.quality.perplexity import DOC_SEPARATOR
from edgekit.skip.skipset import SkipSet

DEFAULT_CALIB_TOKENS = 16384  # enough for a stable figure; a 7B fp32 forward pass on CPU is slow
# With a streaming reference every window goes through one batched forward, activations and all.
STREAMING_CALIB_TOKENS = 2048


@dataclass
class QualityReport:
    text: str
    documents: int
    tokens: int
    window: int
    ppl_bundle: float
    ppl_reference: float  # unskipped fp32 PyTorch model
    reference: str
    increase: float  # relative: ppl_bundle / ppl_reference - 1
    max_increase: float | None
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_increase(text: str) -> float:
    """'5%' → 0.05; '0.05' → 0.05."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(%?)\s*", text)
    if not m:
        raise EdgekitError(f"--max-ppl-increase {text}: expected a relative bound like 5% or 0.05")
    value = float(m.group(1)) / (100 if m.group(2) else 1)
    if value > 100:
        raise EdgekitError(f"--max-ppl-increase {text}: implausibly large")
    return value


def quality_gate(
    ckpt: Any,
    skipped: list[int],
    bundle_folder: Path,
    calib: Path,
    max_increase: float | None,
    context: int,
    quant: str,
    max_tokens: int = DEFAULT_CALIB_TOKENS,
    separator: str | None = DOC_SEPARATOR,
    streaming: bool = False,
) -> QualityReport:
    """Measure; the caller decides what a failed report means (export raises after recording it).

    `streaming`: the fp32 model does not fit in memory (the export's memory plan says so), so the
    reference holds one layer at a time and scores every window in a single pass over the weights.
    """
    text = read_text(calib)
    # The folder has no manifest yet (written last), so the scorer is built from the export's own facts.
    bundle = graph_scorer(bundle_folder / "model.onnx", bundle_folder, ckpt.spec, context, quant, skipped)
    if streaming:
        max_tokens = min(max_tokens, STREAMING_CALIB_TOKENS)
    docs = load_documents(bundle, text, separator, max_tokens=max_tokens)
    if not docs:
        raise EdgekitError(f"calibration text {calib} has no scorable tokens")
    window = min(context, 1024)
    stride = max(1, window // 2)
    ppl_bundle = eval_perplexity(bundle, docs, window, stride)
    del bundle  # its onnxruntime session, before the reference takes the memory
    gc.collect()
    if streaming:
        reference = streaming_scorer(ckpt, SkipSet.none(ckpt.spec.num_layers), ckpt.source_id)
        ppl_ref = reference.run(lambda: eval_perplexity(reference, docs, window, stride))
    else:
        reference = open_folder_scorer(ckpt.path, ckpt, load_torch_model(ckpt), ckpt.source_id, [])
        ppl_ref = eval_perplexity(reference, docs, window, stride)
    increase = ppl_bundle.perplexity / ppl_ref.perplexity - 1
    return QualityReport(
        text=calib.name,
        documents=len(docs),
        tokens=ppl_bundle.tokens,
        window=window,
        ppl_bundle=ppl_bundle.perplexity,
        ppl_reference=ppl_ref.perplexity,
        reference="unskipped fp32 PyTorch" + (" (streaming)" if streaming else ""),
        increase=increase,
        max_increase=max_increase,
        passed=max_increase is None or increase <= max_increase,
    )
