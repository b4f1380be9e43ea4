"""How much memory the export itself needs (not the bundle on the device: that is budget.py), and
which verification fits.

The exporter holds one weight matrix at a time, so its peak is set by the largest matrix it
quantizes (usually the embedding table or lm_head, vocab x hidden) times the copies onnxruntime's
quantizer makes of it, plus the interpreter with torch and onnxruntime loaded. Verification then
holds an onnxruntime session over the finished bundle and a PyTorch reference: either the whole fp32
model ("full") or one layer at a time from disk ("streaming", verify_streaming.py). The factors below
were measured on this repository's 7B-shaped benchmark (BENCHMARKS.md, "7B on a laptop") and round up.

    --max-memory 8GB   the export refuses to start when even its build step cannot fit, picks the
                       streaming check when the full one cannot, and stops (writing nothing) if the
                       measured RSS ever passes the budget
    (no option)        the method is picked against 80% of the RAM available at the start; only
                       what the machine's total RAM cannot hold is refused
"""

from __future__ import annotations

import re
import threading
from dataclasses import asdict, dataclass
from typing import Any

from edgekit.checkpoint.load import ModelSpec
from edgekit.errors import EdgekitError
from edgekit.export.quantize import QuantConfig
from edgekit.skip.skipset import SkipSet

GIB = 1024**3
MIB = 1024**2
BASE_BYTES = 700 * MIB  # python + torch + transformers + onnx + onnxruntime, imported
QUANT_COPIES = 5.0  # fp32 matrix + transposed copy + protobuf copy + onnxruntime's array + its scratch
FLOAT_COPIES = 3.0  # fp32 matrix + dtype copy + protobuf bytes
SESSION_FACTOR = 1.5  # onnxruntime session peak / bundle weight bytes (prepacked MatMulNBits, arena)
AUTO_FRACTION = 0.8  # without --max-memory: the share of currently available RAM the export may use
VERIFY_METHODS = ("auto", "full", "streaming")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8GB', '8G', '7.5GiB', '6000MB' → bytes. K/M/G/T are binary (GB = GiB), as `free -g` counts."""
    m = _SIZE.match(text)
    if not m:
        raise EdgekitError(f"--max-memory {text!r}: expected a size such as 8GB or 6000MB")
    value = float(m.group(1)) * 1024 ** "bkmgt".index((m.group(2) or "b").lower())
    if value < 64 * MIB:
        raise EdgekitError(f"--max-memory {text}: too small to run Python with torch at all")
    return int(value)


def _gb(n: float) -> str:
    return f"{n / GIB:.1f} GB"


@dataclass(frozen=True)
class ExportMemoryPlan:
    budget_bytes: int
    budget_source: str  # "--max-memory" or "auto (80% of available RAM)"
    build_bytes: int  # peak while the graph is written
    session_bytes: int  # an onnxruntime session over the bundle
    full_verify_bytes: int
    streaming_verify_bytes: int
    verify_method: str  # "full", "streaming" or "none"
    largest_matrix: str

    def to_manifest(self) -> dict:
        return {**asdict(self), "method": "edgekit.export.memory (estimate before export)"}


def _largest_matrix(spec: ModelSpec, skip: SkipSet) -> tuple[str, int]:
    """Elements of the largest matrix held at once while building, with its name."""
    h, hd = spec.hidden, spec.head_dim
    candidates = {
        "embedding / lm_head (vocab x hidden)": spec.vocab * h,
        "MLP gate/up/down": spec.intermediate * h,
    }
    if skip.kept:
        candidates["fused qkv"] = (spec.heads + 2 * spec.kv_heads) * hd * h
    name = max(candidates, key=candidates.__getitem__)
    return name, candidates[name]


def _layer_fp32_bytes(spec: ModelSpec) -> int:
    h, hd = spec.hidden, spec.head_dim
    attn = (2 * spec.heads + 2 * spec.kv_heads) * hd * h
    return 4 * (attn + 3 * spec.intermediate * h + 2 * h)


def _params(spec: ModelSpec, skip: SkipSet) -> int:
    h, hd = spec.hidden, spec.head_dim
    attn = (2 * spec.heads + 2 * spec.kv_heads) * hd * h + h
    mlp = 3 * spec.intermediate * h + h
    tables = spec.vocab * h * (1 if spec.tie_embeddings else 2)
    return len(skip.kept) * attn + spec.num_layers * mlp + tables + h


def plan_export_memory(
    spec: ModelSpec,
    skip: SkipSet,
    quant: QuantConfig,
    bundle_weight_bytes: int,
    max_memory: int | None,
    verify: bool,
    method: str = "auto",
) -> ExportMemoryPlan:
    """The estimate, or an EdgekitError before anything is written when the budget cannot hold it."""
    if method not in VERIFY_METHODS:
        raise EdgekitError(f"--verify-method {method}: choose one of {', '.join(VERIFY_METHODS)}")
    if max_memory is None:
        import psutil

        # Free memory on a shared machine comes and goes: it picks the verification method, but only what
        # cannot fit in the machine's RAM at all is refused.
        vm = psutil.virtual_memory()
        budget, limit = int(AUTO_FRACTION * vm.available), vm.total
        source, limit_source = "auto (80% of available RAM)", "this machine's RAM"
    else:
        budget = limit = max_memory
        source = limit_source = "--max-memory"
    name, elems = _largest_matrix(spec, skip)
    copies = QUANT_COPIES if quant.bits else FLOAT_COPIES
    tied = 4 * spec.vocab * spec.hidden if spec.tie_embeddings else 0  # the table waits for lm_head
    build = BASE_BYTES + int(copies * 4 * elems) + tied
    session = BASE_BYTES + int(SESSION_FACTOR * bundle_weight_bytes)
    full = session + 4 * _params(spec, skip)
    # Streaming holds one layer (plus its fp16 source pages) or a vocab table, after the session is gone.
    streaming = max(session, BASE_BYTES + int(1.5 * max(_layer_fp32_bytes(spec), 4 * spec.vocab * spec.hidden)))

    if build > limit:
        raise EdgekitError(
            f"{limit_source} {_gb(limit)} cannot hold even one layer's working set: writing the graph needs about "
            f"{_gb(build)} (the {name} matrix in fp32 and the quantizer's copies of it, plus the runtime)"
        )
    chosen = "none"
    if verify:
        if method == "auto":
            chosen = "full" if full <= budget else "streaming"
        else:
            chosen = method
        need = full if chosen == "full" else streaming
        if need > limit:
            hint = "" if chosen == "streaming" else "; --verify-method streaming needs about " + _gb(streaming)
            raise EdgekitError(
                f"{limit_source} {_gb(limit)} cannot hold the {chosen} verification (about {_gb(need)}: an onnxruntime "
                f"session over the bundle{' and the fp32 PyTorch model' if chosen == 'full' else ''}){hint}; "
                "raise the budget or pass --no-verify"
            )
    return ExportMemoryPlan(budget, source, build, session, full, streaming, chosen, name)


class RssWatch:
    """Samples this process's RSS in a background thread; `check()` raises once the budget was passed.

    The plan keeps the export under budget; this is the guard for when the estimate is wrong: the export
    stops at the next layer boundary with a clear error, and bundle_writer removes the partial folder.
    """

    def __init__(self, budget: int | None, interval: float = 0.1) -> None:
        import psutil

        self.budget, self.interval = budget, interval
        self._proc = psutil.Process()
        self.start_rss = self._proc.memory_info().rss
        self.peak = self._phase_peak = self.start_rss
        self.phases: dict[str, int] = {}  # peak RSS of each finished phase
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgekit-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> int:
        rss = self._proc.memory_info().rss
        self.peak = max(self.peak, rss)
        self._phase_peak = max(self._phase_peak, rss)
        return rss

    def phase_done(self, phase: str) -> None:
        """Record the peak of the phase that just ended; the next phase's peak starts from now."""
        self.check(phase)
        self.phases[phase] = self._phase_peak
        self._phase_peak = self._sample()

    def check(self, where: str) -> None:
        self._sample()
        if self.budget is not None and self.peak > self.budget:
            raise EdgekitError(
                f"the export's memory reached {_gb(self.peak)} during {where}, over --max-memory {_gb(self.budget)}; "
                "stopped, nothing written (please report it: the estimate before starting said it would fit)"
            )
