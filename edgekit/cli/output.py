"""Small shared printing helpers for the CLI: JSON for scripts, sizes for people."""

from __future__ import annotations

import json
from typing import Any

import click


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def layer_list(layers: list[int]) -> str:
    """[0,1,2,5] → '0-2,5'"""
    if not layers:
        return "none"
    runs, start, prev = [], layers[0], layers[0]
    for i in [*layers[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(f"{start}-{prev}" if prev > start else str(start))
        if i is not None:
            start = prev = i
    return ",".join(runs)
