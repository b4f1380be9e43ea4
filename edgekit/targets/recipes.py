"""Device recipes: what works for one target (graph flavour, quantization, provider, threads, memory).

A recipe is a small YAML file. The shipped ones live in `edgekit/data/recipes/` (package data, so an
installed edgekit has them; the repository's top-level `recipes/` is a link to that folder). Every
file is checked against SCHEMA when loaded: an unknown key or a bad value is an error naming the file
and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit import DATA_DIR
from edgekit.errors import EdgekitError
from edgekit.export.graph import FLAVOURS
from edgekit.export.kv_cache import KV_CACHES
from edgekit.export.quantize import QUANT_MODES
from edgekit.runtime.agreement import VERDICTS
from edgekit.targets.arm_env import CORES

RECIPES_DIR = DATA_DIR / "recipes"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")

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
    if isinstance(v, str) and _NAME.match(v):
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


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    make_target: str
    tested: str
    unverified: str
    arch: str
    cores: int
    memory_gb: float
    reserved_gb: float
    flavour: str
    quant: str
    isa_preset: str
    max_context: int
    providers: tuple[dict[str, Any], ...]
    threads: int
    emit_ort: bool
    skip: int | None = None
    block_size: int | None = None
    accuracy_level: int | None = None
    symmetric: bool | None = None
    lm_head_bits: int | None = None
    kv_cache: str | None = None
    fixed_shapes: dict[str, int] | None = None
    qdq: dict[str, str] | None = None
    emulated: dict[str, str] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False)

    @property
    def usable_memory_bytes(self) -> int:
        return int(max(self.memory_gb - self.reserved_gb, 0) * 1024**3)

    @property
    def provider(self) -> str:
        return self.providers[0]["name"]

    def to_manifest(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "device": {
                "arch": self.arch,
                "cores": self.cores,
                "memory_gb": self.memory_gb,
                "reserved_gb": self.reserved_gb,
            },
            "providers": [dict(p) for p in self.providers],
            "threads": self.threads,
            "isa_preset": {"name": self.isa_preset, **ISA_PRESETS[self.isa_preset]},
            "emit_ort": self.emit_ort,
            "fixed_shapes": self.fixed_shapes,
            "qdq": self.qdq,
            "emulated": dict(self.emulated),
        }


def _validate(data: Any, where: str) -> dict[str, Any]:
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


def parse_recipe(text: str, where: str) -> Recipe:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise EdgekitError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from e
    except RecursionError as e:  # PyYAML recurses per nesting level
        raise EdgekitError(f"{where}: not a recipe: its YAML nests too deeply") from e
    flat = _validate(data, where)
    flat["providers"] = tuple({"name": p["name"], "options": dict(p.get("options") or {})} for p in flat["providers"])
    fixed = flat.pop("fixed_shapes", None)
    flat["emulated"] = dict(flat.get("emulated") or {})
    return Recipe(**flat, fixed_shapes=dict(fixed) if fixed else None)


def load_recipe_file(path: Path) -> Recipe:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgekitError(f"cannot read recipe {path}: {e}") from e
    recipe = parse_recipe(text, str(path))
    return Recipe(**{**recipe.__dict__, "source": path})


def shipped_recipes() -> list[Recipe]:
    out = []
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        recipe = load_recipe_file(path)
        if recipe.name != path.stem:
            raise EdgekitError(f"{path}: name: {recipe.name!r} must match the file name {path.stem!r}")
        out.append(recipe)
    return out


def get_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name or make target (`raspberry-pi-5`, `pi5`), or a YAML file of your own."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise EdgekitError(f"recipe file {path} does not exist")
        return load_recipe_file(path)
    if not _NAME.match(name_or_path):
        raise EdgekitError(f"recipe name {name_or_path!r} is not a plain name; give a name or a .yaml file")
    recipes = shipped_recipes()
    for r in recipes:
        if name_or_path in (r.name, r.make_target):
            return r
    raise EdgekitError(f"unknown recipe '{name_or_path}'; choose one of {', '.join(r.name for r in recipes)}")


# What a recipe may set on `edgekit export`; an option given on the command line always wins.
RECIPE_OPTIONS = (
    "skip",
    "quant",
    "flavour",
    "block_size",
    "accuracy_level",
    "symmetric",
    "lm_head_bits",
    "kv_cache",
)


def resolve_options(recipe: Recipe | None, explicit: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Command-line value if the user typed it, else the recipe's, else the option's default.

    `--skip-layers` on the command line also suppresses the recipe's `skip` (they are alternatives), and
    the recipe's max_context is applied later, clamped to the model's (see targets.recipe_context).
    """
    out = {**defaults, **explicit}
    if recipe is None:
        return out
    for key in RECIPE_OPTIONS:
        value = getattr(recipe, key)
        if key in explicit or value is None or (key == "skip" and "skip_layers" in explicit):
            continue
        out[key] = value
    return out
