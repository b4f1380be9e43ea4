"""Will it fit? An estimate of a bundle's memory on the device, made before anything is exported.

    weights   every tensor the graph holds, in the chosen format (int4/int8 blocks carry a float32 scale,
              and a packed zero point unless symmetric); a tied embedding and lm_head are one table
              in int4 exports (export/tied.py), two tensors otherwise
    kv cache  2 (K, V) x kept layers x KV heads x head_dim (as the graph pads it) x max context x bytes
              (--kv-cache: 4 or 2 for float, 1 for int8, 1/2 for int4; the scales are negligible),
              for one sequence: onnxruntime-genai's shared past/present buffer allocates all of it up front;
              --kv-window layers hold their window plus one chunk instead of the context
    overhead  onnxruntime's arena, prepacked MatMulNBits copies and activations: a fixed 150 MB, 10% of
              the weights, and one prefill chunk's logits, MLP and attention-score buffers

The overhead terms are a deliberate over-estimate (measured peaks sit below it; see the profile note in
docs/targets.md); what the user gets told when it does not fit is what *would*: more skipped layers, int4, or a
shorter context.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from edgekit.checkpoint.load import ModelSpec
from edgekit.errors import EdgekitError
from edgekit.export.quantize import QuantConfig, more_bits_layers
from edgekit.export.tied import shares_table
from edgekit.runtime.kv_engine import CAPACITY_STEP

FIXED_OVERHEAD = 150 * 1024**2
WEIGHT_OVERHEAD = 0.10
PREFILL_CHUNK = 512
GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    context: int
    kept_layers: int
    quant: str
    head_dim: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    def to_manifest(self) -> dict:
        return {
            **asdict(self),
            "total_bytes": self.total_bytes,
            "method": "edgekit.export.budget (heuristic, before export)",
        }


def _matrix_bytes(rows: int, cols: int, bits: int | None, quant: QuantConfig, float_bytes: int) -> int:
    """A [rows (in), cols (out)] MatMul weight, blocked along `rows` as MatMulNBits stores it."""
    if bits is None:
        return rows * cols * float_bytes
    blocks = -(-rows // quant.block_size)
    packed = cols * blocks * quant.block_size * bits // 8
    scales = cols * blocks * 4
    zero_points = 0 if quant.symmetric else cols * -(-blocks * bits // 8)
    return packed + scales + zero_points


def estimate_memory(spec: ModelSpec, kept: int, quant: QuantConfig, context: int, head_dim: int) -> MemoryEstimate:
    fb = 2 if quant.mode == "fp16" else 4  # float weights and the KV cache: fp16 graphs keep both in fp16
    q_out, kv_out = spec.heads * head_dim, spec.kv_heads * head_dim
    attn = sum(
        _matrix_bytes(spec.hidden, n, quant.bits_for("attn"), quant, fb) for n in (q_out, kv_out, kv_out)
    ) + _matrix_bytes(q_out, spec.hidden, quant.bits_for("attn"), quant, fb)
    mlp = 2 * _matrix_bytes(spec.hidden, spec.intermediate, quant.bits_for("mlp"), quant, fb) + _matrix_bytes(
        spec.intermediate, spec.hidden, quant.bits_for("mlp"), quant, fb
    )
    embed_bits = 4 if quant.embedding_quantized else None
    embedding = _matrix_bytes(spec.hidden, spec.vocab, embed_bits, quant, fb)
    if shares_table(quant, spec.tie_embeddings, spec.hidden):  # only its own scales and zero points (tied.py)
        embedding = spec.vocab * (spec.hidden // quant.block_size) * 5
    lm_head = _matrix_bytes(spec.hidden, spec.vocab, quant.bits_for("lm_head"), quant, fb)
    norms = (2 * spec.num_layers + 1) * spec.hidden * fb
    rotary = 2 * context * head_dim // 2 * fb if kept else 0
    weights = kept * attn + spec.num_layers * mlp + embedding + lm_head + norms + rotary
    if quant.mode == "int4":  # mixed precision: some layers' v_proj and down_proj at 8 bits (quantize.py)
        raised = quant.int8_layers or more_bits_layers(quant.int4_mix, spec.num_layers)
        per_layer = sum(
            _matrix_bytes(rows, cols, 8, quant, fb) - _matrix_bytes(rows, cols, 4, quant, fb)
            for rows, cols in ((spec.hidden, kv_out), (spec.intermediate, spec.hidden))
        )
        weights += len(raised) * per_layer

    positions = _kv_positions(spec, kept, quant, context)
    kv = int(2 * spec.kv_heads * head_dim * positions * quant.kv_format().bytes_per_value())
    chunk = min(PREFILL_CHUNK, context)
    activations = chunk * 4 * (spec.vocab + 3 * spec.intermediate + 4 * spec.hidden) + 4 * spec.heads * chunk * context
    overhead = FIXED_OVERHEAD + int(WEIGHT_OVERHEAD * weights) + activations
    return MemoryEstimate(weights, kv, overhead, context, kept, quant.mode, head_dim)


def _kv_positions(spec: ModelSpec, kept: int, quant: QuantConfig, context: int) -> int:
    """Cached positions over all kept layers. With --kv-window a sliding-window layer holds its window plus
    the runtime's one chunk of room; not knowing which layers a skip count removes, the estimate assumes
    they are windowed ones (the fewest window-sized caches: an over-estimate, as the rest of it)."""
    if not quant.kv_window:
        return kept * context
    windowed = sum(1 for i in range(spec.num_layers) if spec.window(i, context))
    windowed_kept = max(0, windowed - (spec.num_layers - kept))
    held = min(context, (spec.sliding_window or context) + CAPACITY_STEP)
    return (kept - windowed_kept) * context + windowed_kept * held


def _gb(n: float) -> str:
    return f"{n / GIB:.2f} GB"


def check_budget(
    spec: ModelSpec,
    skipped: int,
    quant: QuantConfig,
    context: int,
    head_dim: int,
    usable_bytes: int,
    device: str,
) -> MemoryEstimate:
    """The estimate, or an EdgekitError saying it does not fit and what would."""
    est = estimate_memory(spec, spec.num_layers - skipped, quant, context, head_dim)
    if est.total_bytes <= usable_bytes:
        return est
    fits = suggestions(spec, skipped, quant, context, head_dim, usable_bytes)
    raise EdgekitError(
        f"{device}: the estimate {_gb(est.total_bytes)} (weights {_gb(est.weights_bytes)} + KV cache "
        f"{_gb(est.kv_cache_bytes)} at {context} tokens + runtime {_gb(est.overhead_bytes)}) exceeds the "
        f"{_gb(usable_bytes)} the device leaves the model; "
        + ("what would fit: " + "; or ".join(fits) if fits else "nothing nearby fits: pick a smaller model")
        + " (--device-memory GB overrides the budget)"
    )


def suggestions(
    spec: ModelSpec, skipped: int, quant: QuantConfig, context: int, head_dim: int, usable_bytes: int
) -> list[str]:
    """Changes that bring the estimate under budget: int4, more skipped layers (at most half of them,
    where the paper's quality holds up), a shorter context; combined with int4 when one alone is not enough."""

    def fits(s: int, q: QuantConfig, c: int) -> bool:
        return estimate_memory(spec, spec.num_layers - s, q, c, head_dim).total_bytes <= usable_bytes

    def min_skip(q: QuantConfig) -> int | None:
        return next((s for s in range(skipped + 1, spec.num_layers // 2 + 1) if fits(s, q, context)), None)

    def max_context(q: QuantConfig) -> int | None:
        c = context // 2
        while c >= 128 and not fits(skipped, q, c):
            c //= 2
        return c if c >= 128 else None

    int4 = replace(quant, mode="int4", lm_head_bits=8) if quant.mode != "int4" else None
    out = []
    if int4 is not None and fits(skipped, int4, context):
        out.append("--quant int4")
    if (s := min_skip(quant)) is not None:
        out.append(f"--skip {s} (attention removed from {s} of {spec.num_layers} layers)")
    if (c := max_context(quant)) is not None:
        out.append(f"--max-context {c}")
    if not out and int4 is not None:
        if (s := min_skip(int4)) is not None:
            out.append(f"--quant int4 --skip {s}")
        if (c := max_context(int4)) is not None:
            out.append(f"--quant int4 --max-context {c}")
    return out


def check_or_estimate(
    spec: ModelSpec,
    skipped: int,
    quant: QuantConfig,
    context: int,
    head_dim: int,
    usable_bytes: int | None,
    device: str,
) -> MemoryEstimate:
    if usable_bytes is None:
        return estimate_memory(spec, spec.num_layers - skipped, quant, context, head_dim)
    return check_budget(spec, skipped, quant, context, head_dim, usable_bytes, device)
