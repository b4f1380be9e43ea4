"""`--quant keep`: a GGUF's own quantized blocks become the bundle's weights, with no second rounding.

Three GGUF block formats map exactly onto onnxruntime's MatMulNBits (blocks of 32 along the input axis,
one scale per block, w = scale · (q − zero_point)):
- Q4_0: w = d · (q − 8), q in 0..15. MatMulNBits' default 4-bit zero point is 8: scales only.
- Q8_0: w = d · q, q in −128..127. Stored as q + 128 with the default 8-bit zero point 128.
- Q4_1: w = d · q + m. The same as d · (q − (−m/d)): a *float* zero point per block, which MatMulNBits
  takes, but MLAS then runs its float dequantize path instead of the int8-compute kernel (about 50x
  slower per token at M = 1 on this machine; see BENCHMARKS.md). Exact, slow.
Everything else (F32/F16 norms, K-quants) is dequantized and goes the usual way. Embedding tables stored
as Q8_0 become an 8-bit GatherBlockQuantized.

The unpacking below is a fixed byte layout (ggml's block_q4_0 / block_q4_1 / block_q8_0 structs) read
with numpy views; gguf-py has no public API that returns a block's parts, only whole dequantization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgekit.errors import EdgekitError

BLOCK = 32
KEPT_TYPES = ("Q4_0", "Q4_1", "Q8_0")
_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # bytes per block of 32


@dataclass
class Blocks:
    """A weight [N, K] (Hugging Face layout) as MatMulNBits' parts: packed [N, K/32, 32·bits/8]."""

    gguf_type: str
    bits: int
    packed: np.ndarray  # uint8
    scales: np.ndarray  # float32 [N, K/32]
    zero_points: np.ndarray | None  # float32 [N, K/32] (Q4_1 only); None: the default 2^(bits-1)

    @property
    def shape(self) -> tuple[int, int]:
        n, blocks, _ = self.packed.shape
        return n, blocks * BLOCK

    def dequantize(self) -> np.ndarray:
        q = _unpack(self.packed, self.bits).astype(np.float32)
        zp = self.zero_points[..., None] if self.zero_points is not None else float(2 ** (self.bits - 1))
        return ((q - zp) * self.scales[..., None]).reshape(self.shape)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out


def _pack4(q: np.ndarray) -> np.ndarray:
    """[…, 32] values 0..15 → MatMulNBits' bytes: element 2i in the low nibble, 2i+1 in the high one."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def from_gguf(gguf_type: str, raw: np.ndarray, shape: tuple[int, ...]) -> Blocks | None:
    """The blocks of a GGUF tensor [N, K] stored as `raw` (uint8 [N, bytes per row]); None if not keepable."""
    if gguf_type not in KEPT_TYPES or len(shape) != 2 or shape[1] % BLOCK:
        return None
    n, k = shape
    size = _BYTES[gguf_type]
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n, k // BLOCK, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if gguf_type == "Q8_0":
        q = blocks[..., 2:].copy().view(np.int8)
        return Blocks(gguf_type, 8, (q.astype(np.int16) + 128).astype(np.uint8), d, None)
    qs = blocks[..., 4:] if gguf_type == "Q4_1" else blocks[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # ggml: element j low nibble, j + 16 high nibble
    if gguf_type == "Q4_0":
        return Blocks(gguf_type, 4, _pack4(q), d, None)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    flat = d == 0  # a constant block (w = m): scale m, q 1, zero point 0
    q = np.where(flat[..., None], np.uint8(1), q).astype(np.uint8)
    scales = np.where(flat, m, d).astype(np.float32)
    zero_points = np.where(flat, 0.0, -m / np.where(flat, 1.0, d)).astype(np.float32)
    return Blocks(gguf_type, 4, _pack4(q), scales, zero_points)


def concat_rows(parts: list[Blocks]) -> Blocks | None:
    """Stack weights along the output axis (fused QKV); None when their formats differ."""
    first = parts[0]
    same = all(p.bits == first.bits and (p.zero_points is None) == (first.zero_points is None) for p in parts)
    if not same or len({p.shape[1] for p in parts}) != 1:
        return None
    zps = None if first.zero_points is None else np.concatenate([p.zero_points for p in parts])  # type: ignore[misc]
    return Blocks(
        "+".join(sorted({p.gguf_type for p in parts})),
        first.bits,
        np.concatenate([p.packed for p in parts]),
        np.concatenate([p.scales for p in parts]),
        zps,
    )


def matmul_nbits(
    x: str, blocks: Blocks, weight_name: str, out: str, name: str, accuracy_level: int
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    n, k = blocks.shape
    inits = [
        numpy_helper.from_array(blocks.packed, f"{weight_name}_Q{blocks.bits}"),
        numpy_helper.from_array(blocks.scales.reshape(-1), f"{weight_name}_scales"),
    ]
    inputs = [x, inits[0].name, inits[1].name]
    if blocks.zero_points is not None:
        inits.append(numpy_helper.from_array(blocks.zero_points.reshape(-1), f"{weight_name}_zero_points"))
        inputs.append(inits[2].name)
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        [out],
        name=name,
        domain="com.microsoft",
        K=k,
        N=n,
        bits=blocks.bits,
        block_size=BLOCK,
        accuracy_level=accuracy_level,
    )
    return node, inits


def gather_blocks(
    blocks: Blocks, table_name: str, ids: str, out: str, name: str
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """An embedding lookup straight from 8-bit blocks (GatherBlockQuantized takes no float zero points)."""
    if blocks.bits != 8 or blocks.zero_points is not None:
        raise EdgekitError(f"internal: {blocks.gguf_type} embedding blocks cannot feed GatherBlockQuantized")
    n, k = blocks.shape
    inits = [
        numpy_helper.from_array(blocks.packed.reshape(n, k), f"{table_name}_Q8"),
        numpy_helper.from_array(blocks.scales, f"{table_name}_scales"),
    ]
    node = helper.make_node(
        "GatherBlockQuantized",
        [inits[0].name, ids, inits[1].name],
        [out],
        name=name,
        domain="com.microsoft",
        bits=8,
        block_size=BLOCK,
        gather_axis=0,
        quantize_axis=1,
    )
    return node, inits


class KeptWeights:
    """A GGUF checkpoint's weights for the graph builder: keepable matrices as Blocks, the rest as float32."""

    def __init__(self, weights: Any) -> None:
        self._weights = weights

    def __contains__(self, name: object) -> bool:
        return name in self._weights

    def shape(self, name: str) -> tuple[int, ...]:
        return self._weights.shape(name)

    def names(self) -> list[str]:
        return self._weights.names()

    def get(self, name: str) -> np.ndarray | Blocks:
        gguf_type, raw, shape = self._weights.raw(name)
        blocks = from_gguf(gguf_type, raw, shape)
        return blocks if blocks is not None else self._weights.get(name)


def stack_rows(parts: list[np.ndarray | Blocks]) -> np.ndarray | Blocks:
    """Concatenate weights along the output axis, keeping blocks when every part has the same format."""
    if all(isinstance(p, Blocks) for p in parts):
        kept = concat_rows(parts)  # type: ignore[arg-type]
        if kept is not None:
            return kept
    return np.concatenate([p.dequantize() if isinstance(p, Blocks) else p for p in parts])
