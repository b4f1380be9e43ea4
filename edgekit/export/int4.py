"""4-bit MatMul weights by onnxruntime's own quantizers, one weight at a time, in the layout MLAS runs fast.

`--int4-algo` chooses how a weight's blocks are rounded; every algorithm but q4_1 ends as one MatMulNBits
with a uint8 zero point per block (or none, symmetric), the layout of MLAS's int8-compute kernel (accuracy
level 4):
- rtn: onnxruntime's DefaultWeightOnlyQuantizer, min/max per block (quantize.py).
- kquant: onnxruntime's k-quant (llama.cpp's make_qkx search of scale and minimum, weighted by magnitude).
- hqq: onnxruntime's HQQ (a data-free proximal solver for scale and zero point). Its zero points are
  floats, and MatMulNBits runs float zero points on a float dequantize path 25-50x slower per token
  (BENCHMARKS.md), so we round them to integers and refit each block's scale by least squares for the
  rounded zero point (`integer_zero_points`, our own ~20 lines: onnxruntime has no such step).
- gptq: GPTQ (Frantar et al. 2022: each input row rounded in turn, its error fed forward through the
  inverse Hessian of the layer's inputs on calibration text), written here (`gptq_blocks`): onnxruntime
  1.32's port (neural_compressor.weight_only.gptq) takes the error-feedback rows from the lower half of an
  upper-triangular Cholesky factor, which is zero, so its result is min/max RTN to the last bit
  (tests/test_int4.py checks that, so a fixed onnxruntime shows up). Act order with static groups; the
  Hessian per token (InputHessian); block parameters min/max with integer zero points refitted as for hqq.
- q4_1: llama.cpp's Q4_1 (float block minimum) as MatMulNBits plus block offsets (gguf_blocks.py).

onnxruntime's `MatMulNBitsQuantizer` runs these over a finished fp32 model; we call the same per-weight
functions as the graph builder emits each MatMul, so the fp32 weights never sit in memory together (the
7B plan). rtn and kquant give the whole-model quantizer's bytes (tests/test_streaming_export.py,
tests/test_int4.py); hqq and gptq differ from onnxruntime's by design (integer zero points; a working
GPTQ), and their tests check what each step is for.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from edgekit.errors import EdgekitError

INT4_ALGOS = ("rtn", "kquant", "hqq", "gptq", "q4_1")
NEEDS_CALIBRATION = ("gptq",)
AUTO = "auto"


def default_int4_algo(fp32_fits: bool, symmetric: bool, keeps_gguf_blocks: bool) -> str:
    """What `--int4-algo auto` means, by measurement (BENCHMARKS.md, "int4"): GPTQ where the fp32 model fits
    in memory for its calibration, else HQQ (data-free; streams); RTN where neither applies (symmetric
    blocks without calibration; `--quant keep`, whose 4-bit fallback covers only tensors GGUF stored in
    formats MatMulNBits cannot run)."""
    if keeps_gguf_blocks:
        return "rtn"
    if fp32_fits:
        return "gptq"
    return "rtn" if symmetric else "hqq"


# GPTQ's defaults (the paper's, and onnxruntime's GPTQWeightOnlyQuantConfig): rows per lazy batch, dampening.
GPTQ_BLOCKSIZE, GPTQ_PERCDAMP = 128, 0.01
HQQ_ROWS = 1024  # output rows quantized at a time by hqq


def int4_matmul(
    node: onnx.NodeProto,
    weight: np.ndarray,
    block_size: int,
    accuracy_level: int,
    algo: str,
    symmetric: bool = False,
    hessian: np.ndarray | None = None,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """MatMul(x, W) with W [K, N] float32 → one MatMulNBits node and its initializers, by `algo`."""
    from onnxruntime.quantization.neural_compressor.weight_only import make_matmul_weight_only_node

    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    k, n = weight.shape
    k_blocks = (k + block_size - 1) // block_size
    weight = _padded(np.asarray(weight, np.float32), block_size, k_blocks)
    if algo == "gptq":
        if hessian is None:
            raise EdgekitError("--int4-algo gptq needs calibration inputs for every MatMul (internal: none given)")
        hessian = np.pad(hessian, ((0, weight.shape[0] - k), (0, weight.shape[0] - k)))  # padded rows: dead inputs
        q, scale, zero = gptq_blocks(weight, hessian, block_size, symmetric)
    else:
        q, scale, zero = _BLOCKS[algo](weight, block_size, symmetric)
    # onnxruntime packs zero points two per byte across rows, which MatMulNBits reads per row
    # ([N, ceil(blocks/2)]): with an odd number of blocks per row we pack them ourselves.
    odd = k_blocks % 2 == 1 and not symmetric
    out, inits = make_matmul_weight_only_node(
        node=node,
        weight_shape=(k, n),
        num_bits=4,
        group_size=block_size,
        k_blocks=k_blocks,
        q_weight=q.astype(np.uint8),
        scale=scale.astype(np.float32),
        zero_point=None if symmetric or odd else zero,
        accuracy_level=accuracy_level,
    )
    if odd:
        per_row = np.full((n, k_blocks + 1), 8, np.uint8)
        per_row[:, :k_blocks] = np.asarray(zero, np.uint8).reshape(n, k_blocks)
        packed = per_row[:, 0::2] | (per_row[:, 1::2] << 4)
        zp = onnx.numpy_helper.from_array(packed, node.input[1] + "_zp")
        out.input.append(zp.name)
        inits.append(zp)
    return [out], inits


def _padded(weight: np.ndarray, block_size: int, k_blocks: int) -> np.ndarray:
    from onnxruntime.quantization.neural_compressor.weight_only import pad_tensor

    return pad_tensor(np.asarray(weight, np.float32), block_size, k_blocks)


def _kquant(w: np.ndarray, block: int, symmetric: bool):
    # onnxruntime's rtn_quantize(algorithm="k_quant") calls the "cuda" variant, which runs on numpy without a GPU.
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cuda

    return quant_tensor_k_quant_cuda(w.T, 4, block)


def _hqq(w: np.ndarray, block: int, symmetric: bool):
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, HQQWeightOnlyQuantizer

    hqq = HQQWeightOnlyQuantizer(HQQWeightOnlyQuantConfig(block_size=block, bits=4))
    rows = w.T  # [N, K]: one slice of output rows at a time, so a 7B MLP matrix's HQQ temporaries (six
    # copies of the weight) and our float64 refit stay ~100 MB instead of ~1.5 GB; HQQ's stopping rule
    # then looks at each slice's error, not the whole matrix's.
    parts = []
    for r in range(0, rows.shape[0], HQQ_ROWS):
        part = np.ascontiguousarray(rows[r : r + HQQ_ROWS])
        _, scale, zero = hqq.quantize_internal(torch.from_numpy(part), bits=4, group_size=block)
        q, s, z = integer_zero_points(
            part.reshape(-1, block), scale.reshape(-1, 1).numpy(), zero.reshape(-1, 1).numpy()
        )
        parts.append((q.astype(np.uint8), s, z))
    return tuple(np.concatenate(p) for p in zip(*parts, strict=True))


def gptq_blocks(
    w: np.ndarray, hessian: np.ndarray, block: int, symmetric: bool = False, lazy: int = GPTQ_BLOCKSIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of w [K, N] (K a multiple of `block`) → (q [N·K/block, block], scale, zero point), onnxruntime's
    block layout (what quant_tensor(w.T) returns). The reference loop with its lazy batches of `lazy` rows;
    row r's error updates the rows after it by the r-th row of U, H⁻¹ = UᵀU. Rows go in descending
    Hessian diagonal ("act order"), each block's scale and zero point fixed beforehand from the weights
    ("static groups", so blocks stay contiguous for MatMulNBits): on SmolLM2 (PyTorch, WikiText-2 held
    out) 16.96 against 17.20 in plain order, fp32 15.79."""
    w, h = w.astype(np.float64).copy(), hessian.astype(np.float64).copy()
    k, n = w.shape
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead, :] = 0
    scales, zeros = np.zeros((k // block, n)), np.zeros((k // block, n))
    for g in range(k // block):
        scales[g], zeros[g] = _group_params(w[g * block : (g + 1) * block], symmetric)
    order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[order], h[order][:, order]
    h[np.diag_indices(k)] += GPTQ_PERCDAMP * np.mean(np.diag(h))
    u = _upper_cholesky_of_inverse(h)
    q = np.zeros((k, n))
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1, errors, u1 = w[i1:i2].copy(), np.zeros((i2 - i1, n)), u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            s, z = scales[order[i1 + i] // block], zeros[order[i1 + i] // block]
            q[i1 + i] = np.clip(np.round(w1[i] / s + z), 0, 15)
            errors[i] = (w1[i] - (q[i1 + i] - z) * s) / u1[i, i]
            w1[i:] -= np.outer(u1[i, i:], errors[i])
        w[i2:] -= u[i1:i2, i2:].T @ errors
    q = q[np.argsort(order)]
    return q.T.reshape(-1, block), scales.T.reshape(-1, 1), zeros.T.reshape(-1, 1).astype(np.uint8)


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """U with H⁻¹ = UᵀU, as the reference GPTQ computes it (torch: numpy's LAPACK calls stalled for seconds
    on a busy 2-core machine where torch's took milliseconds)."""
    import torch

    t = torch.from_numpy(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(t)), upper=True).numpy()


def _group_params(g: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """(scale [N], zero point [N]) for a group of rows g [block, N]."""
    if symmetric:  # onnxruntime's symmetric 4-bit: zero point 8, scale 2·max|w|/15
        s = np.abs(g).max(0) * 2 / 15
        return np.where(s > 0, s, 1.0), np.full(g.shape[1], 8.0)
    lo, hi = g.min(0), g.max(0)
    s = np.where(hi > lo, (hi - lo) / 15, 1.0)
    z = np.clip(np.round(-lo / s), 0, 15)
    _, s, z = integer_zero_points(g.T, s[:, None], z[:, None])
    return s[:, 0].astype(np.float64), z[:, 0].astype(np.float64)


def _unsupported(name: str):
    def refuse(*_args):
        raise EdgekitError(f"--int4-algo {name} is not a MatMulNBits rounding (internal)")

    return refuse


_BLOCKS = {"kquant": _kquant, "hqq": _hqq, "rtn": _unsupported("rtn"), "q4_1": _unsupported("q4_1")}


def integer_zero_points(
    blocks: np.ndarray, scale: np.ndarray, zero: np.ndarray, rounds: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The best (q, scale, zero point) per block with the zero point a whole number in 0..15.

    Starting from an optimised float (scale, zero): alternately, for each of round(zero) − 1, + 0, + 1,
    quantize and refit the scale by least squares, s = Σ (q − z)·w / Σ (q − z)², and keep what has the
    smallest squared error. `blocks` [nb, G] weights; scale, zero [nb, 1] (w ≈ s · (q − z)).
    In torch, float32: numpy float64 made this 80% of a 7B hqq export's time (~65 of 81 minutes).
    """
    import torch

    w = torch.from_numpy(np.ascontiguousarray(blocks, np.float32))
    s = torch.from_numpy(np.ascontiguousarray(scale, np.float32))
    z = torch.from_numpy(np.ascontiguousarray(zero, np.float32)).round().clamp(0, 15)
    best_err = torch.full((w.shape[0], 1), float("inf"))

    def shifted(sc: torch.Tensor, zc: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(w / sc + zc), 0, 15) - zc

    for _ in range(rounds):
        best_z, best_s = z.clone(), s.clone()
        for dz in (-1.0, 0.0, 1.0):
            zc = torch.clamp(z + dz, 0, 15)
            q = shifted(s, zc)
            refit = (q * w).sum(1, keepdim=True) / (q * q).sum(1, keepdim=True).clamp_min(1e-30)
            sc = torch.where(refit > 0, refit, s)
            err = ((shifted(sc, zc) * sc - w) ** 2).sum(1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_z, best_s = torch.where(better, zc, best_z), torch.where(better, sc, best_s)
        z, s = best_z, best_s
    q = torch.clamp(torch.round(w / s + z), 0, 15)
    return q.numpy(), s.numpy(), z.numpy().astype(np.uint8)


class InputHessian:
    """GPTQ's Hessian of a MatMul's inputs, accumulated as onnxruntime's gptq_quantize does (a running mean
    of 2·xᵀx over calibration batches, float64), so the same inputs give the same bytes.

    `per_token=True` scales every token's input to the same norm first. Why: a few tokens (the first of a
    window, attention sinks) carry activations hundreds of times larger than the rest (SmolLM2: Hessian
    diagonal max/mean up to 300), and the plain Hessian spends the whole error budget on them. Measured on
    SmolLM2-135M in PyTorch, WikiText-2 held-out, fp32 15.79: rtn 18.98, GPTQ 19.04, GPTQ per token 17.20.
    """

    def __init__(self, per_token: bool = False) -> None:
        self.h: np.ndarray | None = None
        self.samples = 0
        self.per_token = per_token

    def add_gram(self, gram: np.ndarray, rows: int = 1) -> None:
        """The same update from xᵀx (of x already scaled per token if wanted), computed by the caller."""
        if self.h is None:
            self.h = np.zeros(gram.shape)
        self.h *= self.samples / (self.samples + rows)
        self.samples += rows
        self.h += (2 / self.samples) * gram

    def add(self, x: np.ndarray) -> None:
        """One calibration batch x [batch, ..., K]; onnxruntime counts batches (the leading axis), not tokens."""
        rows = x.shape[0]
        x = np.reshape(x, (-1, x.shape[-1])).astype(np.float64)
        if self.per_token:  # calibrate.py does the same in torch before add_gram
            x = x * (np.sqrt(x.shape[1]) / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30))
        self.add_gram(x.T @ x, rows)

    @property
    def value(self) -> np.ndarray:
        if self.h is None:
            raise EdgekitError("no calibration inputs for GPTQ")
        return self.h
