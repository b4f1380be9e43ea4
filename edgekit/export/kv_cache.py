"""The KV cache's element type: float (the activations' type) or int8/int4, quantized by GroupQueryAttention.

onnxruntime 1.32's GroupQueryAttention stores past/present as int8 (or int4 packed two to a uint8) when
given `k_quant_type`/`v_quant_type`, `kv_cache_bit_width` and a float scale per channel: symmetric,
round-to-nearest, saturating, scale shape [kv_heads * head_dim]; it dequantizes on read, in the prompt's
forward as in decode (measured, see docs/quantization.md). Per channel, not per tensor: a few key channels
are an order of magnitude larger than the rest, and one scale for all of them left 1.3x the error.

The scales are calibrated once, at export, on `--calib` text: each channel's largest magnitude over the
calibration tokens, divided by the largest integer. Keys are stored after rotary, which turns each pair of
channels (j, j + head_dim/2) by a position-dependent angle, so a key channel's reach over all positions is
the pair's norm: that is what the key scales take, so calibration needs no rotary and no positions.

What the CPU kernels support (checked on onnxruntime 1.32, x86-64): a float32 graph with a float32, int8 or
int4 cache; a float16 graph with a float16, int8 or int4 cache. A float16 cache under float32 activations is
accepted by the kernel but runs 3.6-159x slower (a conversion per step over the whole cache; bench/kv_kernel.py),
so it is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto

from edgekit.errors import EdgekitError
from edgekit.export.heads import pad_heads

KV_CACHES = ("auto", "fp32", "fp16", "int8", "int4")
KV_CALIB_TOKENS = 2048
KV_CALIB_WINDOW = 512
MIN_SCALE = 1e-8
# int4: each channel's clip is searched over these fractions of its largest magnitude, on a sample of about
# KV_CLIP_SAMPLE calibration rows per layer (8 bits keep the largest magnitude: their rounding step is small)
CLIP_GRID = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
KV_CLIP_SAMPLE = 512  # a channel that never moved (or a padding channel): any positive scale stores its zeros


@dataclass(frozen=True)
class KVFormat:
    """How one KV value is stored."""

    name: str  # "float32" | "float16" | "int8" | "int4": the manifest's graph.kv_dtype
    elem_type: int  # the ONNX element type of past_key_values.* / present.*
    bits: int

    @property
    def quantized(self) -> bool:
        return self.name in ("int8", "int4")

    def stored_head_dim(self, head_dim: int) -> int:
        """The last axis of a cache tensor: int4 packs two values per byte."""
        return head_dim * self.bits // 8 if self.name == "int4" else head_dim

    def bytes_per_value(self) -> float:
        return self.bits / 8


FORMATS = {
    "fp32": KVFormat("float32", TensorProto.FLOAT, 32),
    "fp16": KVFormat("float16", TensorProto.FLOAT16, 16),
    "int8": KVFormat("int8", TensorProto.INT8, 8),
    "int4": KVFormat("int4", TensorProto.UINT8, 4),
}


def format_named(name: str) -> KVFormat:
    """The format a graph contract's kv_dtype names ("float32", "int8", ...)."""
    return next(f for f in FORMATS.values() if f.name == name)


def kv_format(kind: str, quant_mode: str, flavour: str = "fused") -> KVFormat:
    """The cache format for `--kv-cache kind`, or a one-line refusal where the CPU kernels can't run it well."""
    if kind not in KV_CACHES:
        raise EdgekitError(f"--kv-cache {kind}: choose one of {', '.join(KV_CACHES)}")
    activations = "fp16" if quant_mode == "fp16" else "fp32"
    if kind == "auto":
        return FORMATS[activations]
    if kind in ("fp32", "fp16") and kind != activations:
        raise EdgekitError(
            f"--kv-cache {kind} with {activations} activations: onnxruntime's CPU attention "
            + (
                "runs a float16 cache under float32 activations 4-160x slower; use --kv-cache int8 (4x smaller)"
                if kind == "fp16"
                else "needs the cache in the activations' type; use --kv-cache fp16 or int8"
            )
        )
    if FORMATS[kind].quantized and flavour == "standard":
        raise EdgekitError(
            f"--kv-cache {kind}: the standard graph keeps its cache in plain ONNX ops (Concat), which have no "
            "quantized cache; use --flavour fused (GroupQueryAttention) or a float cache"
        )
    return FORMATS[kind]


@dataclass
class KVScales:
    """Per kept layer (KV slot order), the key and value scales, [kv_heads * graph head_dim] float32 each."""

    key: list[np.ndarray]
    value: list[np.ndarray]
    bits: int
    text: str
    tokens: int
    seconds: float

    def to_manifest(self) -> dict[str, Any]:
        return {
            "scheme": "symmetric per channel (GroupQueryAttention PER_CHANNEL), saturating",
            "scales": "max |x| over the calibration tokens / (2^(bits-1) - 1); keys: the rotary pair's norm",
            "text": self.text,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 1),
        }


def key_reach(k: Any, kv_heads: int, head_dim: int) -> Any:
    """Per row and channel, the norm of the channel's rotary pair (j, j + d/2): where rotary can take it."""
    pairs = k.reshape(k.shape[0], kv_heads, 2, head_dim // 2)
    norm = (pairs * pairs).sum(dim=2, keepdim=True).sqrt()
    return norm.expand(-1, -1, 2, -1).reshape(k.shape[0], -1)


class ChannelStats:
    """A channel's largest magnitude over the calibration rows, and a sample of rows for the int4 clip."""

    def __init__(self, channels: int, sample_every: int) -> None:  # 0: no sample
        self.absmax = np.zeros(channels, np.float64)
        self.every = sample_every
        self.rows: list[np.ndarray] = []

    def add(self, x: Any) -> None:  # x: torch [rows, channels]
        np.maximum(self.absmax, x.abs().amax(dim=0).double().numpy(), out=self.absmax)
        if self.every:
            self.rows.append(x[:: self.every].numpy().astype(np.float32))

    def clip(self, qmax: int, rotary: bool) -> np.ndarray:
        """Per channel, the clip in CLIP_GRID x absmax with the least squared rounding error on the sample.

        Keys are stored after rotary, x·cos of an angle that goes round with the position: the sample
        for a key channel is its pair norm at uniformly spread angles."""
        x = np.concatenate(self.rows).astype(np.float64)
        if rotary:
            x = x * np.cos(np.linspace(0, 2 * np.pi, len(x), endpoint=False))[:, None]
        best, best_err = self.absmax.copy(), np.full(len(self.absmax), np.inf)
        for f in CLIP_GRID:
            c = np.maximum(self.absmax * f, MIN_SCALE)
            s = c / qmax
            err = ((np.clip(np.round(x / s), -qmax - 1, qmax) * s - x) ** 2).sum(axis=0)
            better = err < best_err
            best[better], best_err[better] = c[better], err[better]
        return best


def calibrate_kv_scales(
    ckpt: Any, skip: Any, calib: Path, bits: int, streaming: bool = False, tokens: int = KV_CALIB_TOKENS
) -> KVScales:
    """Run the skipped fp32 model over `calib` and measure each kept layer's key and value reach per channel:
    the whole model where it fits, else (`streaming`, or too big for memory) one layer at a time from disk."""
    import torch
    from tokenizers import Tokenizer

    from edgekit.checkpoint.load import load_torch_model
    from edgekit.quality.analyze import calibration_chunks
    from edgekit.quality.streaming import should_stream
    from edgekit.skip.streaming import StreamingModel
    from edgekit.skip.surgery import apply_skip

    t0 = time.perf_counter()
    spec, names = ckpt.spec, ckpt.family.names
    tokenizer = Tokenizer.from_file(str(Path(ckpt.path) / "tokenizer.json"))
    window = min(spec.max_context, KV_CALIB_WINDOW)
    chunks, _ = calibration_chunks(lambda s: tokenizer.encode(s).ids, calib, tokens, window)
    if streaming or should_stream(ckpt):
        model: Any = StreamingModel(ckpt, skip)
        # Each forward streams every weight from disk: one batch of equal windows (no padding to pollute
        # the maxima), cut from the chunks' tokens run together.
        flat = [t for c in chunks for t in c]
        batches = [[flat[k : k + window] for k in range(0, len(flat) - window + 1, window)] or [flat]]
        model = model.model
    else:
        model = apply_skip(load_torch_model(ckpt), skip)
        batches = [[c] for c in chunks]
    modules = dict(model.named_modules())
    # 8-bit scales take each channel's largest magnitude; 4-bit ones clip it where the rounding error is least
    total = sum(len(row) for batch in batches for row in batch)
    every = max(1, total // KV_CLIP_SAMPLE) if bits == 4 else 0
    channels = spec.kv_heads * spec.head_dim
    stats = {(i, kind): ChannelStats(channels, every) for i in skip.kept for kind in ("key", "value")}

    def keep(i: int, kind: str):
        def hook(_mod: Any, _args: Any, out: Any) -> None:
            x = out.detach().reshape(-1, channels).float()  # [B, S, KV*D], or [B, S, KV, D] from a k_norm
            stats[i, kind].add(key_reach(x, spec.kv_heads, spec.head_dim) if kind == "key" else x)

        return hook

    handles = []
    # the cache holds keys after the per-head norm where a family has one (Qwen3): calibrate on those
    key_source = names.k_norm if ckpt.family.qk_norm else names.k
    for i in skip.kept:
        for template, kind in ((key_source, "key"), (names.v, "value")):
            path = template.format(i=i, p="weight").removesuffix(".weight")
            if path not in modules:
                raise EdgekitError(f"KV calibration: the model has no module {path}")
            handles.append(modules[path].register_forward_hook(keep(i, kind)))
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=torch.tensor(batch), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    qmax = 2 ** (bits - 1) - 1

    def graph_scale(i: int, kind: str) -> np.ndarray:
        st = stats.pop((i, kind))
        reach = st.clip(qmax, rotary=kind == "key") if bits == 4 else st.absmax
        scale = pad_heads((reach / qmax).astype(np.float32), spec.kv_heads, spec.head_dim, 0)
        return np.maximum(scale, MIN_SCALE).astype(np.float32)

    keys = [graph_scale(i, "key") for i in skip.kept]
    values = [graph_scale(i, "value") for i in skip.kept]
    return KVScales(keys, values, bits, Path(calib).name, total, time.perf_counter() - t0)
