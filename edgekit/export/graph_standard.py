"""The "standard" graph flavour: the same decoder and the same contract as `graph.py`, in plain ONNX ops.

Mobile execution providers (XNNPACK, NNAPI, CoreML, QNN) do not run onnxruntime's com.microsoft contrib
ops (GroupQueryAttention, MatMulNBits, SkipSimplifiedLayerNormalization), so for them every piece is
spelled out:

    RMSNorm       Abs → ReduceMax → Sqrt → Div·Div (x into [-1, 1]) → square → ReduceMean → Add(eps/max²)
                  → Sqrt → Div → Mul(gamma): float32 even in fp16 graphs, and no square overflows where an
                  accelerator computes that float32 in fp16 (`_Builder.rms_norm`)
    rotary        positions = CumSum(attention_mask) - 1 (so left padding works), Gather of cos/sin rows,
                  x·cos + rotate_half(x)·sin with Slice/Neg/Concat
    attention     present = Concat(past, new) along the sequence; GQA by Tile-ing K/V heads; MatMul,
                  additive causal + padding mask built from attention_mask, Softmax in float32, MatMul
    weights       fp32/fp16 as they are; int8 as per-output-channel symmetric int8 + DequantizeLinear →
                  MatMul (the QDQ form mobile EPs and onnxruntime's QDQ fusions recognise)

Inputs, outputs and KV layout are `GraphContract`'s. The one difference: head_dim is not padded here (the
padding exists only for GroupQueryAttention's CPU kernel); the manifest records the graph's head_dim.
The mask adds a large finite negative rather than -inf, so fully padded rows stay finite (no NaN can
leak into the KV cache of a fixed-shape, left-padded buffer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.checkpoint.load import Checkpoint, ModelSpec, rotary_tables
from edgekit.errors import EdgekitError
from edgekit.export.onnx_writer import OPSET, GraphContract, GraphWriter, TensorSink, write_model
from edgekit.export.quantize import QuantConfig, per_channel_int8
from edgekit.skip.skipset import SkipSet

MASK_VALUE = {TensorProto.FLOAT: -1e9, TensorProto.FLOAT16: -3e4}
INT64_MAX = np.iinfo(np.int64).max


class _Builder:
    def __init__(self, g: GraphWriter, quant: QuantConfig, fdt: int) -> None:
        self.g, self.quant, self.fdt = g, quant, fdt

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        return self.g.op(op_type, inputs, name=name, **attrs)[0]

    def i64(self, name: str, values: list[int] | int) -> str:
        # not GraphWriter.const: its np.ascontiguousarray turns a 0-d scalar into shape [1]
        self.g.sink.add(numpy_helper.from_array(np.array(values, np.int64), name))
        return name

    def linear(self, x: str, weight: np.ndarray, name: str, role: str, bias: np.ndarray | None = None) -> str:
        """y = x @ weight.T (+ bias); weight in Hugging Face [out, in] layout."""
        bits = self.quant.bits_for(role)
        w = weight.T  # [in, out]
        if bits is None:
            w_name = self.g.float_const(f"{name}.weight", w)
        elif bits == 8:
            q, scale = per_channel_int8(w)
            q_name = self.g.const(f"{name}.weight_quantized", q)
            s_name = self.g.float_const(f"{name}.weight_scale", scale)
            w_name = self.op("DequantizeLinear", [q_name, s_name], f"{name}/DequantizeLinear", axis=1)
        else:
            raise EdgekitError(f"the standard graph has no {bits}-bit weights; use --quant int8, fp16 or fp32")
        out = self.op("MatMul", [x, w_name], f"{name}/MatMul")
        if bias is not None:
            out = self.op("Add", [out, self.g.float_const(f"{name}.bias", bias)], f"{name}/Add")
        return out

    def rms_norm(self, x: str, gamma: np.ndarray, eps: float, label: str) -> str:
        """x / sqrt(mean(x²) + eps) · gamma, computed on x scaled into [-1, 1] by its row's largest |x|.

        Accelerators run float32 islands in fp16 (QNN HTP with enable_htp_fp16_precision, NNAPI relaxed,
        CoreML), where x² overflows once |x| > 256: SmolLM2's residual stream reaches 24,215, and the plain
        Pow/ReduceMean/Sqrt form zeroed those rows on QNN's simulator. Dividing by sqrt(max|x|) twice (a
        reciprocal of max|x| itself is subnormal in fp16 and flushes to zero) leaves squares ≤ 1 and a mean
        ≥ 1/hidden, so eps/max² may underflow where it is negligible. ONNX's RMSNormalization (opset 23)
        would be one node, but onnxruntime-openvino 1.24 and the mobile EPs cannot load or take it.
        """
        if self.fdt != TensorProto.FLOAT:
            x = self.op("Cast", [x], f"{label}/cast_in", to=TensorProto.FLOAT)
        peak = self.op(
            "ReduceMax",
            [self.op("Abs", [x], f"{label}/rms/Abs"), self.i64("axes_last", [-1])],
            f"{label}/rms/ReduceMax",
            keepdims=1,
        )
        peak = self.op("Max", [peak, self.g.const("norm_floor_f32", np.array(1e-3, np.float32))], f"{label}/rms/Max")
        root = self.op("Sqrt", [peak], f"{label}/rms/Sqrt_peak")
        y = self.op("Div", [self.op("Div", [x, root], f"{label}/rms/Div_root1"), root], f"{label}/rms/Div_root2")
        mean = self.op(
            "ReduceMean",
            [self.op("Mul", [y, y], f"{label}/rms/Square"), "axes_last"],
            f"{label}/rms/ReduceMean",
            keepdims=1,
        )
        eps_scaled = self.op(
            "Div",
            [
                self.op(
                    "Div", [self.g.const(f"{label}.eps", np.array(eps, np.float32)), peak], f"{label}/rms/Div_eps1"
                ),
                peak,
            ],
            f"{label}/rms/Div_eps2",
        )
        std = self.op("Sqrt", [self.op("Add", [mean, eps_scaled], f"{label}/rms/Add")], f"{label}/rms/Sqrt")
        normed = self.op("Div", [y, std], f"{label}/rms/Div")
        if self.fdt != TensorProto.FLOAT:
            normed = self.op("Cast", [normed], f"{label}/cast_out", to=self.fdt)
        return self.op("Mul", [normed, self.g.float_const(f"{label}.weight", gamma)], f"{label}/Mul")

    def heads(self, x: str, n: int, hd: int, label: str) -> str:
        """[B, S, n*hd] → [B, n, S, hd]"""
        r = self.op("Reshape", [x, self.i64(f"shape_heads_{n}_{hd}", [0, 0, n, hd])], f"{label}/Reshape")
        return self.op("Transpose", [r], f"{label}/Transpose", perm=[0, 2, 1, 3])

    def rotary(self, x: str, cos: str, sin: str, hd: int, label: str) -> str:
        half = hd // 2
        lo = self.op(
            "Slice", [x, self.i64("zero", [0]), self.i64("half", [half]), self.i64("axis3", [3])], f"{label}/lo"
        )
        hi = self.op(
            "Slice",
            [x, self.i64("half", [half]), self.i64("int64_max", [INT64_MAX]), self.i64("axis3", [3])],
            f"{label}/hi",
        )
        rot = self.op("Concat", [self.op("Neg", [hi], f"{label}/Neg"), lo], f"{label}/Concat", axis=-1)
        return self.op(
            "Add",
            [self.op("Mul", [x, cos], f"{label}/Mul_cos"), self.op("Mul", [rot, sin], f"{label}/Mul_sin")],
            f"{label}/Add",
        )


@dataclass(frozen=True)
class _StepInputs:
    """What every layer of a step shares: the rotary rows of its positions and the additive masks."""

    rotary: dict[str, tuple[str, str]]  # ModelSpec.rope_kind → (cos, sin) rows [B, 1, S, hd]
    masks: dict[int | None, str]  # sliding window (None: full attention) → additive mask [B, 1, S, T]
    context: int

    def for_layer(self, spec: ModelSpec, i: int) -> tuple[str, str, str]:
        cos, sin = self.rotary[spec.rope_kind(i)]
        return cos, sin, self.masks[spec.window(i, self.context)]


def _step_inputs(b: _Builder, g: GraphWriter, ckpt: Checkpoint, skip: SkipSet, context: int) -> _StepInputs:
    """Positions, cos/sin rows, and the additive masks [B, 1, S, T] (causal, padding, sliding window)."""
    spec = ckpt.spec
    seq = b.op("Gather", [b.op("Shape", ["input_ids"], "/pos/shape_ids"), b.i64("idx_1", 1)], "/pos/seq_len")
    total = b.op("Gather", [b.op("Shape", ["attention_mask"], "/pos/shape_mask"), b.i64("idx_1", 1)], "/pos/total_len")
    past = b.op("Sub", [total, seq], "/pos/past_len")
    cums = b.op("CumSum", ["attention_mask", b.i64("axis_1", 1)], "/pos/CumSum")
    pos_all = b.op("Max", [b.op("Sub", [cums, b.i64("one", 1)], "/pos/Sub"), b.i64("zero_s", 0)], "/pos/Max")
    neg_seq = b.op("Unsqueeze", [b.op("Neg", [seq], "/pos/Neg"), b.i64("axes_0", [0])], "/pos/neg_seq")
    positions = b.op("Slice", [pos_all, neg_seq, b.i64("int64_max", [INT64_MAX]), b.i64("axes_1", [1])], "/pos/Slice")
    rotary = {}
    for kind in sorted({spec.rope_kind(i) for i in skip.kept}):
        cos_t, sin_t = rotary_tables(ckpt, context, kind)
        sfx = f".{kind}" if kind else ""
        rows = []
        for key, table in (("cos", cos_t), ("sin", sin_t)):
            full = g.float_const(f"{key}_cache{sfx}", np.concatenate([table, table], axis=1))
            picked = b.op("Gather", [full, positions], f"/rotary/{key}{sfx}")
            rows.append(b.op("Unsqueeze", [picked, b.i64("axes_1", [1])], f"/{key}{sfx}"))
        rotary[kind] = (rows[0], rows[1])

    kpos = b.op("Range", [b.i64("zero_s", 0), total, b.i64("one", 1)], "/mask/kpos")
    qrange = b.op("Range", [b.i64("zero_s", 0), seq, b.i64("one", 1)], "/mask/qrange")
    qpos = b.op("Unsqueeze", [b.op("Add", [qrange, past], "/mask/qpos_flat"), b.i64("axes_last", [-1])], "/mask/qpos")
    causal = b.op("LessOrEqual", [kpos, qpos], "/mask/causal")  # [S, T]
    pad = b.op("Cast", ["attention_mask"], "/mask/pad_bool", to=TensorProto.BOOL)
    pad = b.op("Unsqueeze", [pad, b.i64("axes_1_2", [1, 2])], "/mask/pad")  # [B, 1, 1, T]
    zero = g.const("mask_zero", np.array(0.0, np.float32))
    minimum = g.const("mask_min", np.array(MASK_VALUE[TensorProto.FLOAT], np.float32))
    masks = {}
    for window in sorted({spec.window(i, context) for i in skip.kept}, key=lambda w: w or 0):
        allowed, sfx = causal, f"_w{window}" if window else ""
        if window:
            lo = b.op("Sub", [qpos, b.i64(f"window{sfx}", window)], f"/mask/window_lo{sfx}")
            allowed = b.op("And", [allowed, b.op("Greater", [kpos, lo], f"/mask/window{sfx}")], f"/mask/and{sfx}")
        allowed = b.op("And", [allowed, pad], f"/mask/allowed{sfx}")  # [B, 1, S, T]
        masks[window] = b.op("Where", [allowed, zero, minimum], f"/mask/additive{sfx}")
    return _StepInputs(rotary, masks, context)


def _repeat_kv(b: _Builder, t: str, n_rep: int, heads: int, hd: int, label: str) -> str:
    """[B, kv, T, hd] → [B, heads, T, hd]: each KV head repeated n_rep times (no GQA op in plain ONNX)."""
    unsqueezed = b.op("Unsqueeze", [t, b.i64("axes_2", [2])], f"{label}_unsq")
    tiled = b.op("Tile", [unsqueezed, b.i64("tile_reps", [1, 1, n_rep, 1, 1])], f"{label}_tile")
    return b.op("Reshape", [tiled, b.i64("shape_rep", [0, heads, -1, hd])], f"{label}_rep")


def _attention(
    b: _Builder, g: GraphWriter, ckpt: Checkpoint, i: int, slot: int, x: str, step: _StepInputs, fdt: int
) -> str:
    """Layer i's attention sublayer in plain ops, its KV cache in slot `slot`; returns o_proj's output."""
    spec, names, w, p = ckpt.spec, ckpt.family.names, ckpt.weights, f"/model/layers.{i}"
    hd, n_rep = spec.head_dim, spec.heads // spec.kv_heads
    cos, sin, mask = step.for_layer(spec, i)
    proj = {}
    for key, n_heads, wn in (("q", spec.heads, names.q), ("k", spec.kv_heads, names.k), ("v", spec.kv_heads, names.v)):
        bias = w.get(wn.format(i=i, p="bias")) if ckpt.family.qkv_bias else None
        y = b.linear(x, w.get(wn.format(i=i, p="weight")), f"{p}/attn/{key}_proj", "attn", bias)
        proj[key] = b.heads(y, n_heads, hd, f"{p}/attn/{key}_heads")
        if ckpt.family.qk_norm and key != "v":  # per-head RMSNorm before rotary (Qwen3)
            gamma = ckpt.norm_weight(getattr(names, f"{key}_norm").format(i=i))
            proj[key] = b.rms_norm(proj[key], gamma, spec.rms_eps, f"{p}/attn/{key}_norm")
    q = b.rotary(proj["q"], cos, sin, hd, f"{p}/attn/q_rotary")
    k = b.rotary(proj["k"], cos, sin, hd, f"{p}/attn/k_rotary")
    k_all = g.op("Concat", [f"past_key_values.{slot}.key", k], name=f"{p}/attn/k_concat", axis=2)[0]
    v_all = g.op("Concat", [f"past_key_values.{slot}.value", proj["v"]], name=f"{p}/attn/v_concat", axis=2)[0]
    g.nodes.append(helper.make_node("Identity", [k_all], [f"present.{slot}.key"], name=f"{p}/present_k"))
    g.nodes.append(helper.make_node("Identity", [v_all], [f"present.{slot}.value"], name=f"{p}/present_v"))
    if n_rep > 1:
        k_all = _repeat_kv(b, k_all, n_rep, spec.heads, hd, f"{p}/attn/k")
        v_all = _repeat_kv(b, v_all, n_rep, spec.heads, hd, f"{p}/attn/v")
    q = b.op("Mul", [q, g.float_const("attn_scale", np.array(spec.attn_scale))], f"{p}/attn/scale")
    kt = b.op("Transpose", [k_all], f"{p}/attn/k_T", perm=[0, 1, 3, 2])
    scores = b.op("MatMul", [q, kt], f"{p}/attn/scores")
    if fdt != TensorProto.FLOAT:
        scores = b.op("Cast", [scores], f"{p}/attn/scores_f32", to=TensorProto.FLOAT)
    probs = b.op("Softmax", [b.op("Add", [scores, mask], f"{p}/attn/mask")], f"{p}/attn/Softmax", axis=-1)
    if fdt != TensorProto.FLOAT:
        probs = b.op("Cast", [probs], f"{p}/attn/probs_cast", to=fdt)
    ctx = b.op("MatMul", [probs, v_all], f"{p}/attn/context")
    ctx = b.op("Transpose", [ctx], f"{p}/attn/context_T", perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", [ctx, b.i64("shape_merge", [0, 0, -1])], f"{p}/attn/context_merge")
    out = b.linear(ctx, w.get(names.o.format(i=i)), f"{p}/attn/o_proj", "attn")
    if names.attn_out_norm:  # Gemma 3 normalizes the sublayer's output before the residual add
        gamma = ckpt.norm_weight(names.attn_out_norm.format(i=i))
        out = b.rms_norm(out, gamma, spec.rms_eps, f"{p}/attn_out_norm")
    return out


def _gelu_tanh(b: _Builder, x: str, label: str) -> str:
    """0.5·x·(1 + tanh(sqrt(2/π)·(x + 0.044715·x³))) in plain ops: ONNX's Gelu(approximate="tanh") is
    opset 20, which mobile EPs do not all take."""
    g = b.g
    cube = b.op("Mul", [b.op("Mul", [x, x], f"{label}/sq"), x], f"{label}/cube")
    inner = b.op(
        "Add", [x, b.op("Mul", [cube, g.float_const("gelu_c", np.array(0.044715))], f"{label}/c")], f"{label}/in"
    )
    t = b.op(
        "Tanh",
        [b.op("Mul", [inner, g.float_const("gelu_k", np.array(math.sqrt(2 / math.pi)))], f"{label}/k")],
        f"{label}/tanh",
    )
    half_x = b.op("Mul", [x, g.float_const("gelu_half", np.array(0.5))], f"{label}/half")
    return b.op(
        "Mul", [half_x, b.op("Add", [t, g.float_const("gelu_one", np.array(1.0))], f"{label}/one")], f"{label}/out"
    )


def _mlp(b: _Builder, ckpt: Checkpoint, i: int, x: str) -> str:
    names, w, p = ckpt.family.names, ckpt.weights, f"/model/layers.{i}"
    gate = b.linear(x, w.get(names.gate.format(i=i)), f"{p}/mlp/gate_proj", "mlp")
    up = b.linear(x, w.get(names.up.format(i=i)), f"{p}/mlp/up_proj", "mlp")
    if ckpt.family.activation == "gelu_tanh":
        act = _gelu_tanh(b, gate, f"{p}/mlp/gelu")
    else:
        act = b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{p}/mlp/Sigmoid")], f"{p}/mlp/SiLU")
    out = b.linear(b.op("Mul", [act, up], f"{p}/mlp/Mul"), w.get(names.down.format(i=i)), f"{p}/mlp/down_proj", "mlp")
    if names.mlp_out_norm:
        gamma = ckpt.norm_weight(names.mlp_out_norm.format(i=i))
        out = b.rms_norm(out, gamma, ckpt.spec.rms_eps, f"{p}/mlp_out_norm")
    return out


def build_standard_decoder(
    ckpt: Checkpoint,
    skip: SkipSet,
    quant: QuantConfig,
    model_path: Path,
    max_context: int | None = None,
    on_layer: Callable[[int], None] | None = None,
) -> tuple[GraphContract, str | None]:
    """Write `model_path` in plain ONNX ops. Same signature and contract as `graph.build_decoder`."""
    if quant.keeps_gguf_blocks:
        raise EdgekitError("--quant keep needs the fused flavour (MatMulNBits); the standard graph has int8/fp16/fp32")
    if quant.mode == "int4" or quant.bits_for("lm_head") == 4:
        raise EdgekitError(
            "the standard graph (mobile EPs) has no int4 weights; use --quant int8, fp16 or fp32 with it"
        )
    if quant.int8_kernel == "dynamic":
        raise EdgekitError("--int8-kernel dynamic needs the fused flavour (its int8 MatMuls are contrib ops)")
    spec, names, w = ckpt.spec, ckpt.family.names, ckpt.weights
    fdt = TensorProto.FLOAT16 if quant.mode == "fp16" else TensorProto.FLOAT
    sink = TensorSink(model_path.with_name(model_path.name + ".data"))
    g = GraphWriter(sink, quant)
    b = _Builder(g, quant, fdt)
    contract = GraphContract(skip.kept, spec.kv_heads, spec.head_dim, "float16" if quant.mode == "fp16" else "float32")
    try:
        residual = b.op("Gather", [g.float_const("embed_tokens.weight", w.get(names.embed)), "input_ids"], "/embed")
        if ckpt.family.scaled_embedding:  # sqrt(hidden) as float32, as transformers multiplies it
            scale = g.float_const("/embed/scale", np.array(np.float32(spec.hidden**0.5)))
            residual = b.op("Mul", [residual, scale], "/embed/scale")
        step = _step_inputs(b, g, ckpt, skip, max_context or spec.max_context)
        for i in range(spec.num_layers):
            p = f"/model/layers.{i}"
            slot = skip.kv_slot(i)
            if slot is not None:  # a skipped layer's residual stream passes straight on to its MLP
                gamma = ckpt.norm_weight(names.input_norm.format(i=i))
                x = b.rms_norm(residual, gamma, spec.rms_eps, f"{p}/input_layernorm")
                residual = b.op("Add", [residual, _attention(b, g, ckpt, i, slot, x, step, fdt)], f"{p}/attn/residual")
            elif (fill := skip.fill_for(i)) is not None:  # the removed sublayer's mean output, added once
                fill_name = g.float_const(f"{p}/attn_fill", np.asarray(fill, np.float32))
                residual = b.op("Add", [residual, fill_name], f"{p}/attn_fill/add")
            gamma = ckpt.norm_weight(names.post_norm.format(i=i))
            x = b.rms_norm(residual, gamma, spec.rms_eps, f"{p}/post_attention_layernorm")
            residual = b.op("Add", [residual, _mlp(b, ckpt, i, x)], f"{p}/mlp/residual")
            if on_layer:
                on_layer(i)

        x = b.rms_norm(residual, ckpt.norm_weight(names.final_norm), spec.rms_eps, "/model/norm")
        lm_head = w.get(names.embed) if spec.tie_embeddings else w.get(names.lm_head)
        logits = b.linear(x, lm_head, "/lm_head", "lm_head")
        if fdt != TensorProto.FLOAT:
            logits = b.op("Cast", [logits], "/lm_head/cast", to=TensorProto.FLOAT)
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits"))
    finally:
        sink.close()

    return contract, write_model(
        g.nodes,
        sink,
        contract,
        spec.vocab,
        fdt,
        model_path,
        "edgekit_decoder_standard",
        [("", OPSET)],
        initializers=_dedupe(sink.tensors),
    )


def _dedupe(tensors: list[onnx.TensorProto]) -> list[onnx.TensorProto]:
    """Small shared constants (axes, shapes) are added once per use; keep the first of each name."""
    seen: dict[str, onnx.TensorProto] = {}
    for t in tensors:
        seen.setdefault(t.name, t)
    return list(seen.values())
