from __future__ import annotations

from pathlib import Path

import click

from edgekit.bundle.folder import read_bundle
from edgekit.cli.output import emit_json, human_bytes, layer_list
from edgekit.runtime.providers import RuntimeOptions, bundle_placements


@click.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--provider",
    metavar="NAME",
    help="Also load every graph of the bundle on this execution provider (with the recipe's options) and show "
    "how many nodes it takes and which op types fall back to the CPU.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def command(bundle: Path, provider: str | None, as_json: bool) -> None:
    """Show what is in a bundle: source, skipped layers, KV layout, quantization, checks, files.

    \b
    Example:
      edgekit inspect out/stories260k-skip2-int4
      edgekit inspect out/stories260k-skip2-int4 --json | jq .skip
      edgekit inspect out/stories260k-qnn --provider qnn      # nodes on QNN per graph
    """
    b = read_bundle(bundle)
    m = b.manifest
    placed = bundle_placements(b.path, m, RuntimeOptions(provider=provider)) if provider else {}
    if as_json:
        emit_json(m | ({"placement": {k: p.to_dict() for k, p in placed.items()}} if placed else {}))
        return
    a, sk, g, q = m["architecture"], m["skip"], m["graph"], m["quantization"]
    click.echo(f"{b.path}  (edgekit bundle, schema {m['schema_version']})")
    click.echo(
        f"  source       {m['source']['id']}  [{m['source']['model_type']}, config sha256 "
        f"{m['source']['config_sha256'][:12]}]"
    )
    click.echo(
        f"  shape        {a['num_layers']} layers, hidden {a['hidden_size']}, {a['num_attention_heads']} heads / "
        f"{a['num_key_value_heads']} KV heads, vocab {a['vocab_size']}, context {a['max_context']}"
    )
    click.echo(f"  attention    kept {layer_list(sk['kept'])}; removed {layer_list(sk['skipped'])} (rule {sk['rule']})")
    click.echo(
        f"  KV cache     {len(g['kv_slots'])} slots, {g['kv_layout']} {g['kv_dtype']}, "
        f"{human_bytes(g['kv_bytes_per_token'])}/token; slot→layer "
        + ", ".join(f"{s['slot']}→{s['layer']}" for s in g["kv_slots"])
    )
    click.echo(f"  graph        {g['file']} ({g['flavour']}, opset {g['opset']})")
    click.echo(
        f"  weights      {q['mode']}"
        + (f", block {q['block_size']}, lm_head {q['lm_head']}, embedding {q['embedding']}" if q.get("bits") else "")
    )
    v = m.get("verification")
    if v:
        click.echo(
            f"  verified     max |Δlogit| {v['max_abs_logit_diff']:.2e}, top-1 {v['top1_agreement']:.1%}, "
            f"greedy {'match' if v['greedy_match'] else 'differ'}"
            + (f", ppl {v['ppl_onnx']:.3f} vs fp32 {v['ppl_torch_fp32']:.3f}" if v.get("ppl_onnx") else "")
        )
    for name, f in m["files"].items():
        click.echo(f"  file         {name:<24} {human_bytes(f['bytes']):>10}  sha256 {f['sha256'][:16]}")
    click.echo(f"  made by      {m.get('command', '?')}")
    for name, p in placed.items():
        click.echo(f"  on {provider:<9} {name:<8} {p.summary()}")
