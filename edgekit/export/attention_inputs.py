"""What every GroupQueryAttention node of the fused graph's step shares: per-row lengths, positions and the
rotary caches, computed once from the graph's masks.

GroupQueryAttention takes a row's lengths (`seqlens_k` = cached + new - 1, `total_sequence_length`) and,
without `position_ids`, derives the new tokens' positions from them. A window-sized cache (--kv-window)
breaks that link for its layers: they hold only the last positions, so their lengths come from
`window_attention_mask` and their rotary positions from the full `attention_mask`, given as `position_ids`
(onnxruntime 1.32's CPU kernel rotates by them; the cached keys are stored already rotated, so dropping old
ones changes nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from edgekit.checkpoint.load import Checkpoint, rotary_tables
from edgekit.errors import EdgekitError
from edgekit.export.heads import pad_rotary
from edgekit.export.kv_cache import KVScales
from edgekit.export.onnx_writer import GraphWriter
from edgekit.skip.skipset import SkipSet


@dataclass(frozen=True)
class AttentionInputs:
    seqlens_k: str
    total_len: str
    rotary: dict[str, tuple[str, str]]  # ModelSpec.rope_kind → (cos cache, sin cache)
    context: int
    kv_scales: KVScales | None = None  # a quantized cache's per-channel scales (kv_cache.py)
    window_lengths: tuple[str, str] | None = None  # (seqlens_k, total) of the window-sized slots
    position_ids: str | None = None  # [batch, new tokens]: absolute positions, for the window-sized slots


def window_slots(ckpt: Checkpoint, skip: SkipSet, context: int) -> tuple[tuple[int, ...], int]:
    """The KV slots of kept sliding-window layers (whose cache --kv-window sizes to the window), and the window."""
    windows = {skip.kv_slot(i): w for i in skip.kept if (w := ckpt.spec.window(i, context))}
    if not windows:
        raise EdgekitError(
            f"--kv-window: no kept layer of {ckpt.source_id} has a sliding window shorter than the context "
            f"{context}; every cache is as long as the sequence"
        )
    if len(set(windows.values())) > 1:
        raise EdgekitError(f"--kv-window: the layers' windows differ ({sorted(set(windows.values()))}); unsupported")
    return tuple(sorted(windows)), next(iter(windows.values()))


@dataclass(frozen=True)
class _Consts:
    axes_1: str
    one: str
    zero: str
    idx_1: str


def _lengths(g: GraphWriter, c: _Consts, mask: str, label: str) -> tuple[str, str, str]:
    """(seqlens_k int32 [batch], total_sequence_length int32 scalar, the mask's row sums int64 [batch])."""
    mask_sum = g.op("ReduceSum", [mask, c.axes_1], keepdims=0, name=f"{label}/ReduceSum")[0]
    seqlens = g.op("Sub", [mask_sum, c.one], name=f"{label}/Sub")[0]
    seqlens_k = g.op("Cast", [seqlens], to=TensorProto.INT32, name=f"{label}/seqlens_k")[0]
    shape = g.op("Shape", [mask], name=f"{label}/Shape")[0]
    total = g.op("Gather", [shape, c.idx_1], name=f"{label}/total")[0]
    return seqlens_k, g.op("Cast", [total], to=TensorProto.INT32, name=f"{label}/total_i32")[0], mask_sum


def _positions(g: GraphWriter, c: _Consts, mask_sum: str) -> str:
    """[batch, new]: mask_sum - new + arange(new), the positions GroupQueryAttention would derive itself."""
    ids_shape = g.op("Shape", ["input_ids"], name="/positions/Shape")[0]
    new = g.op("Gather", [ids_shape, c.idx_1], name="/positions/new")[0]
    start = g.op("Sub", [mask_sum, new], name="/positions/start")[0]
    steps = g.op("Range", [c.zero, new, c.one], name="/positions/Range")[0]
    first = g.op("Unsqueeze", [start, c.axes_1], name="/positions/Unsqueeze")[0]
    return g.op("Add", [first, steps], name="/positions/Add")[0]


def attention_inputs(
    g: GraphWriter, ckpt: Checkpoint, skip: SkipSet, context: int, kv_scales: KVScales | None, windowed: bool
) -> AttentionInputs:
    c = _Consts(
        g.const("axes_1", np.array([1], np.int64)),
        g.const("one_i64", np.array(1, np.int64)),
        g.const("zero_i64", np.array(0, np.int64)) if windowed else "",
        g.const("idx_1", np.array(1, np.int64)),
    )
    seqlens_k, total_len, mask_sum = _lengths(g, c, "attention_mask", "/attn_mask")
    window_lengths, positions = None, None
    if windowed:
        window_lengths = _lengths(g, c, "window_attention_mask", "/window_mask")[:2]
        positions = _positions(g, c, mask_sum)
    rotary = {}
    for kind in sorted({ckpt.spec.rope_kind(i) for i in skip.kept}):
        cos, sin = rotary_tables(ckpt, context, kind)
        suffix = f".{kind}" if kind else ""
        rotary[kind] = (
            g.float_const(f"cos_cache{suffix}", pad_rotary(cos, ckpt.spec.head_dim, 1.0)),
            g.float_const(f"sin_cache{suffix}", pad_rotary(sin, ckpt.spec.head_dim, 0.0)),
        )
    return AttentionInputs(seqlens_k, total_len, rotary, context, kv_scales, window_lengths, positions)
