from __future__ import annotations

from pathlib import Path

import click

from edgekit.cli.options import runtime_options
from edgekit.cli.output import emit_json
from edgekit.errors import EdgekitError
from edgekit.runtime.profile import ProfileRequest, profile
from edgekit.runtime.profile_report import format_report


def _int_list(value: str, name: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError as e:
        raise EdgekitError(f"{name} {value!r}: expected integers separated by commas, e.g. 128,1024") from e
    if not out or min(out) < 1:
        raise EdgekitError(f"{name} {value!r}: every value must be at least 1")
    return out


@click.command("profile")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--compare", is_flag=True, help="Side by side: interleave the bundles' runs, print ratios against the first."
)
@click.option(
    "--prompt-len",
    default="128",
    show_default=True,
    metavar="N[,N...]",
    help="Prompt lengths (context), comma-separated.",
)
@click.option("--gen-len", default=64, show_default=True, type=click.IntRange(min=1), help="Timed decode steps.")
@click.option("--runs", default=3, show_default=True, type=click.IntRange(min=1), help="Runs per bundle.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0), help="Decode steps not timed.")
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="Every number (each run too) as JSON.")
def command(
    bundles: tuple[Path, ...],
    compare: bool,
    prompt_len: str,
    gen_len: int,
    runs: int,
    warmup: int,
    provider: str,
    threads: int | None,
    affinity: str | None,
    no_spin: bool,
    no_integrity_check: bool,
    as_json: bool,
) -> None:
    """Measure load time, first-token latency, prefill and decode speed, peak memory and sizes.

    Every run is a fresh process (so peak RSS is the bundle's own). With --compare (two or more
    bundles) the runs alternate A B A B and each ratio is taken between runs adjacent in time: the
    paper's measurement, a skipped bundle against its unskipped twin, is one command.

    \b
    Examples:
      edgekit profile out/stories260k-skip2-int4 --threads 2 --prompt-len 128,384 --gen-len 64
      edgekit profile out/base-int8 out/skip8-int8 --compare --prompt-len 128,1024 --runs 5
      edgekit profile out/x --provider xnnpack --threads 4 --json
    """
    if compare and len(bundles) < 2:
        raise EdgekitError("--compare needs two or more bundles, the baseline first")
    if not compare and len(bundles) > 1:
        raise EdgekitError("several bundles given: pass --compare to profile them side by side")
    req = ProfileRequest(
        bundles=bundles,
        prompt_lens=_int_list(prompt_len, "--prompt-len"),
        gen_len=gen_len,
        runs=runs,
        warmup=warmup,
        provider=provider,
        threads=threads,
        affinity=affinity,
        spin=not no_spin,
        check_integrity=not no_integrity_check,
    )
    report = profile(req)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(format_report(report))
