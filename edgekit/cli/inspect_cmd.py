from __future__ import annotations

from pathlib import Path

import click

from edgekit.bundle.folder import read_bundle
from edgekit.cli.output import emit_json, human_bytes, layer_list


@click.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def command(bundle: Path, as_json: bool) -> None:
    """Show what is in a bundle: source, skipped layers, KV layout, quantization, checks, files.

    \b
    Example:
      edgekit inspect out/stories260k-skip2-int4
      edgekit inspect out/stories260k-skip2-int4 --json | jq .skip
    """
    b = read_bundle(bundle)
    m = b.manifest
    if as_json:
        emit_json(m)
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
