"""A thin onnxruntime session over an edgekit decoder graph: one forward step with a KV cache.

Torch-free on purpose: this and the tokenizer are all a device app needs. The generation loop and its
zero-copy cache handling live in `runtime.py`; verification and evaluation use this plain form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgekit.runtime.kv_engine import KV_NP_DTYPES, kv_window


@dataclass
class KVCache:
    """Present tensors of the last step, fed back as the next step's past."""

    tensors: dict[str, np.ndarray]
    length: int


class DecoderSession:
    def __init__(
        self, model_path: Path | str, providers: list | None = None, options: ort.SessionOptions | None = None
    ) -> None:
        self.model_path = Path(model_path)
        if options is None:
            options = ort.SessionOptions()
            # onnxruntime warns that `logits_to_keep` (an input with a default) is not a constant: expected.
            options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(self.model_path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )
        ins = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in ins if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        if self.past_names:
            first = ins[self.past_names[0]]
            self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
            self.kv_dtype = KV_NP_DTYPES[first.type]
        else:
            self.kv_heads, self.head_dim, self.kv_dtype = 0, 0, np.float32
        # --kv-window bundles: these slots' past is only the last `window` positions (kv_engine.py)
        self.window, slots = kv_window(self.session)
        self.window_names = {n for n in self.past_names if int(n.split(".")[1]) in slots}

    @property
    def kv_slots(self) -> int:
        return len(self.past_names) // 2

    def empty_cache(self, batch: int = 1) -> KVCache:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return KVCache({n: np.zeros(shape, self.kv_dtype) for n in self.past_names}, 0)

    def forward(self, input_ids: np.ndarray, cache: KVCache | None = None) -> tuple[np.ndarray, KVCache]:
        """input_ids [batch, seq] → logits [batch, seq, vocab] and the grown cache."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim == 1:
            input_ids = input_ids[None, :]
        cache = cache or self.empty_cache(input_ids.shape[0])
        total = cache.length + input_ids.shape[1]
        feeds = {"input_ids": input_ids, "attention_mask": np.ones((input_ids.shape[0], total), np.int64)}
        if self.window_names:
            held = cache.tensors[next(iter(self.window_names))].shape[2]
            feeds["window_attention_mask"] = np.ones((input_ids.shape[0], held + input_ids.shape[1]), np.int64)
        feeds.update(cache.tensors)
        outs = self.session.run(["logits", *self.present_names], feeds)
        present = {
            p.replace("present.", "past_key_values."): t for p, t in zip(self.present_names, outs[1:], strict=True)
        }
        for name in self.window_names:  # what the window no longer reaches is dropped
            present[name] = present[name][:, :, -self.window :]
        return outs[0], KVCache(present, total)

    def logits(self, token_ids: list[int]) -> np.ndarray:
        """Logits [seq, vocab] for one sequence in a single prefill."""
        return self.forward(np.asarray([token_ids]))[0][0]

    def cached_logits(self, token_ids: list[int], prefill: int) -> np.ndarray:
        """Logits [seq, vocab] for one sequence: its first `prefill` tokens in one forward, then one token
        per step through the KV cache (what parity checks past a sliding window need)."""
        logits, cache = self.forward(np.asarray([token_ids[:prefill]]))
        rows = [logits[0]]
        for t in token_ids[prefill:]:
            step, cache = self.forward(np.asarray([[t]]), cache)
            rows.append(step[0])
        return np.concatenate(rows)
