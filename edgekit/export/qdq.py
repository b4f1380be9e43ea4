"""Static QDQ quantization of the fixed-shape pair, for NPUs whose fast path is integer (QNN's HTP).

HTP runs fp16 but is built for quantized tensors: every activation and weight as integers with a
scale and zero point fixed ahead of time, written as QuantizeLinear/DequantizeLinear pairs around each
op. onnxruntime's own QNN tooling does it (`get_qnn_qdq_config` + `quantize`, which also inserts the
type conversions HTP needs); edgekit only supplies calibration inputs: the fp32 fixed pair driven over
`--calib` text by the same fixed-window loop an app runs (runtime/fixed_engine.py), every feed recorded.

Not quantized: each layer's additive attention mask and its Softmax. The mask adds -1e9 where a token
may not attend, and a min/max range over that would leave a 16-bit scale of ~15,000 for the attention
scores (measured: the greedy text is garbage from the first token); kept in float they run in fp16 on
HTP (`enable_htp_fp16_precision`). The RMSNorms' statistics stay quantized: kept float they agreed less
with the CPU (stories260K top-1 96.9% against 97.7%). Activations default to uint16 and weights to uint8, the precision
QNN's examples recommend for LLMs on HTP v73+.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError

QDQ_ACTIVATIONS = ("uint16", "uint8")
QDQ_WEIGHTS = ("uint8", "int8")
UNQUANTIZED_SUFFIXES = ("/attn/mask", "/attn/Softmax")  # graph_standard.py's names for them
CALIB_WINDOWS = 4  # text windows fed: each a prompt through prefill, then decode steps
CHECK_STEPS = 16


class _Recorder:
    """An InferenceSession stand-in that keeps a copy of every feed."""

    def __init__(self, session: Any) -> None:
        self.session, self.feeds = session, []

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.feeds.append({k: v.copy() for k, v in feeds.items()})
        return self.session.run(names, feeds)

    def get_inputs(self) -> Any:
        return self.session.get_inputs()

    def get_outputs(self) -> Any:
        return self.session.get_outputs()


@dataclass(frozen=True)
class QDQResult:
    activations: str
    weights: str
    calib_tokens: int
    feeds: dict[str, int]
    greedy_same: int  # leading greedy tokens equal to the fp32 pair's (CPU), of CHECK_STEPS
    top1: float  # share of a window's positions where the QDQ pair's argmax is the fp32 pair's
    seconds: float

    def to_manifest(self) -> dict[str, Any]:
        return {
            "activations": self.activations,
            "weights": self.weights,
            "tool": "onnxruntime.quantization get_qnn_qdq_config + quantize (MinMax)",
            "not_quantized": "each layer's additive attention mask and Softmax (fp16 on HTP)",
            "calib_tokens": self.calib_tokens,
            "calib_feeds": self.feeds,
            "check_vs_fp32_cpu": {"greedy_same": self.greedy_same, "greedy_total": CHECK_STEPS, "top1": self.top1},
            "seconds": round(self.seconds, 1),
        }


def _engine(folder: Path, files: dict[str, str], record: bool = False) -> Any:
    from edgekit.runtime.fixed_engine import FixedEngine
    from edgekit.runtime.providers import RuntimeOptions, create_session

    sessions = [create_session(folder / files[k], RuntimeOptions())[0] for k in ("prefill", "decode")]
    return FixedEngine(*(_Recorder(s) if record else s for s in sessions))


def _windows(ids: list[int], engine: Any) -> list[tuple[list[int], list[int]]]:
    """(prompt, decoded tokens) pairs from the text: a prompt of up to two prefill chunks, then 32 steps."""
    prompt_len = min(2 * engine.chunk, engine.capacity - 33)
    size = prompt_len + 32
    if prompt_len < 1 or len(ids) < size:
        raise EdgekitError(f"QDQ calibration needs at least {size} tokens of --calib text")
    starts = np.linspace(0, len(ids) - size, CALIB_WINDOWS).astype(int)
    return [(ids[s : s + prompt_len], ids[s + prompt_len : s + size]) for s in starts]


def _greedy(engine: Any, prompt: list[int], steps: int) -> list[int]:
    engine.reset()
    row, out = engine.forward(prompt, all_logits=False)[-1], []
    for _ in range(steps):
        out.append(int(np.argmax(row)))
        row = engine.forward(out[-1:])[0]
    return out


def quantize_fixed_pair(
    folder: Path, files: dict[str, str], calib_ids: list[int], activations: str, weights: str
) -> QDQResult:
    """Replace the bundle's fixed prefill/decode graphs by static QDQ versions calibrated on `calib_ids`."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    if activations not in QDQ_ACTIVATIONS or weights not in QDQ_WEIGHTS:
        raise EdgekitError(f"qdq: activations {QDQ_ACTIVATIONS}, weights {QDQ_WEIGHTS}")
    start = time.perf_counter()
    recorder = _engine(folder, files, record=True)
    windows = _windows(calib_ids, recorder)
    for prompt, follow in windows:  # teacher-forced: the decode graph sees the text's own next tokens
        recorder.reset()
        recorder.forward(prompt, all_logits=False)
        for token in follow:
            recorder.forward([token])
    reference = _engine(folder, files)
    check_prompt = windows[0][0]
    want = _greedy(reference, check_prompt, CHECK_STEPS)
    reference.reset()
    want_rows = reference.forward(check_prompt, all_logits=True)

    qtype = {"uint16": QuantType.QUInt16, "uint8": QuantType.QUInt8, "int8": QuantType.QInt8}

    class _Reader(CalibrationDataReader):
        def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    sessions = {"prefill": recorder.prefill, "decode": recorder.decode}
    with tempfile.TemporaryDirectory(dir=folder, prefix=".qdq-") as tmp_name:
        out = {}
        for kind, rel in files.items():
            src = folder / rel
            excluded = [n.name for n in onnx.load(str(src), load_external_data=False).graph.node]
            excluded = [n for n in excluded if n.endswith(UNQUANTIZED_SUFFIXES)]
            config = get_qnn_qdq_config(
                str(src),
                _Reader(sessions[kind].feeds),
                activation_type=qtype[activations],
                weight_type=qtype[weights],
                nodes_to_exclude=excluded,
            )
            out[kind] = Path(tmp_name) / f"{kind}.onnx"
            quantize(str(src), str(out[kind]), config)
        for kind, rel in files.items():
            out[kind].replace(folder / rel)
    quantized = _engine(folder, files)
    got = _greedy(quantized, check_prompt, CHECK_STEPS)
    quantized.reset()
    top1 = float(np.mean(quantized.forward(check_prompt, all_logits=True).argmax(-1) == want_rows.argmax(-1)))
    same = next((i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), CHECK_STEPS)
    return QDQResult(
        activations,
        weights,
        sum(len(p) + len(f) for p, f in windows),
        {k: len(s.feeds) for k, s in sessions.items()},
        same,
        top1,
        time.perf_counter() - start,
    )
