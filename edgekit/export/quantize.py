"""Weight quantization with onnxruntime's own quantizer, applied one weight at a time.

We call onnxruntime's `DefaultWeightOnlyQuantizer` (the engine inside `MatMulNBitsQuantizer`) on each
MatMul/Gather as the graph builder emits it, instead of running `MatMulNBitsQuantizer` over a finished
fp32 model: the result is the same nodes and bytes, but the fp32 weights of the whole model never have
to sit in memory at once, which is what lets a 7B model export on a laptop.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgekit.errors import EdgekitError
from edgekit.export.int4 import AUTO, INT4_ALGOS
from edgekit.export.kv_cache import KV_CACHES, KVFormat, kv_format

QUANT_MODES = ("fp32", "fp16", "int8", "int4", "keep")  # keep: a GGUF's own blocks (gguf_blocks.py)
# How int8 MatMuls run. "blockwise": MatMulNBits, blocks of --block-size, int8 activations per block.
# "dynamic": int8 weights per output channel, activations quantized per tensor at run time
# (DynamicQuantizeLinear + MatMulIntegerToFloat, MLAS's QGEMM). Same decode speed, but QGEMM prefills
# 2.3-2.6x faster than MatMulNBits' int8-compute GEMM (256 rows, bench/kernels.py); per-tensor activation
# scales are coarser, so large models with activation outliers may lose more quality (LLM.int8).
INT8_KERNELS = ("blockwise", "dynamic")
# How int4 weights are rounded: see int4.py (rtn, kquant, hqq, gptq: onnxruntime's quantizers; q4_1:
# llama.cpp's, with block offsets).


# Which matrices of an int4 export keep 8 bits. "q4_k_m": llama.cpp's rule for its Q4_K_M files
# (use_more_bits in src/llama-quant.cpp: the first and last eighth of the layers and every third layer
# between), applied as there to each such layer's v_proj (split from the packed q/k projection) and
# down_proj; llama.cpp gives those Q6_K, MatMulNBits has no 6 bits, so they get 8. Not the default: on
# SmolLM2 it lowers held-out perplexity and KL, yet the instruct model answered fewer of 78 factual chat
# questions (46 against all-4-bit GPTQ's 50; BENCHMARKS.md, "int4").
INT4_MIXES = ("none", "q4_k_m")


def more_bits_layers(mix: str, num_layers: int) -> tuple[int, ...]:
    """The layers whose qkv and down projections an int4 export keeps at 8 bits under `mix`."""
    if mix == "none":
        return ()
    eighth = num_layers // 8
    return tuple(i for i in range(num_layers) if i < eighth or i >= 7 * num_layers // 8 or (i - eighth) % 3 == 2)


INT4_DESCRIPTIONS = {
    "kquant": "onnxruntime k-quant (quant_tensor_k_quant), uint8 zero points",
    "hqq": "onnxruntime HQQ, zero points rounded to integers and scales refitted (edgekit.export.int4)",
    "gptq": "GPTQ (edgekit.export.int4: act order, per-token Hessian on --calib text), uint8 zero points",
    "q4_1": "llama.cpp's Q4_1 (gguf.quants) as MatMulNBits + block offsets",
}


@dataclass(frozen=True)
class QuantConfig:
    mode: str = "fp32"
    block_size: int = 32
    # MatMulNBits accuracy_level 4 computes with int8 activations: the fastest CPU path (MLAS).
    accuracy_level: int = 4
    symmetric: bool = False
    lm_head_bits: int | None = None  # None: the same as the other MatMuls
    quantize_embedding: bool = True  # int4 only: GatherBlockQuantized
    int8_kernel: str = "blockwise"  # int8 only; see INT8_KERNELS
    int4_algo: str = AUTO  # int4 (and keep's fallback) only; see int4.py; the pipeline resolves "auto"
    kv_cache: str = "auto"  # the KV cache's element type (kv_cache.py); auto: the activations' float type
    int4_mix: str = "none"  # int4 only: which matrices keep 8 bits (INT4_MIXES); resolved to int8_layers
    int8_layers: tuple[int, ...] = ()  # layers whose qkv and down_proj are 8-bit in an int4 export
    kv_window: bool = False  # sliding-window layers cache only their window (attention_inputs.py)

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise EdgekitError(f"unknown quantization '{self.mode}'; choose one of {', '.join(QUANT_MODES)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise EdgekitError(f"--block-size {self.block_size}: must be a power of two, at least 16")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise EdgekitError(f"--accuracy-level {self.accuracy_level}: must be 0-4")
        if self.lm_head_bits not in (None, 4, 8, 32):
            raise EdgekitError(f"--lm-head-bits {self.lm_head_bits}: must be 4, 8 or 32")
        if self.int8_kernel not in INT8_KERNELS:
            raise EdgekitError(f"--int8-kernel {self.int8_kernel}: choose one of {', '.join(INT8_KERNELS)}")
        if self.int8_kernel == "dynamic" and self.mode != "int8":
            raise EdgekitError("--int8-kernel dynamic needs --quant int8")
        if self.int4_algo not in (*INT4_ALGOS, AUTO):
            raise EdgekitError(f"--int4-algo {self.int4_algo}: choose one of {', '.join(INT4_ALGOS)}")
        if self.int4_algo == "q4_1" and (self.block_size != 32 or self.symmetric):
            raise EdgekitError("--int4-algo q4_1 has blocks of 32 with a float minimum: no --block-size or --symmetric")
        if self.kv_cache not in KV_CACHES:
            raise EdgekitError(f"--kv-cache {self.kv_cache}: choose one of {', '.join(KV_CACHES)}")
        self.kv_format()  # refuses a float cache of the other type than the activations
        if self.int4_mix not in INT4_MIXES:
            raise EdgekitError(f"--int4-mix {self.int4_mix}: choose one of {', '.join(INT4_MIXES)}")
        if self.int4_mix != "none" and self.mode != "int4":
            raise EdgekitError(
                f"--int4-mix {self.int4_mix} mixes 8-bit matrices into an int4 export: needs --quant int4"
            )
        if self.int4_algo in ("kquant", "hqq") and self.symmetric:
            raise EdgekitError(f"--int4-algo {self.int4_algo} fits a zero point per block: not with --symmetric")

    @property
    def bits(self) -> int | None:
        # keep: the GGUF's blocks stay as they are; what has none that MatMulNBits runs is quantized to 4 bits
        return {"int8": 8, "int4": 4, "keep": 4}.get(self.mode)

    @property
    def keeps_gguf_blocks(self) -> bool:
        return self.mode == "keep"

    def kv_format(self, flavour: str = "fused") -> KVFormat:
        if self.kv_window and flavour == "standard":
            raise EdgekitError(
                "--kv-window: the standard graph's cache is plain Concat ops over the whole sequence; use "
                "--flavour fused (GroupQueryAttention)"
            )
        return kv_format(self.kv_cache, self.mode, flavour)

    @property
    def float_dtype(self) -> np.dtype:
        return np.dtype(np.float16) if self.mode == "fp16" else np.dtype(np.float32)

    def bits_for(self, role: str, layer: int | None = None) -> int | None:
        """Bits for a MatMul weight of the given role ('attn', 'mlp', 'lm_head'); None keeps it float.

        `layer`: given for the matrices mixed precision may raise (qkv, down_proj), see int8_layers."""
        if self.bits is None:
            return None
        if role == "lm_head" and self.lm_head_bits is not None:
            return None if self.lm_head_bits == 32 else self.lm_head_bits
        if self.mode == "int4" and layer is not None and layer in self.int8_layers:
            return 8
        return self.bits

    @property
    def embedding_quantized(self) -> bool:
        # onnxruntime's quantizer writes GatherBlockQuantized for 4 bits only.
        return self.bits == 4 and self.quantize_embedding

    def to_manifest(self, shared_table: bool = False) -> dict:
        """`shared_table`: the embedding reads lm_head's quantized weight (export/tied.py)."""
        d = asdict(self)
        d["bits"] = self.bits
        d["kv_cache"] = self.kv_format().name
        d["embedding"] = f"int4 block {self.block_size}" if self.embedding_quantized else str(self.float_dtype)
        d["lm_head"] = f"int{self.bits_for('lm_head')}" if self.bits_for("lm_head") else str(self.float_dtype)
        if shared_table:
            d["embedding"] = f"lm_head's {d['lm_head']} table, shared (GatherBlockQuantized)"
        d["quantizer"] = "onnxruntime DefaultWeightOnlyQuantizer (MatMulNBits / GatherBlockQuantized)"
        if self.int8_kernel == "dynamic":
            d["quantizer"] = "per-channel symmetric int8 (DynamicQuantizeLinear + MatMulIntegerToFloat)"
        if self.bits == 4 and self.int4_algo not in ("rtn", AUTO):
            d["quantizer"] += "; 4-bit MatMuls: " + INT4_DESCRIPTIONS[self.int4_algo]
        if self.keeps_gguf_blocks:
            d["lm_head"] = d["embedding"] = "as stored in the GGUF (see source.gguf.tensor_type_by_name)"
            d["scheme"] = (
                "GGUF blocks kept: Q4_0/Q8_0 → MatMulNBits (default zero points), Q4_1 → MatMulNBits (q − 8) plus "
                "block sums × (m + 8d), Q8_0 embedding → GatherBlockQuantized; other tensors: float if stored "
                "float, else "
                f"int4 block {self.block_size} (onnxruntime)"
            )
            d["quantizer"] = "edgekit.export.gguf_blocks (no requantization) + onnxruntime for the rest"
        return d


def _ort_quantizer(bits: int, cfg: QuantConfig):
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    # onnxruntime logs every node it quantizes at INFO level through the root logger.
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    return DefaultWeightOnlyQuantizer(
        DefaultWeightOnlyQuantConfig(
            block_size=cfg.block_size,
            is_symmetric=cfg.symmetric,
            accuracy_level=cfg.accuracy_level,
            bits=bits,
            op_types_to_quantize=("MatMul", "Gather"),
            quant_axes=(("MatMul", 0), ("Gather", 1)),
        )
    )


def quantize_node(
    node: onnx.NodeProto, weight_name: str, weight: np.ndarray, bits: int, cfg: QuantConfig
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Run onnxruntime's quantizer on one MatMul (weight [K, N]) or Gather (table [V, H]) node.

    Returns the replacement nodes and their initializers; the float weight is not among them.
    """
    if bits == 8 and cfg.int8_kernel == "dynamic" and node.op_type == "MatMul":
        return dynamic_int8_matmul(node, weight_name, weight)
    scratch = onnx.GraphProto()
    scratch.initializer.append(numpy_helper.from_array(_contiguous_f32(weight), weight_name))
    # An all-zero block (an embedding's padding row: Gemma's pad token) has scale 0; onnxruntime divides
    # by it and then picks its np.where fallback, so the NaN is discarded but numpy warns.
    with np.errstate(divide="ignore", invalid="ignore"):
        nodes = _ort_quantizer(bits, cfg).quantize(node, [scratch])
    if len(nodes) == 1 and nodes[0].op_type == node.op_type:
        raise EdgekitError(f"onnxruntime could not quantize {weight_name} to {bits} bits")
    # Copy the results out: a message taken from `scratch` keeps scratch's whole arena alive, and with it
    # the fp32 weight (measured: the 7B export grew by every weight it had quantized, 27 GB in all).
    return list(nodes), [_detached(t) for t in scratch.initializer if t.name != weight_name]


def per_channel_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column of a [K, N] weight: (int8 [K, N], float32 scale [N]).

    Written here rather than taken from onnxruntime's quantizer: that one works on whole models, and
    the export quantizes one weight at a time as it streams (see the module docstring)."""
    scale = (np.abs(weight).max(axis=0) / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    return np.clip(np.rint(weight / scale), -127, 127).astype(np.int8), scale


def dynamic_int8_matmul(
    node: onnx.NodeProto, weight_name: str, weight: np.ndarray
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """MatMul → DynamicQuantizeLinear(x) + MatMulIntegerToFloat(x_q, W_q, x_scale, W_scale, x_zero)."""
    q, scale = per_channel_int8(_contiguous_f32(weight))
    q_name, s_name, base = f"{weight_name}_quantized", f"{weight_name}_scale", node.name or node.output[0]
    x_q, x_scale, x_zero = (f"{base}/x_{part}" for part in ("quantized", "scale", "zero_point"))
    nodes = [
        helper.make_node("DynamicQuantizeLinear", [node.input[0]], [x_q, x_scale, x_zero], name=f"{base}/quantize_x"),
        helper.make_node(
            "MatMulIntegerToFloat",
            [x_q, q_name, x_scale, s_name, x_zero],
            list(node.output),
            name=f"{base}/MatMulIntegerToFloat",
            domain="com.microsoft",
        ),
    ]
    return nodes, [numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)]


def _detached(t: onnx.TensorProto) -> onnx.TensorProto:
    out = onnx.TensorProto()
    out.CopyFrom(t)
    return out


def _contiguous_f32(weight: np.ndarray) -> np.ndarray:
    """The same array, C-contiguous float32. Weights arrive transposed ([out, in] read as [in, out]); numpy's
    copy of a large transposed matrix is cache-hostile (3 s for a 7B MLP weight), torch's blocked,
    multi-threaded copy takes a sixth of that, and the bytes are identical."""
    if weight.dtype == np.float32 and weight.flags.c_contiguous:
        return weight
    import torch

    return torch.from_numpy(np.asarray(weight, dtype=np.float32)).contiguous().numpy()


def matmul_node(x: str, weight_name: str, out: str, name: str) -> onnx.NodeProto:
    return helper.make_node("MatMul", [x, weight_name], [out], name=name)
