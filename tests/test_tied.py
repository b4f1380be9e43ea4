"""A tied embedding and lm_head as one quantized table (export/tied.py): GatherBlockQuantized reads
lm_head's MatMulNBits weight, and every row it gathers equals that weight's dequantized row exactly."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edgekit.bundle.folder import read_bundle
from edgekit.checkpoint.load import open_checkpoint
from edgekit.export.budget import estimate_memory
from edgekit.export.quantize import QuantConfig


def _nodes(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def _dequantized_lm_head(model: onnx.ModelProto) -> np.ndarray:
    """lm_head's weight [vocab, hidden] from its MatMulNBits initializers, by MatMulNBits' own layout."""
    (mm,) = [n for n in _nodes(model, "MatMulNBits") if n.name.startswith("/lm_head")]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mm.attribute}
    bits, block, rows = attrs["bits"], attrs["block_size"], attrs["N"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    packed = inits[mm.input[1]].reshape(rows, -1, block * bits // 8)
    q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(rows, -1, block) if bits == 4 else packed
    blocks = q.shape[1]
    scales = inits[mm.input[2]].reshape(rows, blocks)
    zp = inits[mm.input[3]].reshape(rows, -1)
    if bits == 4:
        zp = np.stack([zp & 0x0F, zp >> 4], -1).reshape(rows, -1)[:, :blocks]
    return ((q.astype(np.float32) - zp[..., None]) * scales[..., None]).reshape(rows, -1)


@pytest.mark.parametrize("lm_head_bits", [8, 4])
def test_the_embedding_gathers_lm_heads_own_quantized_rows(bundle_factory, tmp_path, lm_head_bits):
    bundle = read_bundle(bundle_factory(quant="int4", lm_head_bits=lm_head_bits))
    model = onnx.load(bundle.model_file)
    (gather,) = _nodes(model, "GatherBlockQuantized")
    (lm_head,) = [n for n in _nodes(model, "MatMulNBits") if n.name.startswith("/lm_head")]
    assert gather.input[0] == lm_head.input[1]  # one weight for both
    assert f"lm_head's int{lm_head_bits} table, shared" in bundle.manifest["quantization"]["embedding"]
    vocab, hidden = (bundle.manifest["architecture"][k] for k in ("vocab_size", "hidden_size"))
    # no other quantized table of the vocabulary's rows (what else holds `vocab` uint8 rows: zero points)
    big = [
        t.name
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.UINT8 and t.dims[0] == vocab and np.prod(t.dims) >= vocab * 8
    ]
    assert big == [gather.input[0]], big
    assert (
        np.prod(next(t.dims for t in model.graph.initializer if t.name == big[0])) * 8 == vocab * hidden * lm_head_bits
    )
    # the graph's own lookup nodes and initializers, run alone, against the dequantized lm_head rows
    nodes = [gather, *(n for n in model.graph.node if n.input and n.input[0] == gather.output[0])]
    names = {i for n in nodes for i in n.input}
    lookup = onnx.helper.make_model(
        onnx.helper.make_graph(
            nodes,
            "lookup",
            [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, None])],
            [onnx.helper.make_tensor_value_info("/embed/out", onnx.TensorProto.FLOAT, None)],
            [t for t in model.graph.initializer if t.name in names],
        ),
        opset_imports=list(model.opset_import),
        ir_version=model.ir_version,
    )
    ids = np.array([[0, 1, 7, vocab - 1, 42]], np.int64)
    session = ort.InferenceSession(lookup.SerializeToString(), providers=["CPUExecutionProvider"])
    (rows,) = session.run(None, {"input_ids": ids})
    np.testing.assert_array_equal(rows[0], _dequantized_lm_head(model)[ids[0]])


def test_the_memory_estimate_counts_a_shared_table_once(stories_path):
    spec = open_checkpoint(stories_path, "stories260k").spec
    assert spec.tie_embeddings
    int4 = QuantConfig(mode="int4", lm_head_bits=8)
    separate = QuantConfig(mode="int4", lm_head_bits=8, quantize_embedding=False)  # float embedding: not shared
    shared_w = estimate_memory(spec, 5, int4, 256, 64).weights_bytes
    float_w = estimate_memory(spec, 5, separate, 256, 64).weights_bytes
    assert float_w - shared_w == spec.vocab * spec.hidden * 4 - spec.vocab * (spec.hidden // 32) * 5


def test_untied_or_unquantized_embeddings_keep_their_own_table(bundle_factory):
    for bundle in (bundle_factory(quant="int8"), bundle_factory(quant="int4", quantize_embedding=False)):
        model = onnx.load(read_bundle(bundle).model_file)
        assert not _nodes(model, "GatherBlockQuantized") and _nodes(model, "Gather")
