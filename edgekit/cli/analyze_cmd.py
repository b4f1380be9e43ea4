from __future__ import annotations

from pathlib import Path

import click

from edgekit.checkpoint.load import open_checkpoint
from edgekit.checkpoint.resolve import resolve_model
from edgekit.cli.options import checkpoint_options
from edgekit.cli.output import emit_json, layer_list
from edgekit.errors import EdgekitError
from edgekit.quality.analyze import DEFAULT_TOKEN_BUDGET, analyze_checkpoint
from edgekit.quality.fill import DEFAULT_FILL
from edgekit.skip.skipset import FILLS


@click.command("analyze")
@click.argument("model")
@click.option(
    "--calib",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Calibration text; documents split on <|endoftext|> [default: TinyStories for stories260K, else "
    "general English (WikiText-2)].",
)
@click.option(
    "--tokens",
    "token_budget",
    type=click.IntRange(min=2),
    default=DEFAULT_TOKEN_BUDGET,
    show_default=True,
    help="Calibration tokens to read.",
)
@click.option(
    "--skip-measure",
    "--measure",
    "measure",
    is_flag=True,
    help="Also measure perplexity with each attention sublayer removed on its own, with and without its fill "
    "(two evaluations per layer).",
)
@click.option(
    "--fill",
    type=click.Choice(FILLS),
    default=DEFAULT_FILL,
    show_default=True,
    help="The fill the measured ranking (auto:N) assumes; use the one you will export with.",
)
@click.option("-n", "--n", "n", type=int, help="Recommend a skip set of N layers [default: a quarter of the layers].")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), help="Write a bar chart PNG here.")
@checkpoint_options
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON.")
def command(
    model: str,
    calib: Path | None,
    token_budget: int,
    measure: bool,
    fill: str,
    n: int | None,
    plot: Path | None,
    allow_download: bool,
    trust_remote_code: bool,
    allow_pickle: bool,
    as_json: bool,
) -> None:
    """Rank attention sublayers three ways and recommend which N to skip.

    auto (what `export --skip auto:N` removes): greedy, each round removes the sublayer whose removal,
    with --fill, raised calibration perplexity least. cosine: 1 − cos(residual entering the layer,
    residual after its attention), arXiv 2406.15786, greedy re-scored. gatenorm: query–key coupling
    from the weights alone, arXiv 2512.20636. With --skip-measure, also each sublayer removed on its own.

    \b
    Examples:
      edgekit analyze stories260k --skip-measure --n 2 --plot layers.png
      edgekit analyze smollm2-135m-instruct --n 8 --json
    """
    resolved = resolve_model(model, allow_download=allow_download)
    ckpt = open_checkpoint(resolved.path, resolved.source_id, trust_remote_code, allow_pickle)
    n = n if n is not None else max(1, ckpt.spec.num_layers // 4)
    if not 0 <= n < ckpt.spec.num_layers:
        raise EdgekitError(f"--n {n}: must be between 0 and {ckpt.spec.num_layers - 1} (keep one attention layer)")
    analysis = analyze_checkpoint(ckpt, calib, token_budget, measure=measure, rounds=n, fill=fill)
    rec = analysis.recommend(n)
    if plot is not None:
        from edgekit.quality.analyze import plot_analysis

        plot_analysis(analysis, plot, n)
    if as_json:
        emit_json({**analysis.to_dict(n), "plot": str(plot) if plot else None})
        return
    base = analysis.baseline_ppl
    click.echo(
        f"{analysis.model}: {analysis.num_layers} layers, {analysis.tokens} tokens of {analysis.calib} "
        f"({analysis.documents} documents), intact perplexity {base:.3f}, fill {fill}"
    )
    header = f"  {'layer':>5}  {'1-cos':>8}  {'gate-norm':>9}"
    if measure:
        header += f"  {'removed alone: nothing added':>28}  {'mean added':>16}"
    click.echo(header)
    for s in analysis.layers:
        line = f"  {s.layer:>5}  {s.importance:>8.4f}  {s.gate_norm:>9.4f}"
        if s.ppl_zero is not None and s.ppl_mean is not None:
            zero, mean = s.ppl_zero / base - 1, s.ppl_mean / base - 1
            line += f"  {s.ppl_zero:>19.3f} {zero:>+8.1%}  {s.ppl_mean:>7.3f} {mean:>+8.1%}"
        click.echo(line)

    def cost(rule: str) -> str:
        ppl = rec.ppl_after.get(rule)
        return f"  calibration perplexity {ppl:.3f} ({ppl / base - 1:+.1%})" if ppl else ""

    click.echo(f"skip sets for N={n}:")
    click.echo(f"  auto:{n}      {layer_list(rec.auto):<24}{cost('auto')}  (measured greedy, the default)")
    click.echo(f"  cosine:{n}    {layer_list(rec.cosine):<24}{cost('cosine')}")
    click.echo(f"  gatenorm:{n}  {layer_list(rec.gatenorm):<24}  (from the weights)")
    click.echo(f"  last {n}      {layer_list(rec.last_n):<24}")
    if rec.by_measured is not None:
        click.echo(f"  alone-best  {layer_list(rec.by_measured):<24}  (the N cheapest removed one at a time)")
    click.echo("took " + ", ".join(f"{k} {v:.0f} s" for k, v in analysis.seconds.items()))
    if plot is not None:
        click.echo(f"chart: {plot}")
