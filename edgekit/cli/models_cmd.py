from __future__ import annotations

import click

from edgekit.checkpoint.registry import ALIASES
from edgekit.checkpoint.resolve import hf_cache_dir
from edgekit.cli.output import emit_json


def _status(alias: str) -> str:
    a = ALIASES[alias]
    if a.embedded_path and a.embedded_path.is_dir():
        return "embedded"
    folder = hf_cache_dir() / ("models--" + a.hub_id.replace("/", "--"))
    return "in HF cache" if (folder / "snapshots").is_dir() else "not downloaded"


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print the aliases as JSON.")
def command(as_json: bool) -> None:
    """List the model aliases edgekit knows and whether each is available offline.

    \b
    Example:
      edgekit models
      edgekit export tinyllama-1.1b --skip 6 --quant int4   # once it is in the HF cache
    """
    rows = [
        {
            "alias": a.name,
            "hub_id": a.hub_id,
            "layers": a.layers,
            "params": a.params,
            "status": _status(a.name),
            "description": a.description,
        }
        for a in ALIASES.values()
    ]
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        click.echo(f"{r['alias']:<16} {r['params']:>5} {r['layers']:>3} layers  {r['status']:<15} {r['hub_id']}")
    click.echo(f"(Hugging Face cache: {hf_cache_dir()}; download with `huggingface-cli download HUB_ID`)")
