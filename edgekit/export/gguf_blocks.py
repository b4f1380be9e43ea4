"""`--quant keep`: a GGUF's own quantized blocks become the bundle's weights, with no second rounding.

Three GGUF block formats map exactly onto onnxruntime's MatMulNBits (blocks of 32 along the input axis,
one scale per block, w = scale · (q − zero_point)):
- Q4_0: w = d · (q − 8), q in 0..15. MatMulNBits' default 4-bit zero point is 8: scales only.
- Q8_0: w = d · q, q in −128..127. Stored as q + 128 with the default 8-bit zero point 128.
- Q4_1: w = d · q + m = d · (q − 8) + (m + 8d). The first term is a Q4_0-style block (default zero
  point), the second a per-block constant c, so x · wᵀ = MatMulNBits(x) + Σ_b (Σ_{k in b} x_k) · c_b:
  block sums of x times a small [K/32, N] float matrix, added to the MatMulNBits output. Exact, and it
  runs MLAS's int8-compute kernel. Why not MatMulNBits' float zero points (−m/d), which say the same in
  one node: MLAS then takes its float dequantize path, 50x slower per token at M = 1 on this machine
  (2.0 ms against 40 µs for a 576 × 1536 matrix; BENCHMARKS.md).
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
    zero_points: np.ndarray | None  # float32 [N, K/32], or None: the default 2^(bits-1)
    offsets: np.ndarray | None = None  # float32 [N, K/32]: a constant added to every weight of a block (Q4_1)

    @property
    def shape(self) -> tuple[int, int]:
        n, blocks, _ = self.packed.shape
        return n, blocks * BLOCK

    def dequantize(self) -> np.ndarray:
        q = _unpack(self.packed, self.bits).astype(np.float32)
        zp = self.zero_points[..., None] if self.zero_points is not None else float(2 ** (self.bits - 1))
        w = (q - zp) * self.scales[..., None]
        if self.offsets is not None:
            w += self.offsets[..., None]
        return w.reshape(self.shape)


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
    return Blocks(gguf_type, 4, _pack4(q), d, None, offsets=m + 8 * d)


def concat_rows(parts: list[Blocks]) -> Blocks | None:
    """Stack weights along the output axis (fused QKV); None when their formats differ."""
    first = parts[0]
    if any(p.bits != first.bits or (p.zero_points is None) != (first.zero_points is None) for p in parts):
        return None
    if len({p.shape[1] for p in parts}) != 1:
        return None
    zps = None if first.zero_points is None else np.concatenate([p.zero_points for p in parts])  # type: ignore[misc]
    offsets = None
    if any(p.offsets is not None for p in parts):  # Q4_0 rows beside Q4_1 rows: their offset is 0
        offsets = np.concatenate([p.offsets if p.offsets is not None else np.zeros_like(p.scales) for p in parts])
    return Blocks(
        "+".join(sorted({p.gguf_type for p in parts})),
        first.bits,
        np.concatenate([p.packed for p in parts]),
        np.concatenate([p.scales for p in parts]),
        zps,
        offsets,
    )


def matmul_nbits(
    x: str, blocks: Blocks, weight_name: str, out: str, name: str, accuracy_level: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """MatMulNBits over the blocks; with offsets (Q4_1), plus block sums of x times the offsets."""
    if blocks.offsets is None:
        return _matmul_nbits(x, blocks, weight_name, out, name, accuracy_level)
    k = blocks.shape[1]
    nodes, inits = _matmul_nbits(x, blocks, weight_name, f"{out}/blocks", name, accuracy_level)
    shape = numpy_helper.from_array(np.array([0, 0, k // BLOCK, BLOCK], np.int64), f"{weight_name}_block_shape")
    axes = numpy_helper.from_array(np.array([-1], np.int64), f"{weight_name}_block_axis")
    offsets = numpy_helper.from_array(np.ascontiguousarray(blocks.offsets.T), f"{weight_name}_block_offsets")
    sums = f"{out}/x_sums"
    nodes += [
        helper.make_node("Reshape", [x, shape.name], [f"{out}/x_blocks"], name=f"{name}/x_blocks"),
        helper.make_node("ReduceSum", [f"{out}/x_blocks", axes.name], [sums], name=f"{name}/x_sums", keepdims=0),
        helper.make_node("MatMul", [sums, offsets.name], [f"{out}/offsets"], name=f"{name}/offsets"),
        helper.make_node("Add", [f"{out}/blocks", f"{out}/offsets"], [out], name=f"{name}/add_offsets"),
    ]
    return nodes, [*inits, shape, axes, offsets]


def _matmul_nbits(
    x: str, blocks: Blocks, weight_name: str, out: str, name: str, accuracy_level: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
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
    return [node], inits


def gather_blocks(
    blocks: Blocks, table_name: str, ids: str, out: str, name: str
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """An embedding lookup straight from 8-bit blocks (GatherBlockQuantized takes no float zero points)."""
    if blocks.bits != 8 or blocks.zero_points is not None or blocks.offsets is not None:
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


def quantize_q4_1(weight: np.ndarray) -> Blocks:
    """A float weight [N, K] rounded by llama.cpp's own Q4_1 quantizer (gguf.quants), as Blocks."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    raw = quantize(np.ascontiguousarray(weight, dtype=np.float32), GGMLQuantizationType.Q4_1)
    blocks = from_gguf("Q4_1", raw, weight.shape)
    assert blocks is not None  # K % 32 == 0 is checked by the caller
    return blocks
