from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from edgekit.cli.output import emit_json
from edgekit.errors import EdgekitError
from edgekit.sweep.runner import SweepRequest, parse_list, run_sweep


@click.command("sweep")
@click.argument("model")
@click.option("--skip", "skips", default="0,1,2", show_default=True, help="Skip counts N, comma-separated.")
@click.option("--quant", "quants", default="fp32,int8,int4", show_default=True, help="Weight formats, comma-separated.")
@click.option("--auto", is_flag=True, help="Also run auto:N (the N least important layers, see `analyze`) per N.")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), required=True, help="Sweep folder.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True, help="Exports/evals in parallel.")
@click.option(
    "--text",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Eval text for perplexity [default: shipped TinyStories sample].",
)
@click.option("--max-tokens", type=click.IntRange(min=2), help="At most N tokens of --text.")
@click.option("--calib", type=click.Path(path_type=Path, dir_okay=False, exists=True), help="Ranks layers for auto:N.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True, help="Profile prompt length.")
@click.option("--gen-len", type=click.IntRange(min=1), default=32, show_default=True, help="Profile decode steps.")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Profile runs per bundle.")
@click.option("--threads", type=click.IntRange(min=1), help="Profile intra-op threads [default: one per core].")
@click.option("--no-verify", is_flag=True, help="Export without the parity check (faster, for quick looks).")
@click.option("--keep-bundles", is_flag=True, help="Keep every exported bundle under OUTPUT/bundles.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def command(
    model: str,
    skips: str,
    quants: str,
    auto: bool,
    output: Path,
    jobs: int,
    text: Path | None,
    max_tokens: int | None,
    calib: Path | None,
    prompt_len: int,
    gen_len: int,
    runs: int,
    threads: int | None,
    no_verify: bool,
    keep_bundles: bool,
    as_json: bool,
) -> None:
    """Export, evaluate and profile every skip × quantization combination; write a Pareto report.

    Each step runs in its own process; a failed configuration is recorded and the sweep goes on.
    Rerunning the same command keeps finished configurations and runs only the missing or failed ones.
    Writes OUTPUT/results.csv, results.json, report.md, report.html and pareto.png.

    \b
    Examples:
      edgekit sweep stories260k --skip 0,1,2,3,4 --quant fp32,int8,int4 --auto -o sweeps/stories --jobs 2
      edgekit sweep llama2-7b --skip 0,8 --quant int4 --text wiki.valid.txt --max-tokens 4096 -o sweeps/l7
    """
    try:
        skip_counts = [int(s) for s in parse_list(skips, "skip")]
    except ValueError as e:
        raise EdgekitError(f"--skip {skips}: expected whole numbers like 0,1,2") from e
    req = SweepRequest(
        model=model,
        skips=skip_counts,
        quants=parse_list(quants, "quant"),
        output=output,
        auto=auto,
        jobs=jobs,
        text=text,
        max_tokens=max_tokens,
        calib=calib,
        verify=not no_verify,
        keep_bundles=keep_bundles,
        prompt_len=prompt_len,
        gen_len=gen_len,
        runs=runs,
        threads=threads,
        command="edgekit " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    result = run_sweep(req, on_event=None if as_json else lambda s: click.echo(s, err=True))
    if as_json:
        emit_json({"output": str(result.output), "report": str(result.report), "results": result.rows})
        return
    failed = [r for r in result.rows if r.get("status") != "ok"]
    click.echo(
        f"{len(result.rows)} configurations ({len(result.reused)} from an earlier run), {len(failed)} failed; "
        f"report: {result.report}"
    )
    for r in failed:
        click.echo(f"  {r['name']}: {r.get('error')}")
