"""What a recipe file may say: each key's check (SCHEMA), the ISA presets, and the cross-key rules.

`edgekit.targets.recipes` loads a file and builds the Recipe; this module only says whether its values
are acceptable, with a message naming the key.
"""

from __future__ import annotations

import re
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.export.graph import FLAVOURS
from edgekit.export.kv_cache import KV_CACHES
from edgekit.export.quantize import QUANT_MODES
from edgekit.runtime.agreement import VERDICTS
from edgekit.targets.arm_env import CORES

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

# onnxruntime's per-ISA int8 choices, as optimum's `AutoQuantizationConfig.<isa>(is_static=False)` encodes
# them (optimum/onnxruntime/configuration.py): activations u8 asymmetric, weights symmetric per channel;
# AVX2 alone keeps weights u8 (u8·s8 pairs can saturate VPMADDUBSW's int16 sums there), arm64 never reduces
# range. edgekit's weights go through MatMulNBits instead of MatMulInteger, so a preset maps to:
#   weights s8 symmetric → `symmetric: true` (no zero points stored: smaller, and the layout the arm64
#   KleidiAI/NEON int8-dot kernels take); weights u8 → `symmetric: false` (a stored zero point is
#   MatMulNBits' unsigned analogue); int8 activations → `accuracy_level: 4` (MLAS quantizes activations to
#   int8 per block and uses VNNI/VPDPBUSD, AVX2 VPMADDUBSW or NEON SDOT); per-channel → `block_size` (blocks
#   are finer than channels, so at least as accurate). reduce_range has no MatMulNBits equivalent: MLAS's
#   int8 path widens before it sums, so it is recorded and not applied.
ISA_PRESETS: dict[str, dict[str, Any]] = {
    "avx2": {
        "activations": "uint8",
        "weights": "uint8",
        "weights_symmetric": True,
        "per_channel": True,
        "reduce_range": False,
    },
    "avx512": {
        "activations": "uint8",
        "weights": "int8",
        "weights_symmetric": True,
        "per_channel": True,
        "reduce_range": False,
    },
    "avx512_vnni": {
        "activations": "uint8",
        "weights": "int8",
        "weights_symmetric": True,
        "per_channel": True,
        "reduce_range": False,
    },
    "arm64": {
        "activations": "uint8",
        "weights": "int8",
        "weights_symmetric": True,
        "per_channel": True,
        "reduce_range": False,
    },
    "none": {},
}


def _choice(options: tuple[str, ...]):
    def check(v: Any) -> str | None:
        return None if isinstance(v, str) and v in options else f"must be one of {', '.join(options)}"

    return check


def _int(lo: int, hi: int):
    def check(v: Any) -> str | None:
        ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"must be a whole number from {lo} to {hi}"

    return check


def _num(lo: float, hi: float):
    def check(v: Any) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"must be a number from {lo} to {hi}"

    return check


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and v.strip() else "must be a non-empty string"


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _name(v: Any) -> str | None:
    if isinstance(v, str) and NAME.match(v):
        return None
    return "must be a plain name (lowercase letters, digits, '-' or '_'; no paths)"


def _options(v: Any) -> str | None:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        return "must be a mapping of option names to values"
    if not all(isinstance(x, (str, int, float, bool)) for x in v.values()):
        return "option values must be strings, numbers or booleans"
    return None


def _providers(v: Any) -> str | None:
    if not isinstance(v, list) or not v:
        return "must be a non-empty list of {name, options}"
    for i, p in enumerate(v):
        if not isinstance(p, dict) or set(p) - {"name", "options"} or "name" not in p:
            return f"entry {i} must have 'name' and optional 'options' only"
        if not isinstance(p["name"], str) or not p["name"].endswith("ExecutionProvider"):
            return f"entry {i}: name must be an onnxruntime provider such as CPUExecutionProvider"
        if "options" in p and (err := _options(p["options"])):
            return f"entry {i}: {err}"
    return None


def _fixed(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, dict) or set(v) != {"prefill", "context"}:
        return "must be null or {prefill: N, context: N}"
    p, c = v["prefill"], v["context"]
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (p, c)) or not 1 < p < c <= 131072:
        return "needs whole numbers with 1 < prefill < context"
    return None


def _qdq(v: Any) -> str | None:
    from edgekit.export.qdq import QDQ_ACTIVATIONS, QDQ_WEIGHTS

    if not isinstance(v, dict) or set(v) != {"activations", "weights"}:
        return "must be {activations: uint16|uint8, weights: uint8|int8}"
    if v["activations"] not in QDQ_ACTIVATIONS or v["weights"] not in QDQ_WEIGHTS:
        return f"activations must be one of {', '.join(QDQ_ACTIVATIONS)}, weights one of {', '.join(QDQ_WEIGHTS)}"
    return None


def _emulated(v: Any) -> str | None:
    if not isinstance(v, dict) or not v:
        return "must map emulated cores to verdicts, e.g. {cortex-a72: exact}"
    for core, verdict in v.items():
        if core not in CORES:
            return f"core {core!r}: expected one of {', '.join(CORES)}"
        if verdict not in VERDICTS:
            return f"{core}: verdict {verdict!r}: expected one of {', '.join(VERDICTS)}"
    return None


COVERAGE_PROVIDERS = ("qnn", "openvino")  # the non-CPU EPs bench/ep_coverage.py can run here
COVERAGE_GRAPHS = ("onnx", "fixed")


def parse_coverage(v: dict[str, dict[str, str]]) -> dict[str, dict[str, tuple[int, str]]]:
    """{provider: {graph: "100% exact"}} -> {provider: {graph: (100, "exact")}}; ValueError names what is wrong."""
    out: dict[str, dict[str, tuple[int, str]]] = {}
    for provider, graphs in v.items():
        if provider not in COVERAGE_PROVIDERS:
            raise ValueError(f"provider {provider!r}: expected one of {', '.join(COVERAGE_PROVIDERS)}")
        if not isinstance(graphs, dict) or not graphs:
            raise ValueError(f"{provider}: must map graphs to coverage, e.g. {{fixed: 100% exact}}")
        for graph, text in graphs.items():
            if graph not in COVERAGE_GRAPHS:
                raise ValueError(f"{provider}: graph {graph!r}: expected one of {', '.join(COVERAGE_GRAPHS)}")
            pct, _, verdict = str(text).partition("% ")
            if not pct.isdigit() or not 0 <= int(pct) <= 100 or verdict not in VERDICTS:
                raise ValueError(
                    f"{provider}.{graph}: {text!r}: expected 'N% verdict', verdict one of {', '.join(VERDICTS)}"
                )
            out.setdefault(provider, {})[graph] = (int(pct), verdict)
    return out


def _coverage(v: Any) -> str | None:
    if not isinstance(v, dict) or not v:
        return "must map providers to graphs to coverage, e.g. {qnn: {fixed: 100% exact}}"
    try:
        parse_coverage(v)
    except ValueError as e:
        return str(e)
    return None


# section → key → (required, check). Top-level scalars live under "".
SCHEMA: dict[str, dict[str, tuple[bool, Any]]] = {
    "": {
        "name": (True, _name),
        "description": (True, _text),
        "make_target": (True, _name),
        "tested": (True, _text),
        "unverified": (True, _text),
        # the worst verdict of this recipe's bundles on each core under emulation; make check-arm re-checks it
        "emulated": (False, _emulated),
        # this recipe's stories260K bundle on the non-CPU EPs run here: share of nodes, verdict against the
        # CPU EP; make check-eps re-checks it
        "coverage": (False, _coverage),
    },
    "device": {
        "arch": (True, _choice(("x86_64", "arm64"))),
        "cores": (True, _int(1, 512)),
        "memory_gb": (True, _num(0.01, 4096)),
        "reserved_gb": (True, _num(0, 4096)),
    },
    "export": {
        "flavour": (True, _choice(FLAVOURS)),
        "skip": (False, _int(0, 1024)),
        "quant": (True, _choice(QUANT_MODES)),
        "isa_preset": (True, _choice(tuple(ISA_PRESETS))),
        "block_size": (False, _int(16, 4096)),
        "accuracy_level": (False, _int(0, 4)),
        "symmetric": (False, _bool),
        "lm_head_bits": (False, lambda v: None if v in (4, 8, 32) else "must be 4, 8 or 32"),
        "kv_cache": (False, _choice(KV_CACHES)),
        "max_context": (True, _int(2, 1 << 20)),
    },
    "runtime": {
        "providers": (True, _providers),
        "threads": (True, _int(1, 512)),
    },
    "mobile": {
        "emit_ort": (True, _bool),
        "fixed_shapes": (False, _fixed),
        # static QDQ of the fixed pair, calibrated on --calib text (export/qdq.py), for integer NPUs
        "qdq": (False, _qdq),
    },
}


def validate(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise EdgekitError(f"{where}: a recipe must be a YAML mapping")
    flat: dict[str, Any] = {}
    sections = {k for k in SCHEMA if k}
    for key in data:
        if key not in SCHEMA[""] and key not in sections:
            raise EdgekitError(f"{where}: {key}: unknown key (expected {', '.join([*SCHEMA[''], *sorted(sections)])})")
    for section, keys in SCHEMA.items():
        block = data if not section else data.get(section)
        if section and not isinstance(block, dict):
            raise EdgekitError(f"{where}: {section}: missing or not a mapping")
        assert isinstance(block, dict)
        for key in block:
            if section and key not in keys:
                raise EdgekitError(f"{where}: {section}.{key}: unknown key (expected {', '.join(keys)})")
        for key, (required, check) in keys.items():
            label = f"{section}.{key}" if section else key
            if key not in block:
                if required:
                    raise EdgekitError(f"{where}: {label}: required key is missing")
                continue
            err = check(block[key])
            if err:
                raise EdgekitError(f"{where}: {label}: {block[key]!r} {err}")
            flat[key] = block[key]
    if flat["reserved_gb"] >= flat["memory_gb"]:
        raise EdgekitError(f"{where}: device.reserved_gb: must be less than device.memory_gb")
    if flat["flavour"] == "standard" and flat["quant"] == "int4":
        raise EdgekitError(f"{where}: export.quant: the standard graph has no int4 path (mobile EPs lack one)")
    if "qdq" in flat and ("fixed_shapes" not in flat or flat["quant"] != "fp32"):
        raise EdgekitError(
            f"{where}: mobile.qdq: quantizes the fixed-shape pair of an fp32 graph (needs fixed_shapes, quant fp32)"
        )
    if flat["flavour"] == "standard" and flat.get("kv_cache") in ("int8", "int4"):
        raise EdgekitError(f"{where}: export.kv_cache: the standard graph has no quantized KV cache")
    return flat
