from __future__ import annotations

import click

from edgekit.cli.output import emit_json
from edgekit.targets.recipes import ISA_PRESETS, Recipe, get_recipe, shipped_recipes


def _as_dict(r: Recipe) -> dict:
    d = {k: v for k, v in r.__dict__.items() if k != "source"}
    d["source"] = str(r.source) if r.source else None
    d["usable_memory_gb"] = round(r.memory_gb - r.reserved_gb, 2)
    return d


@click.group("recipes", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print the recipes as JSON.")
@click.pass_context
def command(ctx: click.Context, as_json: bool) -> None:
    """List the device recipes, one line each (`show NAME` for one in full).

    A recipe sets the graph flavour, quantization, providers, threads, context and memory budget for a
    target; use it with `edgekit export MODEL --recipe NAME` or `make <target> MODEL=...`.

    \b
    Examples:
      edgekit recipes
      edgekit recipes show raspberry-pi-5
      edgekit export stories260k --recipe android-arm64 -o out/stories-android
    """
    if ctx.invoked_subcommand is not None:
        return
    recipes = shipped_recipes()
    if as_json:
        emit_json([_as_dict(r) for r in recipes])
        return
    for r in recipes:
        flags = "+ort" if r.emit_ort else ""
        click.echo(
            f"{r.name:24} make {r.make_target:14} {r.flavour:8} {r.quant:5} {r.provider:26} "
            f"{r.memory_gb:g} GB {flags:4} {r.description}"
        )


@command.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the recipe as JSON.")
def show(name: str, as_json: bool) -> None:
    """Show one recipe in full: NAME is a recipe name, its make target, or a .yaml file.

    \b
    Examples:
      edgekit recipes show raspberry-pi-5
      edgekit recipes show pi5 --json
      edgekit recipes show ./my-board.yaml
    """
    r = get_recipe(name)
    if as_json:
        emit_json(_as_dict(r))
        return
    q = ", ".join(
        f"{k} {getattr(r, k)}"
        for k in ("block_size", "accuracy_level", "symmetric", "lm_head_bits")
        if getattr(r, k) is not None
    )
    preset = ISA_PRESETS[r.isa_preset]
    rows = [
        ("recipe", f"{r.name} ({r.source})"),
        ("device", f"{r.description}; {r.arch}, {r.cores} cores"),
        (
            "memory",
            f"{r.memory_gb:g} GB, {r.reserved_gb:g} GB reserved → {r.memory_gb - r.reserved_gb:g} GB for the model",
        ),
        ("graph", r.flavour + (f", skip {r.skip}" if r.skip is not None else "")),
        ("quant", r.quant + (f" ({q})" if q else "")),
        ("isa preset", r.isa_preset + (" " + ", ".join(f"{k}={v}" for k, v in preset.items()) if preset else "")),
        ("context", f"{r.max_context} (clamped to the model's)"),
        ("providers", " → ".join(p["name"] + (f" {p['options']}" if p["options"] else "") for p in r.providers)),
        ("threads", str(r.threads)),
        ("ort format", "yes (.ort + required_operators.config)" if r.emit_ort else "no"),
        (
            "fixed shapes",
            f"prefill {r.fixed_shapes['prefill']}, context {r.fixed_shapes['context']}" if r.fixed_shapes else "no",
        ),
        ("make", f"make {r.make_target} MODEL=..."),
        ("tested", r.tested),
        ("unverified", r.unverified),
    ]
    for k, v in rows:
        click.echo(f"{k:13} {v}")
