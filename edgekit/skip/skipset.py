"""Which decoder layers lose their attention sublayer.

A skip set is parsed from what the user typed (`--skip 8`, `--skip-layers 20,24-31`) against the
model's layer count, validated once here, and then passed around as a plain `SkipSet`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgekit.errors import EdgekitError

# ASCII digits only, at most 9: str.isdigit() accepts '²', which int() rejects, and int() refuses
# strings of more than 4,300 digits; both used to escape as ValueError instead of a message.
_RANGE = re.compile(r"^\s*([0-9]{1,9})\s*(?:-\s*([0-9]{1,9})\s*)?$")
_COUNT = re.compile(r"[0-9]{1,9}")


FILLS = ("zero", "mean")


@dataclass(frozen=True)
class Fill:
    """What replaces a removed attention sublayer: a constant vector added to the residual stream.

    "mean" is the sublayer's average output over calibration tokens (arXiv 2507.18212, 2505.24680 compensate
    removal the same way): the residual stream keeps the offset the sublayer contributed on average, at no
    cost per token (the constant folds into the next norm's bias). "zero" (no fill) is the paper's removal.
    """

    kind: str
    vectors: dict[int, Any] = field(repr=False)  # layer → float32 [hidden]
    calib: str = ""
    tokens: int = 0

    def to_manifest(self) -> dict[str, Any]:
        return {"kind": self.kind, "calib": self.calib, "tokens": self.tokens, "layers": sorted(self.vectors)}


@dataclass(frozen=True)
class SkipSet:
    num_layers: int
    skipped: tuple[int, ...]  # sorted, original layer indices whose attention sublayer is removed
    rule: str  # how it was chosen, for the manifest: "none", "last:8", "explicit", "auto:8", "cosine:8"
    ranking: dict[str, Any] | None = field(default=None, compare=False)  # RULE:N only: what it ranked by
    fill: Fill | None = field(default=None, compare=False)  # None: removed sublayers add nothing (zero)

    def fill_for(self, layer: int) -> Any:
        """The constant a removed layer adds to the residual stream, or None."""
        return None if self.fill is None else self.fill.vectors.get(layer)

    @property
    def kept(self) -> tuple[int, ...]:
        """Layers that keep attention, in order; position j in this tuple is KV-cache slot j."""
        gone = set(self.skipped)
        return tuple(i for i in range(self.num_layers) if i not in gone)

    def kv_slot(self, layer: int) -> int | None:
        try:
            return self.kept.index(layer)
        except ValueError:
            return None

    def to_manifest(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "skipped": list(self.skipped),
            "kept": list(self.kept),
            "attention_layers": len(self.kept),
            **({"ranking": self.ranking} if self.ranking else {}),
            "fill": self.fill.to_manifest() if self.fill else {"kind": "zero"},
        }

    @staticmethod
    def none(num_layers: int) -> SkipSet:
        return SkipSet(num_layers, (), "none")

    @staticmethod
    def explicit(layers: list[int] | tuple[int, ...], num_layers: int, rule: str = "explicit") -> SkipSet:
        layers = list(layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad:
            raise EdgekitError(f"skip set: layer {bad[0]} is out of range; the model has layers 0-{num_layers - 1}")
        dupes = sorted({i for i in layers if layers.count(i) > 1})
        if dupes:
            raise EdgekitError(f"skip set: layer {dupes[0]} is listed twice")
        if len(layers) >= num_layers:
            raise EdgekitError(
                f"skip set: removing attention from all {num_layers} layers leaves a bag-of-tokens model; "
                "keep at least one"
            )
        return SkipSet(num_layers, tuple(sorted(layers)), rule if layers else "none")


def parse_layer_list(text: str) -> list[int]:
    """'20,24-31' -> [20, 24, 25, ..., 31]. Keeps duplicates so the caller can report them."""
    if not text.strip():
        raise EdgekitError("skip set: empty layer list; give indices like 20,24-31")
    out: list[int] = []
    for part in text.split(","):
        m = _RANGE.match(part)
        if not m:
            raise EdgekitError(f"skip set: cannot read '{part.strip()}'; use indices and ranges like 20,24-31")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise EdgekitError(f"skip set: range {lo}-{hi} runs backwards")
        if hi - lo > 100_000:
            raise EdgekitError(f"skip set: range {lo}-{hi} is implausibly long")
        out.extend(range(lo, hi + 1))
    return out


RANKED_RULES = ("auto", "cosine", "gatenorm")  # how a ranked N is chosen (quality.select says how each works)


def parse_skip_count(text: str) -> int | str:
    """`--skip` value: a count N (skip the last N layers), or RULE:N with RULE auto, cosine or gatenorm."""
    t = text.strip().lower()
    rule, sep, n = t.partition(":")
    if sep:
        if rule not in RANKED_RULES:
            raise EdgekitError(f"--skip {text}: expected N or RULE:N with RULE one of {', '.join(RANKED_RULES)}")
        if not _COUNT.fullmatch(n):
            raise EdgekitError(f"--skip {text}: expected {rule}:N with N a whole number")
        return f"{rule}:{int(n)}"
    if not _COUNT.fullmatch(t):
        raise EdgekitError(f"--skip {text}: expected a whole number of layers (or auto:N)")
    return int(t)


def last_n(n: int, num_layers: int) -> SkipSet:
    if n < 0:
        raise EdgekitError("--skip must not be negative")
    if n >= num_layers:
        raise EdgekitError(
            f"--skip {n}: the model has {num_layers} layers; skipping all of them leaves no attention at all"
        )
    return SkipSet.explicit(list(range(num_layers - n, num_layers)), num_layers, rule=f"last:{n}" if n else "none")


def parse_ranked(skip: Any) -> tuple[str, int] | None:
    """'auto:8' → ("auto", 8), 'gatenorm:4' → ("gatenorm", 4); anything else → None."""
    if isinstance(skip, str):
        rule, _, n = skip.partition(":")
        if rule in RANKED_RULES and n.isdigit():
            return rule, int(n)
    return None


def choose_skip(
    num_layers: int,
    skip: int | str | None = None,
    skip_layers: str | None = None,
    rank: Callable[[str, int], SkipSet] | None = None,
) -> SkipSet:
    """--skip N (the last N), --skip RULE:N (`rank(RULE, N)` ranks the layers) or --skip-layers "20,24-31"."""
    if skip is not None and skip_layers is not None:
        raise EdgekitError("give either --skip or --skip-layers, not both")
    if skip_layers is not None:
        return SkipSet.explicit(parse_layer_list(skip_layers), num_layers)
    if isinstance(skip, str):
        ranked = parse_ranked(skip)
        if ranked is None:
            raise EdgekitError(f"--skip {skip}: expected a whole number N or auto:N")
        if rank is None:
            raise EdgekitError(f"--skip {skip}: {ranked[0]}:N needs the model to rank its layers on")
        return rank(*ranked)
    return last_n(skip or 0, num_layers)
