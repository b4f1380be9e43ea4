"""The KV cache as onnxruntime IO-bound buffers: one [1, kv_heads, capacity, head_dim] buffer per kept
layer's key and value, bound as both the graph's past input and its present output (see generator.py).

A bundle exported with --kv-window gives its sliding-window layers' slots a window-sized buffer instead
(window + one chunk of positions): GroupQueryAttention appends to it like to any other, and when the next
chunk would not fit, the last `window` positions move to its front (one copy per chunk of tokens, not per
step). Those slots take their lengths from `window_attention_mask`; prompts go in chunks so each fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from edgekit.errors import EdgekitError

# int8 / int4 (two values per uint8): a quantized cache (export/kv_cache.py); the graph holds its scales
KV_NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}
CAPACITY_STEP = 256  # grow the KV buffers in these steps, so similar calls reuse them
# The contract of a window-sized slot (export/onnx_writer.py writes it): its sequence axis, and the model
# property with the positions it must keep (the sliding window)
WINDOW_DIMS = ("past_window_length", "total_window_length")
KV_WINDOW_PROP = "edgekit.kv_window"
_KEEP_LAST, _KEEP_ALL = np.array([1], np.int64), np.array([0], np.int64)  # `logits_to_keep` values
_DEVICE_BUFFERS = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


class KVEngine:
    """One sequence's forward steps over a shared past/present KV buffer (batch 1)."""

    def __init__(self, session: ort.InferenceSession, capacity: int = 0, shared: bool = True) -> None:
        self.session = session
        # The standard graph flavour (graph_standard.py) concatenates past and new keys, so its present is a
        # new tensor one step longer: it cannot share a buffer; its past is fed as a copy and present copied back.
        self.shared = shared
        ins = {i.name: i for i in session.get_inputs()}
        self.past_names = [n for n in ins if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        if self.past_names:
            first = ins[self.past_names[0]]
            self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
            self.kv_dtype = KV_NP_DTYPES[first.type]
        else:  # every layer's attention removed: no cache at all
            self.kv_heads, self.head_dim, self.kv_dtype = 0, 0, np.float32
        self.vocab = int(session.get_outputs()[0].shape[-1])
        self._device = _DEVICE_BUFFERS.get(session.get_providers()[0], "cpu")
        self.window, self.window_slots = kv_window(session)
        self.window_length = 0  # positions the window-sized buffers hold (the last ones before `length`)
        if self.window_slots and (self._device != "cpu" or not shared):
            raise EdgekitError("a window-sized KV cache (--kv-window) runs on CPU buffers with the fused graph only")
        self.capacity = 0
        self.length = 0  # positions already in the cache
        self._io = session.io_binding()
        self._buffers: list[Any] = []  # numpy arrays (CPU) or OrtValues (device) that back the bindings
        self._logits = np.empty((1, 1, self.vocab), np.float32)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self._logits)
        # Bound first so it is output 0: IO binding returns outputs in the order they were first bound.
        self._io.bind_ortvalue_output("logits", self._logits_value)
        self._mask = np.ones((1, 0), np.int64)
        # Graphs with a `logits_to_keep` input (fused flavour) can skip lm_head for all but the last position.
        self._can_keep_last = "logits_to_keep" in ins
        self.reserve(capacity)

    @property
    def kv_bytes(self) -> int:
        """Bytes held by the KV buffers now."""
        itemsize = np.dtype(self.kv_dtype).itemsize
        positions = sum(self._slot_capacity(n) for n in self.past_names) if self.capacity else 0
        return positions * self.kv_heads * self.head_dim * itemsize

    def _slot_capacity(self, past_name: str) -> int:
        windowed = int(past_name.split(".")[1]) in self.window_slots
        return min(self.capacity, self.window + CAPACITY_STEP) if windowed else self.capacity

    def reserve(self, capacity: int) -> None:
        """Make the buffers hold `capacity` positions (allocates only when growing; keeps no old content)."""
        if capacity <= self.capacity:
            return
        self.capacity = capacity
        self._mask = np.ones((1, capacity), np.int64)
        self._buffers = []
        for past, present in zip(self.past_names, self.present_names, strict=True):
            shape = (1, self.kv_heads, self._slot_capacity(past), self.head_dim)
            if self._device == "cpu":
                array = np.zeros(shape, self.kv_dtype)
                value = ort.OrtValue.ortvalue_from_numpy(array)  # shares the numpy memory
                self._buffers.append(array)
            else:
                value = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.kv_dtype, self._device, 0)
                self._buffers.append(value)
            # The same OrtValue on both sides is what puts GroupQueryAttention in shared-buffer mode.
            if self.shared:
                self._io.bind_ortvalue_input(past, value)
                self._io.bind_ortvalue_output(present, value)
        self.length = self.window_length = 0

    def reset(self) -> None:
        """Forget the sequence; the buffers stay (stale positions are never read: the mask bounds them)."""
        self.length = self.window_length = 0

    def truncate(self, length: int) -> int:
        """Keep only the first `length` cached positions; the next forward continues after them. Returns
        the positions kept: 0 when a window-sized buffer no longer holds the window before `length`."""
        if not 0 <= length <= self.length:
            raise EdgekitError(f"cannot keep {length} cached positions: the cache holds {self.length}")
        dropped = self.length - length
        if self.window_slots and self.window_length - dropped < min(self.window, length):
            self.reset()
            return 0
        self.length, self.window_length = length, self.window_length - dropped
        return length

    def _make_room(self, n: int) -> None:
        """Before feeding n tokens: move the window-sized buffers' last `window` positions to their front
        when n more would not fit (GroupQueryAttention writes new positions after the cached ones)."""
        room = self.window + CAPACITY_STEP
        if self.window_length + n <= room:
            return
        keep = min(self.window, self.window_length)
        for slot in self.window_slots:
            for buf in self._buffers[2 * slot : 2 * slot + 2]:
                buf[:, :, :keep] = buf[:, :, self.window_length - keep : self.window_length]  # numpy handles overlap
        self.window_length = keep

    def forward(self, ids: Sequence[int], all_logits: bool = True) -> np.ndarray:
        """Feed `ids` after what is cached; logits [len(ids), vocab], or [1, vocab] for the last position
        only with `all_logits=False` (what generation needs; the graph then skips the rest of lm_head).
        A single row is a view of a preallocated output buffer, overwritten by the next step: copy it to keep it."""
        n = len(ids)
        total = self.length + n
        if n == 0:
            raise EdgekitError("nothing to run: empty input")
        if total > self.capacity:
            raise EdgekitError(f"KV cache holds {self.capacity} positions; {total} needed (reserve more)")
        if self.window_slots and n > CAPACITY_STEP:  # each chunk must fit the window-sized buffers' room
            rows = [self.forward(ids[k : k + CAPACITY_STEP], all_logits) for k in range(0, n, CAPACITY_STEP)]
            return np.concatenate(rows) if all_logits else rows[-1]
        self._io.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        self._io.bind_cpu_input("attention_mask", self._mask[:, :total])
        if self.window_slots:
            self._make_room(n)
            self._io.bind_cpu_input("window_attention_mask", self._mask[:, : self.window_length + n])
        one_row = n == 1 or (not all_logits and self._can_keep_last)
        if self._can_keep_last:
            self._io.bind_cpu_input("logits_to_keep", _KEEP_LAST if one_row else _KEEP_ALL)
        if one_row:
            self._io.bind_ortvalue_output("logits", self._logits_value)
        else:
            self._io.bind_output("logits", "cpu")  # onnxruntime allocates [1, n, vocab]
        if not self.shared:
            for past, present, buf in zip(self.past_names, self.present_names, self._buffers, strict=True):
                self._io.bind_cpu_input(past, np.ascontiguousarray(buf[:, :, : self.length]))
                self._io.bind_output(present, "cpu")
        self.session.run_with_iobinding(self._io)
        self.window_length += n
        if not self.shared:  # outputs come back in first-bound order: logits, then the presents
            for buf, value in zip(self._buffers, self._io.get_outputs()[1:], strict=True):
                buf[:, :, :total] = value.numpy()
        self.length = total
        if one_row:
            return self._logits[0]
        logits = self._io.get_outputs()[0].numpy()[0]
        return logits if all_logits else logits[-1:]

    def kv(self, slot: int, kind: str = "key") -> np.ndarray:
        """The valid part of one cache slot [1, kv_heads, length, head_dim] (CPU buffers only; a view); of a
        window-sized slot, the last positions it holds."""
        array = self._buffers[2 * slot + (kind == "value")]
        if not isinstance(array, np.ndarray):
            raise EdgekitError("the KV cache lives on the device; it cannot be viewed from numpy")
        return array[:, :, : self.window_length if slot in self.window_slots else self.length]


def kv_window(session: ort.InferenceSession) -> tuple[int, frozenset[int]]:
    """(positions a window-sized slot keeps, the slots with a window-sized cache); (0, {}) when none has."""
    slots = frozenset(
        int(i.name.split(".")[1])
        for i in session.get_inputs()
        if i.name.startswith("past_key_values.") and i.shape[2] == WINDOW_DIMS[0]
    )
    if not slots:
        return 0, slots
    window = session.get_modelmeta().custom_metadata_map.get(KV_WINDOW_PROP)
    if not window:
        raise EdgekitError(f"the graph has window-sized KV slots but no '{KV_WINDOW_PROP}' property: re-export it")
    return int(window), slots
