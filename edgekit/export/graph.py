"""Write the decoder as an ONNX graph directly from checkpoint weights, one layer at a time.

Why not `torch.onnx.export`: tracing needs the whole model in memory (several copies for a 7B model),
its output uses plain ops that decode about 2x slower on CPU than onnxruntime's fused contrib ops, and
what it emits changes with every transformers release. A Llama decoder is a short, fixed recipe, so we
emit it ourselves, in the same node layout onnxruntime-genai's model builder uses:

    Gather → [SimplifiedLayerNorm → MatMul(qkv) → GroupQueryAttention(rotary, shared KV) → MatMul(o)]
           → SkipSimplifiedLayerNorm → MatMul(gate), MatMul(up) → SiLU·up → MatMul(down) → … → lm_head

A layer whose attention sublayer is skipped emits only its post-attention norm and MLP, and has no KV
cache input or output; KV slots are numbered over the kept layers only (`past_key_values.{j}.key`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from edgekit.checkpoint.load import Checkpoint, rotary_tables
from edgekit.export.quantize import QuantConfig, matmul_node, quantize_node
from edgekit.skip.skipset import SkipSet

OPSET = 21  # int4 tensors need opset 21 / IR 10
IR_VERSION = 10
MS_DOMAIN = "com.microsoft"
FLAVOURS = ("fused", "standard")  # the fused graph (this module) and graph_standard.py
# Above this the weights stay in `model.onnx.data`. onnxruntime memory-maps external data and drops the
# pages it has repacked, whereas an inline model is parsed whole into the heap first: for the 1.1B int4
# graph, external data cut session load from 1.9 to 1.0 s and a run's peak RSS from 1.67 to 1.38 GB (issue 7).
# Small models (stories260K) stay one self-contained file. Protobuf itself caps a file at 2 GB.
INLINE_LIMIT = 64 * 1024 * 1024
GQA_HEAD_MULTIPLE = 16  # onnxruntime's CPU GroupQueryAttention needs head_size % 16 == 0


def padded_head_dim(head_dim: int) -> int:
    return -(-head_dim // GQA_HEAD_MULTIPLE) * GQA_HEAD_MULTIPLE


def pad_heads(x: np.ndarray, heads: int, head_dim: int, axis: int) -> np.ndarray:
    """Zero-pad each head along `axis` from head_dim to the GQA multiple, keeping rotary pairs intact.

    Rotary (rotate_half) pairs dimension j with j + d/2, so the real halves go to the front of each
    padded half: [a0..a3, 0.., a4..a7, 0..]. Zeros add nothing to q·k and the padded value columns meet
    zero columns of o_proj, so the attention result is unchanged; only the KV cache is wider.
    """
    pdim = padded_head_dim(head_dim)
    if pdim == head_dim:
        return x
    x = np.moveaxis(x, axis, 0)
    heads_view = x.reshape(heads, head_dim, *x.shape[1:])
    out = np.zeros((heads, pdim, *x.shape[1:]), dtype=x.dtype)
    half, phalf = head_dim // 2, pdim // 2
    out[:, :half] = heads_view[:, :half]
    out[:, phalf : phalf + half] = heads_view[:, half:]
    return np.moveaxis(out.reshape(heads * pdim, *x.shape[1:]), 0, axis)


def pad_rotary(table: np.ndarray, head_dim: int, fill: float) -> np.ndarray:
    pdim = padded_head_dim(head_dim)
    if pdim == head_dim:
        return table
    pad = np.full((table.shape[0], (pdim - head_dim) // 2), fill, dtype=table.dtype)
    return np.concatenate([table, pad], axis=1)


@dataclass(frozen=True)
class GraphContract:
    """The inputs and outputs every edgekit graph flavour has; the runtime depends on nothing else."""

    kept_layers: tuple[int, ...]
    kv_heads: int
    head_dim: int
    kv_dtype: str
    # An optional int64[1] input (default 0 = every position): logits only for the last k positions. A
    # prompt's forward needs only its last row; all rows cost a [seq, vocab] float buffer (131 MB at 1,024
    # tokens with a 32k vocabulary, 2.1 GB at 4,096 with Llama 3's 128k) and ~1% of a 1.1B prefill's time.
    # The fused flavour only: the fixed-shape mobile variants of the standard flavour need static shapes.
    logits_to_keep: bool = False

    @property
    def inputs(self) -> list[str]:
        kv = [f"past_key_values.{j}.{kind}" for j in range(len(self.kept_layers)) for kind in ("key", "value")]
        return ["input_ids", "attention_mask", *kv, *(["logits_to_keep"] if self.logits_to_keep else [])]

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
            "kv_slots": [{"slot": j, "layer": i} for j, i in enumerate(self.kept_layers)],
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

    def linear(self, x: str, weight: np.ndarray, name: str, role: str, bias: np.ndarray | None = None) -> str:
        """y = x @ weight.T (+ bias), weight in Hugging Face [out, in] layout."""
        w_name, out = f"{name}.weight", f"{name}/MatMul/out"
        node = matmul_node(x, w_name, out, f"{name}/MatMul")
        bits = self.quant.bits_for(role)
        if bits is None:
            self.float_const(w_name, weight.T)
            self.nodes.append(node)
        else:
            nodes, inits = quantize_node(node, w_name, weight.T, bits, self.quant)
            for t in inits:
                self.sink.add(t)
            self.nodes.extend(nodes)
        if bias is not None:
            out = self.op("Add", [out, self.float_const(f"{name}.bias", bias)], name=f"{name}/Add")[0]
        return out


def build_decoder(
    ckpt: Checkpoint,
    skip: SkipSet,
    quant: QuantConfig,
    model_path: Path,
    max_context: int | None = None,
    on_layer: Callable[[int], None] | None = None,
) -> tuple[GraphContract, str | None]:
    """Write `model_path` (+ `model_path.data` when large). Returns the contract and the data file's name."""
    spec, names, w = ckpt.spec, ckpt.family.names, ckpt.weights
    fdt = TensorProto.FLOAT16 if quant.mode == "fp16" else TensorProto.FLOAT
    sink = TensorSink(model_path.with_name(model_path.name + ".data"))
    g = GraphWriter(sink, quant)
    hd = padded_head_dim(spec.head_dim)
    contract = GraphContract(
        skip.kept, spec.kv_heads, hd, "float16" if quant.mode == "fp16" else "float32", logits_to_keep=True
    )
    context = max_context or spec.max_context

    try:
        # Embedding lookup.
        embed = w.get(names.embed)
        if quant.embedding_quantized:
            gather = helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["/embed/out"], name="/embed")
            nodes, inits = quantize_node(gather, "embed_tokens.weight", embed, 4, quant)
            for t in inits:
                sink.add(t)
            g.nodes.extend(nodes)
            residual = "/embed/out"
            if quant.mode == "fp16":  # scales are float32 when the table was
                residual = g.op("Cast", [residual], name="/embed/cast", to=fdt)[0]
        else:
            residual = g.op("Gather", [g.float_const("embed_tokens.weight", embed), "input_ids"], name="/embed")[0]
        lm_head = embed if spec.tie_embeddings else None
        del embed

        # GroupQueryAttention derives positions and causal masking from per-row lengths.
        mask_sum = g.op(
            "ReduceSum",
            ["attention_mask", g.const("axes_1", np.array([1], np.int64))],
            keepdims=0,
            name="/attn_mask/ReduceSum",
        )[0]
        seqlens = g.op("Sub", [mask_sum, g.const("one_i64", np.array(1, np.int64))], name="/attn_mask/Sub")[0]
        seqlens_k = g.op("Cast", [seqlens], to=TensorProto.INT32, name="/attn_mask/seqlens_k")[0]
        mask_shape = g.op("Shape", ["attention_mask"], name="/attn_mask/Shape")[0]
        total = g.op("Gather", [mask_shape, g.const("idx_1", np.array(1, np.int64))], name="/attn_mask/total")[0]
        total_len = g.op("Cast", [total], to=TensorProto.INT32, name="/attn_mask/total_i32")[0]
        if skip.kept:
            cos, sin = rotary_tables(ckpt, context)
            cos_name = g.float_const("cos_cache", pad_rotary(cos, spec.head_dim, 1.0))
            sin_name = g.float_const("sin_cache", pad_rotary(sin, spec.head_dim, 0.0))

        pending: str | None = None  # the last sublayer's output, not yet added to the residual stream

        def norm(weight_name: str, label: str) -> str:
            nonlocal residual, pending
            gamma = g.float_const(f"{label}.weight", w.get(weight_name))
            if pending is None:
                return g.op(
                    "SimplifiedLayerNormalization",
                    [residual, gamma],
                    name=f"{label}/SimplifiedLayerNorm",
                    axis=-1,
                    epsilon=spec.rms_eps,
                    stash_type=1,
                )[0]
            outs = g.op(
                "SkipSimplifiedLayerNormalization",
                [pending, residual, gamma],
                n_out=4,
                name=f"{label}/SkipLayerNorm",
                domain=MS_DOMAIN,
                epsilon=spec.rms_eps,
            )
            # outputs 1 and 2 (mean, inverse std) are unused: leave them unnamed so no buffer is kept
            g.nodes[-1].output[1] = ""
            g.nodes[-1].output[2] = ""
            residual, pending = outs[3], None
            return outs[0]

        for i in range(spec.num_layers):
            p = f"/model/layers.{i}"
            slot = skip.kv_slot(i)
            if slot is not None:
                x = norm(names.input_norm.format(i=i), f"{p}/input_layernorm")
                heads = (spec.heads, spec.kv_heads, spec.kv_heads)
                qkv_w = np.concatenate(
                    [
                        pad_heads(w.get(n.format(i=i, p="weight")), h, spec.head_dim, 0)
                        for n, h in zip((names.q, names.k, names.v), heads, strict=True)
                    ]
                )
                qkv_b = None
                if ckpt.family.qkv_bias:
                    qkv_b = np.concatenate(
                        [
                            pad_heads(w.get(n.format(i=i, p="bias")), h, spec.head_dim, 0)
                            for n, h in zip((names.q, names.k, names.v), heads, strict=True)
                        ]
                    )
                qkv = g.linear(x, qkv_w, f"{p}/attn/qkv_proj", "attn", qkv_b)
                del qkv_w
                attn_outs = [f"{p}/attn/GQA/out", f"present.{slot}.key", f"present.{slot}.value"]
                g.nodes.append(
                    helper.make_node(
                        "GroupQueryAttention",
                        [
                            qkv,
                            "",
                            "",
                            f"past_key_values.{slot}.key",
                            f"past_key_values.{slot}.value",
                            seqlens_k,
                            total_len,
                            cos_name,
                            sin_name,
                        ],
                        attn_outs,
                        name=f"{p}/attn/GQA",
                        domain=MS_DOMAIN,
                        num_heads=spec.heads,
                        kv_num_heads=spec.kv_heads,
                        scale=1.0 / math.sqrt(spec.head_dim),
                        do_rotary=1,
                        rotary_interleaved=0,
                        local_window_size=spec.sliding_window
                        if spec.sliding_window and spec.sliding_window < context
                        else -1,
                    )
                )
                o_w = pad_heads(w.get(names.o.format(i=i)), spec.heads, spec.head_dim, 1)
                pending = g.linear(attn_outs[0], o_w, f"{p}/attn/o_proj", "attn")
            x = norm(names.post_norm.format(i=i), f"{p}/post_attention_layernorm")
            gate = g.linear(x, w.get(names.gate.format(i=i)), f"{p}/mlp/gate_proj", "mlp")
            up = g.linear(x, w.get(names.up.format(i=i)), f"{p}/mlp/up_proj", "mlp")
            sig = g.op("Sigmoid", [gate], name=f"{p}/mlp/act/Sigmoid")[0]
            silu = g.op("Mul", [gate, sig], name=f"{p}/mlp/act/Mul")[0]
            act = g.op("Mul", [silu, up], name=f"{p}/mlp/Mul")[0]
            pending = g.linear(act, w.get(names.down.format(i=i)), f"{p}/mlp/down_proj", "mlp")
            if on_layer:
                on_layer(i)

        x = norm(names.final_norm, "/model/norm")
        # Slice(x, -k, end) on the sequence axis: k = 0 slices from 0, i.e. keeps every position.
        keep = g.const("logits_to_keep", np.array([0], np.int64))  # also a graph input: this is its default
        start = g.op("Neg", [keep], name="/logits_to_keep/neg")[0]
        end = g.const("/logits_to_keep/end", np.array([2**62], np.int64))
        axis = g.const("/logits_to_keep/axis", np.array([1], np.int64))
        x = g.op("Slice", [x, start, end, axis], name="/logits_to_keep/slice")[0]
        if lm_head is None:
            lm_head = w.get(names.lm_head)
        logits = g.linear(x, lm_head, "/lm_head", "lm_head")
        del lm_head
        if quant.mode == "fp16":
            logits = g.op("Cast", [logits], to=TensorProto.FLOAT, name="/lm_head/cast")[0]
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits"))
    finally:
        sink.close()

    opsets = [("", OPSET), (MS_DOMAIN, 1)]
    return contract, write_model(g.nodes, sink, contract, spec.vocab, fdt, model_path, "edgekit_decoder", opsets)


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
    kv_in = ["batch_size", contract.kv_heads, "past_sequence_length", contract.head_dim]
    kv_out = ["batch_size", contract.kv_heads, "total_sequence_length", contract.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ]
    logits_len = "logits_sequence_length" if contract.logits_to_keep else "sequence_length"
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", logits_len, vocab])]
    for j in range(len(contract.kept_layers)):
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
