from __future__ import annotations

import sys
from pathlib import Path

import click

from edgekit.checkpoint.load import open_checkpoint
from edgekit.checkpoint.resolve import resolve_model
from edgekit.cli.options import checkpoint_options
from edgekit.cli.output import emit_json, layer_list
from edgekit.errors import EdgekitError
from edgekit.quality.analyze import DEFAULT_TOKEN_BUDGET, analyze_checkpoint


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
    help="Also measure perplexity with each attention sublayer removed on its own (one evaluation per layer).",
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
    n: int | None,
    plot: Path | None,
    allow_download: bool,
    trust_remote_code: bool,
    allow_pickle: bool,
    as_json: bool,
) -> None:
    """Rank attention sublayers by how little they change the hidden state (which to skip).

    For every layer: 1 − cos(residual entering the layer, residual after its attention sublayer),
    averaged over the calibration tokens (arXiv 2406.15786). Low scores are the redundant sublayers that
    `export --skip auto:N` removes. With --skip-measure, also the perplexity with each one removed.

    \b
    Examples:
      edgekit analyze stories260k --skip-measure --n 2 --plot layers.png
      edgekit analyze llama2-7b --calib wiki.valid.txt --tokens 2048 --n 8 --json
    """
    resolved = resolve_model(model, allow_download=allow_download)
    ckpt = open_checkpoint(resolved.path, resolved.source_id, trust_remote_code, allow_pickle)
    n = n if n is not None else max(1, ckpt.spec.num_layers // 4)
    progress = None
    if measure and sys.stderr.isatty() and not as_json:
        from tqdm import tqdm

        bar = tqdm(total=ckpt.spec.num_layers, desc="measure", unit="layer", file=sys.stderr, leave=False)
        progress = bar.update
    if not 0 <= n < ckpt.spec.num_layers:
        raise EdgekitError(f"--n {n}: must be between 0 and {ckpt.spec.num_layers - 1} (keep one attention layer)")
    analysis = analyze_checkpoint(ckpt, calib, token_budget, measure=measure, progress=progress, rounds=n)
    rec = analysis.recommend(n)
    if plot is not None:
        from edgekit.quality.analyze import plot_analysis

        plot_analysis(analysis, plot, n)
    if as_json:
        emit_json({**analysis.to_dict(n), "plot": str(plot) if plot else None})
        return
    click.echo(
        f"{analysis.model}: {analysis.num_layers} layers, {analysis.tokens} tokens of {analysis.calib} "
        f"({analysis.documents} documents)"
    )
    header = f"  {'layer':>5}  {'1-cos':>8}  {'rank':>4}"
    if analysis.baseline_ppl is not None:
        header += f"  {'ppl without it':>14}  {'change':>8}"
    click.echo(header)
    rank = {layer: r for r, layer in enumerate(analysis.ranking(), start=1)}
    for s in analysis.layers:
        line = f"  {s.layer:>5}  {s.importance:>8.4f}  {rank[s.layer]:>4}"
        if s.ppl_skipped is not None and s.ppl_change is not None:
            line += f"  {s.ppl_skipped:>14.3f}  {s.ppl_change:>+8.1%}"
        click.echo(line)
    if analysis.baseline_ppl is not None:
        click.echo(f"  intact model perplexity {analysis.baseline_ppl:.3f}")
    click.echo(f"recommended skip set for N={n}: {layer_list(rec.auto)}  (--skip auto:{n}, greedy re-scoring)")
    click.echo(f"  one-shot ranking (lowest {n} scores above) picks {layer_list(rec.one_shot)}")
    click.echo(
        f"  last {n} ({layer_list(rec.last_n)}) "
        + ("is the same set" if rec.auto_agrees_with_last_n else "differs from the recommendation")
    )
    if rec.by_measured is not None:
        click.echo(
            f"  measured single-layer ranking picks {layer_list(rec.by_measured)}: "
            + ("agrees" if rec.measured_agrees_with_auto else "disagrees")
            + " with the recommendation, "
            + ("agrees" if rec.measured_agrees_with_last_n else "disagrees")
            + " with last N"
        )
    if plot is not None:
        click.echo(f"chart: {plot}")
