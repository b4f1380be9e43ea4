"""The ONNX writing machinery every graph flavour shares: the I/O contract the runtime relies on, a sink
that streams initializers to external data as layers are written, a small node writer, and the save.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from edgekit.export.gguf_blocks import Blocks, matmul_nbits, quantize_q4_1
from edgekit.export.int4 import int4_matmul
from edgekit.export.kv_cache import format_named
from edgekit.export.quantize import QuantConfig, matmul_node, quantize_node
from edgekit.runtime.kv_engine import KV_WINDOW_PROP, WINDOW_DIMS

OPSET = 21  # int4 tensors need opset 21 / IR 10
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"
# Above this the weights stay in `model.onnx.data`. onnxruntime memory-maps external data and drops the
# pages it has repacked, whereas an inline model is parsed whole into the heap first: for the 1.1B int4
# graph, external data cut session load from 1.9 to 1.0 s and a run's peak RSS from 1.67 to 1.38 GB (issue 7).
# Small models (stories260K) stay one self-contained file. Protobuf itself caps a file at 2 GB.
INLINE_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True)
class GraphContract:
    """The inputs and outputs every edgekit graph flavour has; the runtime depends on nothing else."""

    kept_layers: tuple[int, ...]
    kv_heads: int
    head_dim: int
    kv_dtype: str  # float32 | float16 | int8 | int4 (packed two per uint8 along head_dim): kv_cache.py
    # An optional int64[1] input (default 0 = every position): logits only for the last k positions. A
    # prompt's forward needs only its last row; all rows cost a [seq, vocab] float buffer (131 MB at 1,024
    # tokens with a 32k vocabulary, 2.1 GB at 4,096 with Llama 3's 128k) and ~1% of a 1.1B prefill's time.
    # The fused flavour only: the fixed-shape mobile variants of the standard flavour need static shapes.
    logits_to_keep: bool = False
    # --kv-window (fused flavour): the slots of sliding-window layers whose cache holds only the window. Their
    # past is the last `kv_window` (or more) positions, not the whole sequence, and `window_attention_mask`
    # [batch, cached window + new tokens] gives their lengths; positions still come from `attention_mask`.
    window_slots: tuple[int, ...] = ()
    kv_window: int = 0

    @property
    def inputs(self) -> list[str]:
        kv = [f"past_key_values.{j}.{kind}" for j in range(len(self.kept_layers)) for kind in ("key", "value")]
        window = ["window_attention_mask"] if self.window_slots else []
        return ["input_ids", "attention_mask", *window, *kv, *(["logits_to_keep"] if self.logits_to_keep else [])]

    @property
    def outputs(self) -> list[str]:
        kv = [f"present.{j}.{kind}" for j in range(len(self.kept_layers)) for kind in ("key", "value")]
        return ["logits", *kv]

    def to_manifest(self) -> dict:
        return {
            "inputs": self.inputs,
            "outputs": self.outputs,
            "kv_layout": "[batch, kv_heads, sequence, head_dim]",
            "kv_dtype": self.kv_dtype,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "kv_slots": [
                {"slot": j, "layer": i, **({"window": self.kv_window} if j in self.window_slots else {})}
                for j, i in enumerate(self.kept_layers)
            ],
            **({"kv_window": self.kv_window} if self.window_slots else {}),
        }


def _header_only(t: TensorProto) -> TensorProto:
    out = TensorProto(name=t.name, data_type=t.data_type, data_location=TensorProto.EXTERNAL)
    out.dims.extend(t.dims)
    out.external_data.extend(t.external_data)
    return out


class TensorSink:
    """Initializers go straight to an external-data file as they are made, so the model is never
    held twice (weights + serialized protobuf). Small tensors stay inline."""

    def __init__(self, data_path: Path) -> None:
        self.data_path = data_path
        self._file = open(data_path, "wb")  # noqa: SIM115 - closed in close()
        self.external_bytes = 0
        self.tensors: list[TensorProto] = []

    def add(self, t: TensorProto) -> None:
        raw = t.raw_data
        if len(raw) >= 1024:
            pad = (-self._file.tell()) % 64
            self._file.write(b"\0" * pad)
            offset = self._file.tell()
            self._file.write(raw)
            set_external_data(t, location=self.data_path.name, offset=offset, length=len(raw))
            # Keep a fresh header-only message, not `t` with raw_data cleared: protobuf frees a message's
            # bytes only with the message, so clearing kept every weight in memory (3.8 GB for 7B int4).
            t = _header_only(t)
            self.external_bytes += len(raw)
        self.tensors.append(t)

    def close(self) -> None:
        self._file.close()


@dataclass
class GraphWriter:
    sink: TensorSink
    quant: QuantConfig
    hessians: dict[str, np.ndarray] | None = None  # linear name → its inputs' Hessian (--int4-algo gptq)
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    _count: int = 0

    def op(
        self, op_type: str, inputs: list[str], n_out: int = 1, name: str = "", domain: str = "", **attrs
    ) -> list[str]:
        self._count += 1
        base = name or f"/{op_type}_{self._count}"
        outs = [f"{base}/out{k}" if n_out > 1 else f"{base}/out" for k in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs

    def const(self, name: str, array: np.ndarray) -> str:
        self.sink.add(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def float_const(self, name: str, array: np.ndarray) -> str:
        return self.const(name, array.astype(self.quant.float_dtype))

    def linear(
        self,
        x: str,
        weight: np.ndarray | Blocks,
        name: str,
        role: str,
        bias: np.ndarray | None = None,
        layer: int | None = None,
    ) -> str:
        """y = x @ weight.T (+ bias), weight in Hugging Face [out, in] layout (or a GGUF's own blocks).

        `layer`: for the matrices mixed precision may keep at 8 bits (QuantConfig.int8_layers)."""
        nodes, inits = self.linear_parts(x, weight, name, role, layer)
        for t in inits:
            self.sink.add(t)
        self.nodes.extend(nodes)
        out = f"{name}/MatMul/out"
        if bias is not None:
            out = self.op("Add", [out, self.float_const(f"{name}.bias", bias)], name=f"{name}/Add")[0]
        return out

    def linear_parts(
        self, x: str, weight: np.ndarray | Blocks, name: str, role: str, layer: int | None = None
    ) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
        """The nodes and initializers of `linear` (output f"{name}/MatMul/out"), not yet in the graph."""
        w_name, out = f"{name}.weight", f"{name}/MatMul/out"
        node = matmul_node(x, w_name, out, f"{name}/MatMul")
        bits = self.quant.bits_for(role, layer)
        if (
            bits == 4
            and self.quant.int4_algo == "q4_1"
            and isinstance(weight, np.ndarray)
            and weight.shape[1] % 32 == 0
        ):
            weight = quantize_q4_1(weight)
        if isinstance(weight, Blocks):
            return matmul_nbits(x, weight, w_name, out, f"{name}/MatMulNBits", self.quant.accuracy_level)
        if bits is None:
            return [node], [
                numpy_helper.from_array(np.ascontiguousarray(weight.T.astype(self.quant.float_dtype)), w_name)
            ]
        if bits == 4 and self.quant.int4_algo not in ("rtn", "q4_1"):
            hessian = (self.hessians or {}).get(name)
            return int4_matmul(
                node,
                weight.T,
                self.quant.block_size,
                self.quant.accuracy_level,
                self.quant.int4_algo,
                self.quant.symmetric,
                hessian,
            )
        return quantize_node(node, w_name, weight.T, bits, self.quant)


def write_model(
    nodes: list[onnx.NodeProto],
    sink: TensorSink,
    contract: GraphContract,
    vocab: int,
    kv_elem_type: int,
    model_path: Path,
    graph_name: str,
    opsets: list[tuple[str, int]],
    initializers: list[TensorProto] | None = None,
) -> str | None:
    """Wrap a flavour's nodes in the contract's inputs/outputs and save; every flavour ends here."""
    stored = format_named(contract.kv_dtype).stored_head_dim(contract.head_dim)  # int4: two per byte
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    if contract.window_slots:
        mask = helper.make_tensor_value_info("window_attention_mask", TensorProto.INT64, ["batch_size", WINDOW_DIMS[1]])
        inputs.append(mask)
    logits_len = "logits_sequence_length" if contract.logits_to_keep else "sequence_length"
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", logits_len, vocab])]
    for j in range(len(contract.kept_layers)):
        past, total = WINDOW_DIMS if j in contract.window_slots else ("past_sequence_length", "total_sequence_length")
        kv_in = ["batch_size", contract.kv_heads, past, stored]
        kv_out = ["batch_size", contract.kv_heads, total, stored]
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{j}.{kind}", kv_elem_type, kv_in))
            outputs.append(helper.make_tensor_value_info(f"present.{j}.{kind}", kv_elem_type, kv_out))
    if contract.logits_to_keep:
        inputs.append(helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]))
    graph = helper.make_graph(
        nodes, graph_name, inputs, outputs, initializer=sink.tensors if initializers is None else initializers
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(domain, version) for domain, version in opsets],
        producer_name="edgekit",
        ir_version=IR_VERSION,
    )
    if contract.window_slots:  # what a runtime holding only the window needs to know (runtime/kv_engine.py)
        helper.set_model_props(model, {KV_WINDOW_PROP: str(contract.kv_window)})
    return _save(model, model_path, sink)


def _save(model: onnx.ModelProto, model_path: Path, sink: TensorSink) -> str | None:
    """One self-contained .onnx for small models; otherwise .onnx + .onnx.data (see INLINE_LIMIT)."""
    if sink.external_bytes < INLINE_LIMIT:
        onnx.load_external_data_for_model(model, str(model_path.parent))
        sink.data_path.unlink()
        onnx.save_model(model, model_path)
        return None
    onnx.save_model(model, model_path)
    return sink.data_path.name
