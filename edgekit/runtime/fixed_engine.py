"""The fixed-shape prefill/decode pair behind KVEngine's interface, for providers that compile static shapes.

QNN's HTP (and NNAPI, CoreML's Neural Engine) take a graph whole only when every dimension is fixed; the
standard-flavour bundle of an NPU recipe carries `fixed-prefill.onnx` (P new tokens) and `fixed-decode.onnx`
(1 new token), both over a C-slot, left-padded window (export/mobile.py has the contract). This engine keeps
the last C slots of keys and values and their attention mask: a prompt goes in chunks of P (the first
chunk's padding masked out), each generated token through the decode graph, and before every call the
oldest slots are dropped to fit the graph's past. Unlike KVEngine every step attends over all C slots, and
a sequence ends at C - 1 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgekit.errors import EdgekitError
from edgekit.runtime.kv_engine import KV_NP_DTYPES
from edgekit.runtime.providers import Placement, RuntimeOptions, create_session


class FixedEngine:
    """One sequence (batch 1) over the fixed prefill/decode sessions."""

    def __init__(self, prefill: ort.InferenceSession, decode: ort.InferenceSession) -> None:
        self.prefill, self.decode = prefill, decode
        ins = {i.name: i for i in prefill.get_inputs()}
        self.chunk = int(ins["input_ids"].shape[1])
        self.window = int(ins["attention_mask"].shape[1])
        self.past_names = [n for n in ins if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.kv_dtype = KV_NP_DTYPES[ins[self.past_names[0]].type] if self.past_names else np.float32
        self._shapes = {n: (1, int(ins[n].shape[1]), self.window, int(ins[n].shape[3])) for n in self.past_names}
        self.vocab = int(prefill.get_outputs()[0].shape[-1])
        self.capacity = self.window - 1  # the most tokens a sequence can hold
        self._ids: list[int] = []
        self.reset()

    @property
    def length(self) -> int:
        return len(self._ids)

    @property
    def kv_bytes(self) -> int:
        return sum(int(np.prod(s)) for s in self._shapes.values()) * np.dtype(self.kv_dtype).itemsize

    def reserve(self, capacity: int) -> None:
        if capacity > self.capacity:
            raise EdgekitError(f"the fixed-shape graphs hold {self.capacity} tokens; {capacity} needed")

    def reset(self) -> None:
        self._ids = []
        self._kv = {n: np.zeros(s, self.kv_dtype) for n, s in self._shapes.items()}
        self._mask = np.zeros((1, self.window), np.int64)

    def truncate(self, length: int) -> int:
        """Keep the first `length` tokens. The window cannot rewind in place, so a shorter one is re-fed."""
        if not 0 <= length <= self.length:
            raise EdgekitError(f"cannot keep {length} cached positions: the cache holds {self.length}")
        if length < self.length:
            kept = self._ids[:length]
            self.reset()
            if kept:
                self.forward(kept, all_logits=False)
        return length

    def _step(self, session: ort.InferenceSession, ids: list[int]) -> np.ndarray:
        """One call with len(ids) <= the graph's new-token count; logits of the real rows."""
        new = int(session.get_inputs()[0].shape[1])
        past = self.window - new
        if self._mask[:, : self.window - past].any():  # a real token would fall out of the window
            raise EdgekitError(f"the fixed context of {self.window} slots is full")
        padded = np.zeros((1, new), np.int64)
        padded[0, new - len(ids) :] = ids
        mask = np.concatenate([self._mask[:, -past:], (np.arange(new) >= new - len(ids))[None].astype(np.int64)], 1)
        feeds = {"input_ids": padded, "attention_mask": mask}
        feeds |= {n: self._kv[n][:, :, -past:] for n in self.past_names}
        outs = session.run(["logits", *self.present_names], feeds)
        self._kv = dict(zip(self.past_names, outs[1:], strict=True))
        self._mask = mask
        self._ids.extend(ids)
        return outs[0][0, new - len(ids) :]

    def forward(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray:
        """Feed `ids` after what is cached; logits [len(ids), vocab] (or the last row only)."""
        ids = [int(i) for i in ids]
        if not ids:
            raise EdgekitError("nothing to run: empty input")
        if self.length + len(ids) > self.capacity:
            raise EdgekitError(f"the fixed-shape graphs hold {self.capacity} tokens; {self.length + len(ids)} needed")
        if len(ids) == 1:
            rows = [self._step(self.decode, ids)]
        else:
            rows = [self._step(self.prefill, ids[k : k + self.chunk]) for k in range(0, len(ids), self.chunk)]
        logits = np.concatenate(rows)
        return logits if all_logits else logits[-1:]


def open_fixed(folder: Path, files: dict[str, str], options: RuntimeOptions) -> tuple[FixedEngine, Placement]:
    """The engine over a bundle's fixed pair (`manifest["fixed_shapes"]["files"]`), and both graphs' placement."""
    prefill, on_prefill = create_session(folder / files["prefill"], options)
    decode, placement = create_session(folder / files["decode"], options)
    for ours, theirs in ((placement.nodes, on_prefill.nodes), (placement.cpu_ops, on_prefill.cpu_ops)):
        for key, n in theirs.items():
            ours[key] = ours.get(key, 0) + n
    return FixedEngine(prefill, decode), placement
