"""Device recipes: what works for one target (graph flavour, quantization, provider, threads, memory).

A recipe is a small YAML file. The shipped ones live in `edgekit/data/recipes/` (package data, so an
installed edgekit has them; the repository's top-level `recipes/` is a link to that folder). Every
file is checked against `recipe_schema.SCHEMA` when loaded: an unknown key or a bad value is an error naming the file
and the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit import DATA_DIR
from edgekit.errors import EdgekitError
from edgekit.targets.recipe_schema import ISA_PRESETS, NAME, parse_coverage, validate

__all__ = ["ISA_PRESETS", "RECIPES_DIR", "Recipe", "get_recipe", "parse_coverage", "parse_recipe", "shipped_recipes"]

RECIPES_DIR = DATA_DIR / "recipes"


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
    coverage: dict[str, dict[str, str]] = field(default_factory=dict)
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
            "coverage": {p: dict(g) for p, g in self.coverage.items()},
        }


def parse_recipe(text: str, where: str) -> Recipe:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise EdgekitError(f"{where}: not valid YAML: {' '.join(str(e).split())}") from e
    except RecursionError as e:  # PyYAML recurses per nesting level
        raise EdgekitError(f"{where}: not a recipe: its YAML nests too deeply") from e
    flat = validate(data, where)
    flat["providers"] = tuple({"name": p["name"], "options": dict(p.get("options") or {})} for p in flat["providers"])
    fixed = flat.pop("fixed_shapes", None)
    flat["emulated"] = dict(flat.get("emulated") or {})
    flat["coverage"] = {p: {g: str(t) for g, t in gs.items()} for p, gs in (flat.get("coverage") or {}).items()}
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
    if not NAME.match(name_or_path):
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
