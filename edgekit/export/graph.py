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

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper

from edgekit.checkpoint.load import Checkpoint
from edgekit.errors import EdgekitError
from edgekit.export.attention_inputs import AttentionInputs, attention_inputs, window_slots
from edgekit.export.gguf_blocks import Blocks, KeptWeights, gather_blocks, stack_rows
from edgekit.export.heads import GQA_HEAD_MULTIPLE, pad_heads, padded_head_dim
from edgekit.export.kv_cache import KVScales, format_named
from edgekit.export.onnx_writer import MS_DOMAIN, OPSET, GraphContract, GraphWriter, TensorSink, write_model
from edgekit.export.quantize import QuantConfig, quantize_node
from edgekit.export.tied import shared_gather, shares_table
from edgekit.skip.skipset import SkipSet

FLAVOURS = ("fused", "standard")  # the fused graph (this module) and graph_standard.py


def graph_manifest(contract: GraphContract, data_file: str | None) -> dict[str, Any]:
    """The manifest's graph section for the fused flavour (export.device rewrites it for the standard one)."""
    value_bytes = format_named(contract.kv_dtype).bytes_per_value()
    slot_bytes = 2 * contract.kv_heads * contract.head_dim * value_bytes  # one slot's key + value, one position
    growing = len(contract.kept_layers) - len(contract.window_slots)
    window = {"kv_window_bytes": int(slot_bytes * len(contract.window_slots) * contract.kv_window)}
    return {
        "file": "model.onnx",
        "external_data": data_file,
        "flavour": "fused",
        "opset": OPSET,
        "contrib_ops": [
            "GroupQueryAttention",
            "SkipSimplifiedLayerNormalization",
            "MatMulNBits",
            "GatherBlockQuantized",
        ],
        **contract.to_manifest(),
        # window-sized slots (--kv-window) hold a fixed kv_window_bytes (the runtime adds one chunk's room)
        "kv_bytes_per_token": int(slot_bytes * growing),
        **(window if contract.window_slots else {}),
    }


class _ResidualStream:
    """The residual stream plus the last sublayer's output, not yet added to it: the next norm adds it,
    fused into one SkipSimplifiedLayerNormalization (the add and the RMSNorm in one pass over memory)."""

    def __init__(self, g: GraphWriter, residual: str, eps: float) -> None:
        self.g, self.residual, self.eps = g, residual, eps
        self.pending: str | None = None
        self.bias: str | None = None  # a removed sublayer's fill, added by the next norm

    def norm(self, gamma: np.ndarray, label: str) -> str:
        g = self.g
        weight = g.float_const(f"{label}.weight", gamma)
        if self.bias is not None and self.pending is None:  # nothing to fuse with: one Add
            self.residual = g.op("Add", [self.residual, self.bias], name=f"{label}/fill")[0]
            self.bias = None
        if self.pending is None:
            return g.op(
                "SimplifiedLayerNormalization",
                [self.residual, weight],
                name=f"{label}/SimplifiedLayerNorm",
                axis=-1,
                epsilon=self.eps,
                stash_type=1,
            )[0]
        bias, self.bias = self.bias, None
        outs = g.op(
            "SkipSimplifiedLayerNormalization",
            [self.pending, self.residual, weight, *([bias] if bias else [])],
            n_out=4,
            name=f"{label}/SkipLayerNorm",
            domain=MS_DOMAIN,
            epsilon=self.eps,
        )
        # outputs 1 and 2 (mean, inverse std) are unused: leave them unnamed so no buffer is kept
        g.nodes[-1].output[1] = ""
        g.nodes[-1].output[2] = ""
        self.residual, self.pending = outs[3], None
        return outs[0]


def _embedding(g: GraphWriter, ckpt: Checkpoint, quant: QuantConfig, fdt: int) -> tuple[str, Any]:
    """The token embedding's output, and the table itself when lm_head is tied to it (read once). Where
    the two share one quantized table (tied.py), nothing is emitted yet: _lm_head puts the lookup here."""
    embed = ckpt.weights.get(ckpt.family.names.embed)
    if shares_table(quant, ckpt.spec.tie_embeddings, ckpt.spec.hidden):
        return "/embed/out", embed.dequantize() if isinstance(embed, Blocks) else embed
    if isinstance(embed, Blocks) and embed.bits == 8:  # --quant keep: a Q8_0 table as it is
        node, inits = gather_blocks(embed, "embed_tokens.weight", "input_ids", "/embed/out", "/embed")
        for t in inits:
            g.sink.add(t)
        g.nodes.append(node)
        return "/embed/out", (embed if ckpt.spec.tie_embeddings else None)
    if isinstance(embed, Blocks):  # a 4-bit GGUF table: requantized below (GatherBlockQuantized has no offsets)
        embed = embed.dequantize()
    if quant.embedding_quantized:
        gather = helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["/embed/out"], name="/embed")
        nodes, inits = quantize_node(gather, "embed_tokens.weight", embed, 4, quant)
        for t in inits:
            g.sink.add(t)
        g.nodes.extend(nodes)
        out = "/embed/out"
        if quant.mode == "fp16":  # scales are float32 when the table was
            out = g.op("Cast", [out], name="/embed/cast", to=fdt)[0]
    else:
        out = g.op("Gather", [g.float_const("embed_tokens.weight", embed), "input_ids"], name="/embed")[0]
    return out, (embed if ckpt.spec.tie_embeddings else None)


def _norm(g: GraphWriter, x: str, gamma: np.ndarray, eps: float, label: str) -> str:
    """A plain RMSNorm with no residual add: per-head q/k norms and Gemma's sublayer-output norms."""
    return g.op(
        "SimplifiedLayerNormalization",
        [x, g.float_const(f"{label}.weight", gamma)],
        name=f"{label}/SimplifiedLayerNorm",
        axis=-1,
        epsilon=eps,
        stash_type=1,
    )[0]


def _normed_heads(g: GraphWriter, ckpt: Checkpoint, i: int, q: str, k: str) -> list[str]:
    """q and k RMS-normalized per head (Qwen3, Gemma 3), for GQA to rotate.

    onnxruntime 1.32's GroupQueryAttention declares q_norm_weight/k_norm_weight inputs, but its CPU kernel
    refuses them ("implemented only on the CUDA and WebGPU EPs"), so the norms are nodes of their own.
    """
    spec, names, p = ckpt.spec, ckpt.family.names, f"/model/layers.{i}/attn"
    if padded_head_dim(spec.head_dim) != spec.head_dim:
        raise EdgekitError(
            f"unsupported: per-head q/k norms with head_dim {spec.head_dim} (the fused graph pads heads to a "
            f"multiple of {GQA_HEAD_MULTIPLE}, which changes the norm): use --flavour standard"
        )
    out = []
    for key, x, heads, gamma in (("q", q, spec.heads, names.q_norm), ("k", k, spec.kv_heads, names.k_norm)):
        split = g.op("Reshape", [x, g.const(f"{p}/{key}_heads_shape", np.array([0, 0, heads, -1], np.int64))])[0]
        normed = _norm(g, split, ckpt.norm_weight(gamma.format(i=i)), spec.rms_eps, f"{p}/{key}_norm")
        out.append(g.op("Reshape", [normed, g.const(f"{p}/{key}_merge_shape", np.array([0, 0, -1], np.int64))])[0])
    return out


def _projections(g: GraphWriter, ckpt: Checkpoint, i: int, x: str) -> list[str]:
    """GroupQueryAttention's first three inputs: [packed qkv, "", ""], or [q, k, v] where they must be
    apart: per-head q/k norms, or a layer whose v_proj mixed precision keeps at 8 bits (QuantConfig.int8_layers;
    q and k stay one 4-bit MatMul)."""
    spec, names, w, p = ckpt.spec, ckpt.family.names, ckpt.weights, f"/model/layers.{i}/attn"
    heads = {names.q: spec.heads, names.k: spec.kv_heads, names.v: spec.kv_heads}

    def stacked(parts: tuple[str, ...], kind: str) -> np.ndarray:
        arrays = [pad_heads(w.get(n.format(i=i, p=kind)), heads[n], spec.head_dim, 0) for n in parts]
        return stack_rows(arrays) if kind == "weight" else np.concatenate(arrays)

    def linear(parts: tuple[str, ...], name: str, layer: int | None) -> str:
        bias = stacked(parts, "bias") if ckpt.family.qkv_bias else None
        return g.linear(x, stacked(parts, "weight"), f"{p}/{name}", "attn", bias, layer=layer)

    hd = padded_head_dim(spec.head_dim)
    q_out, kv_out = spec.heads * hd, spec.kv_heads * hd
    if g.quant.bits_for("attn", i) != g.quant.bits_for("attn"):  # v_proj raised, as llama.cpp's Q4_K_M does
        qk = linear((names.q, names.k), "qk_proj", None)
        q, k = g.op(
            "Split", [qk, g.const(f"{p}/qk_sizes", np.array([q_out, kv_out], np.int64))], 2, f"{p}/qk_split", axis=-1
        )
        v = linear((names.v,), "v_proj", i)
    else:
        qkv = linear((names.q, names.k, names.v), "qkv_proj", None)
        if not ckpt.family.qk_norm:
            return [qkv, "", ""]
        sizes = np.array([q_out, kv_out, kv_out], np.int64)
        q, k, v = g.op("Split", [qkv, g.const(f"{p}/qkv_sizes", sizes)], 3, f"{p}/qkv_split", axis=-1)
    if ckpt.family.qk_norm:
        q, k = _normed_heads(g, ckpt, i, q, k)
    return [q, k, v]


def _attention(g: GraphWriter, ckpt: Checkpoint, i: int, slot: int, x: str, a: AttentionInputs) -> str:
    """Layer i's attention sublayer (fused QKV → GroupQueryAttention → o_proj) on KV-cache slot `slot`."""
    spec, names, w, p = ckpt.spec, ckpt.family.names, ckpt.weights, f"/model/layers.{i}"
    qkv_inputs = _projections(g, ckpt, i, x)
    attn_outs = [f"{p}/attn/GQA/out", f"present.{slot}.key", f"present.{slot}.value"]
    past = [f"past_key_values.{slot}.key", f"past_key_values.{slot}.value"]
    window = spec.window(i, a.context) or -1
    cos, sin = a.rotary[spec.rope_kind(i)]
    lengths, positions = [a.seqlens_k, a.total_len], ""
    if a.window_lengths and window > 0:  # a window-sized cache: its own lengths, positions given
        lengths, positions = list(a.window_lengths), a.position_ids or ""
    quantized: dict[str, Any] = {}
    extra = [positions] if positions else []  # input 9; 10-11 (attention_bias, head_sink) stay empty
    if a.kv_scales is not None:
        quantized = {
            "k_quant_type": "PER_CHANNEL",
            "v_quant_type": "PER_CHANNEL",
            "kv_cache_bit_width": a.kv_scales.bits,
        }
        # float32 even in an fp16 graph: GroupQueryAttention's scale type
        extra = [positions, "", "", g.const(f"{p}/attn/k_scale", a.kv_scales.key[slot])]
        extra.append(g.const(f"{p}/attn/v_scale", a.kv_scales.value[slot]))
    g.nodes.append(
        helper.make_node(
            "GroupQueryAttention",
            [*qkv_inputs, *past, *lengths, cos, sin, *extra],
            attn_outs,
            name=f"{p}/attn/GQA",
            domain=MS_DOMAIN,
            num_heads=spec.heads,
            kv_num_heads=spec.kv_heads,
            scale=spec.attn_scale,
            do_rotary=1,
            rotary_interleaved=0,
            local_window_size=window,
            **quantized,
        )
    )
    o_w = pad_heads(w.get(names.o.format(i=i)), spec.heads, spec.head_dim, 1)
    out = g.linear(attn_outs[0], o_w, f"{p}/attn/o_proj", "attn")
    if names.attn_out_norm:  # Gemma 3 normalizes the sublayer's output before the residual add
        out = _norm(g, out, ckpt.norm_weight(names.attn_out_norm.format(i=i)), spec.rms_eps, f"{p}/attn_out_norm")
    return out


def _mlp(g: GraphWriter, ckpt: Checkpoint, i: int, x: str) -> str:
    """Layer i's gated feed-forward sublayer: SwiGLU, or GeGLU with tanh GELU (Gemma)."""
    names, w, p = ckpt.family.names, ckpt.weights, f"/model/layers.{i}"
    gate = g.linear(x, w.get(names.gate.format(i=i)), f"{p}/mlp/gate_proj", "mlp")
    up = g.linear(x, w.get(names.up.format(i=i)), f"{p}/mlp/up_proj", "mlp")
    if ckpt.family.activation == "gelu_tanh":  # FastGelu is onnxruntime's tanh-approximated GELU
        act = g.op("FastGelu", [gate], name=f"{p}/mlp/act/FastGelu", domain=MS_DOMAIN)[0]
    else:
        sig = g.op("Sigmoid", [gate], name=f"{p}/mlp/act/Sigmoid")[0]
        act = g.op("Mul", [gate, sig], name=f"{p}/mlp/act/Mul")[0]
    gated = g.op("Mul", [act, up], name=f"{p}/mlp/Mul")[0]
    out = g.linear(gated, w.get(names.down.format(i=i)), f"{p}/mlp/down_proj", "mlp", layer=i)
    if names.mlp_out_norm:
        out = _norm(g, out, ckpt.norm_weight(names.mlp_out_norm.format(i=i)), ckpt.spec.rms_eps, f"{p}/mlp_out_norm")
    return out


def _lm_head(
    g: GraphWriter, ckpt: Checkpoint, quant: QuantConfig, x: str, tied: np.ndarray | None, embed_at: int
) -> None:
    # Slice(x, -k, end) on the sequence axis: k = 0 slices from 0, i.e. keeps every position.
    keep = g.const("logits_to_keep", np.array([0], np.int64))  # also a graph input: this is its default
    start = g.op("Neg", [keep], name="/logits_to_keep/neg")[0]
    end = g.const("/logits_to_keep/end", np.array([2**62], np.int64))
    axis = g.const("/logits_to_keep/axis", np.array([1], np.int64))
    x = g.op("Slice", [x, start, end, axis], name="/logits_to_keep/slice")[0]
    weight = tied if tied is not None else ckpt.weights.get(ckpt.family.names.lm_head)
    if shares_table(quant, ckpt.spec.tie_embeddings, ckpt.spec.hidden):  # the lookup reads lm_head's weight
        nodes, inits = g.linear_parts(x, weight, "/lm_head", "lm_head")
        lookup, lookup_inits = shared_gather(nodes, inits, "input_ids", "/embed/out")
        for t in [*inits, *lookup_inits]:
            g.sink.add(t)
        g.nodes[embed_at:embed_at] = lookup
        g.nodes.extend(nodes)
        logits = "/lm_head/MatMul/out"
    else:
        logits = g.linear(x, weight, "/lm_head", "lm_head")
    del weight
    if quant.mode == "fp16":
        logits = g.op("Cast", [logits], to=TensorProto.FLOAT, name="/lm_head/cast")[0]
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits"))


def _with_kept_blocks(ckpt: Checkpoint) -> Checkpoint:
    if not ckpt.from_gguf:
        raise EdgekitError("--quant keep keeps a GGUF's own quantized blocks; give a .gguf model, or use int4/int8")
    if padded_head_dim(ckpt.spec.head_dim) != ckpt.spec.head_dim:
        raise EdgekitError(
            f"--quant keep: head_dim {ckpt.spec.head_dim} must be padded to a multiple of {GQA_HEAD_MULTIPLE} for "
            "GroupQueryAttention, which GGUF blocks cannot be; use --quant int4"
        )
    return replace(ckpt, weights=KeptWeights(ckpt.weights))


def build_decoder(
    ckpt: Checkpoint,
    skip: SkipSet,
    quant: QuantConfig,
    model_path: Path,
    max_context: int | None = None,
    on_layer: Callable[[int], None] | None = None,
    hessians: dict[str, np.ndarray] | None = None,
    kv_scales: KVScales | None = None,
) -> tuple[GraphContract, str | None]:
    """Write `model_path` (+ `model_path.data` when large). Returns the contract and the data file's name.

    `hessians`: each linear's input Hessian, for the quantizers that need calibration (export/calibrate.py).
    `kv_scales`: for an int8/int4 cache (`quant.kv_cache`), its calibrated scales (export/kv_cache.py)."""
    spec, names = ckpt.spec, ckpt.family.names
    fdt = TensorProto.FLOAT16 if quant.mode == "fp16" else TensorProto.FLOAT
    sink = TensorSink(model_path.with_name(model_path.name + ".data"))
    g = GraphWriter(sink, quant, hessians)
    hd = padded_head_dim(spec.head_dim)
    kv = quant.kv_format()
    if kv.quantized and kv_scales is None and skip.kept:
        raise EdgekitError(f"--kv-cache {quant.kv_cache} needs calibrated scales (edgekit.export.kv_cache)")
    context = max_context or spec.max_context
    windows, window = window_slots(ckpt, skip, context) if quant.kv_window and skip.kept else ((), 0)
    contract = GraphContract(skip.kept, spec.kv_heads, hd, kv.name, True, windows, window)
    if quant.keeps_gguf_blocks:
        ckpt = _with_kept_blocks(ckpt)
    try:
        embed_at = len(g.nodes)
        embedded, tied = _embedding(g, ckpt, quant, fdt)
        if ckpt.family.scaled_embedding:  # sqrt(hidden) as float32, as transformers multiplies it
            scale = g.float_const("/embed/scale", np.array(np.float32(spec.hidden**0.5)))
            embedded = g.op("Mul", [embedded, scale], name="/embed/scale")[0]
        step = attention_inputs(g, ckpt, skip, context, kv_scales if kv.quantized else None, bool(windows))
        stream = _ResidualStream(g, embedded, spec.rms_eps)
        for i in range(spec.num_layers):
            p = f"/model/layers.{i}"
            slot = skip.kv_slot(i)
            if slot is not None:  # a skipped layer's residual stream passes straight on to its MLP
                x = stream.norm(ckpt.norm_weight(names.input_norm.format(i=i)), f"{p}/input_layernorm")
                stream.pending = _attention(g, ckpt, i, slot, x, step)
            elif (fill := skip.fill_for(i)) is not None:  # ... plus the removed sublayer's mean output
                stream.bias = g.float_const(f"{p}/attn_fill", np.asarray(fill, np.float32))
            x = stream.norm(ckpt.norm_weight(names.post_norm.format(i=i)), f"{p}/post_attention_layernorm")
            stream.pending = _mlp(g, ckpt, i, x)
            if on_layer:
                on_layer(i)
        _lm_head(g, ckpt, quant, stream.norm(ckpt.norm_weight(names.final_norm), "/model/norm"), tied, embed_at)
        del tied
    finally:
        sink.close()

    opsets = [("", OPSET), (MS_DOMAIN, 1)]
    return contract, write_model(
        g.nodes, sink, contract, spec.vocab, kv.elem_type, model_path, "edgekit_decoder", opsets
    )
