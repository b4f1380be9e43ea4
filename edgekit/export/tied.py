"""One table for a tied embedding and lm_head: GatherBlockQuantized reads lm_head's MatMulNBits weight.

Checkpoints that tie the two (SmolLM2, Gemma 3, Qwen3 0.6B) store one [vocab, hidden] matrix, and an int4
bundle used to hold it twice: a 4-bit GatherBlockQuantized table and lm_head's MatMulNBits weight (8-bit by
default), 14 + 28 MB of SmolLM2's 121 MB. onnxruntime 1.32's CPU kernels agree on the packed weight itself,
[vocab, blocks, block bytes] uint8, but not on the rest: MatMulNBits takes its scales as [vocab * blocks]
and its zero points packed two to a byte at 4 bits; GatherBlockQuantized wants both of the weight's rank,
[vocab, blocks, 1], one zero point per byte (checked: each refuses the other's layout). So the weight is
shared and the scales and zero points (a few percent of it) are written twice. The embedding then has
lm_head's precision (8 bits by default, where it had 4). Gathered rows come out [batch, seq, blocks,
block]; a Reshape makes them [batch, seq, hidden].
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgekit.errors import EdgekitError
from edgekit.export.quantize import QuantConfig

MS_DOMAIN = "com.microsoft"


def shares_table(quant: QuantConfig, tied: bool, hidden: int) -> bool:
    """Whether an export writes one table for the embedding and lm_head (see the module docstring)."""
    return (
        tied
        and quant.embedding_quantized
        and not quant.keeps_gguf_blocks
        and quant.int4_algo != "q4_1"  # Q4_1's block offsets are extra nodes GatherBlockQuantized cannot read
        and quant.int8_kernel == "blockwise"
        and quant.bits_for("lm_head") in (4, 8)
        and hidden % quant.block_size == 0  # no padding block: gathered rows are exactly `hidden` wide
    )


def _unpacked_zero_points(packed: np.ndarray, bits: int, rows: int, blocks: int) -> np.ndarray:
    z = packed.reshape(rows, -1)
    if bits == 4:  # low nibble first
        z = np.stack([z & 0x0F, z >> 4], axis=-1).reshape(rows, -1)
    return np.ascontiguousarray(z[:, :blocks]).astype(np.uint8)


def shared_gather(
    lm_nodes: list[onnx.NodeProto], lm_inits: list[onnx.TensorProto], ids: str, out: str
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The embedding lookup over lm_head's MatMulNBits weight: its nodes and their own initializers."""
    if [n.op_type for n in lm_nodes] != ["MatMulNBits"]:
        raise EdgekitError(f"internal: a shared table needs lm_head as one MatMulNBits, not {lm_nodes}")
    mm = lm_nodes[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in mm.attribute}
    bits, block, rows = attrs["bits"], attrs["block_size"], attrs["N"]
    by_name = {t.name: t for t in lm_inits}
    scales = numpy_helper.to_array(by_name[mm.input[2]]).reshape(rows, -1, 1)
    blocks = scales.shape[1]
    if len(mm.input) > 3 and mm.input[3]:
        zero = _unpacked_zero_points(numpy_helper.to_array(by_name[mm.input[3]]), bits, rows, blocks)
    else:  # symmetric: MatMulNBits' implied zero point, written out
        zero = np.full((rows, blocks), 2 ** (bits - 1), np.uint8)
    inits = [
        numpy_helper.from_array(np.ascontiguousarray(scales), f"{out}/scales"),
        numpy_helper.from_array(zero.reshape(rows, blocks, 1), f"{out}/zero_points"),
        numpy_helper.from_array(np.array([0, 0, blocks * block], np.int64), f"{out}/shape"),
    ]
    gather = helper.make_node(
        "GatherBlockQuantized",
        [mm.input[1], ids, f"{out}/scales", f"{out}/zero_points"],
        [f"{out}/blocks"],
        name="/embed/GatherBlockQuantized",
        domain=MS_DOMAIN,
        gather_axis=0,
        quantize_axis=2,
        block_size=block,
        bits=bits,
    )
    reshape = helper.make_node("Reshape", [f"{out}/blocks", f"{out}/shape"], [out], name="/embed/Reshape")
    return [gather, reshape], inits
