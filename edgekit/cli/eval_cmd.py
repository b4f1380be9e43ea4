from __future__ import annotations

import sys
from pathlib import Path

import click

from edgekit.cli.options import checkpoint_options, skip_options
from edgekit.cli.output import emit_json, layer_list
from edgekit.errors import EdgekitError
from edgekit.quality.evaluate import EvalRequest, EvalResult, evaluate
from edgekit.quality.perplexity import DOC_SEPARATOR, parse_separator
from edgekit.skip.skipset import FILLS, parse_skip_count


def _task_paths(tasks: str | None) -> list[Path]:
    if not tasks:
        return []
    paths = [Path(t.strip()).expanduser() for t in tasks.split(",") if t.strip()]
    if not paths:
        raise EdgekitError("--tasks: give one or more JSONL files, comma-separated")
    return paths


@click.command("eval")
@click.argument("model")
@click.option("--text", type=click.Path(path_type=Path, dir_okay=False), help="Text file for perplexity.")
@click.option(
    "--separator",
    default=DOC_SEPARATOR,
    show_default=True,
    help=r"Splits --text into documents scored separately; escapes like '\n' work; 'none' = one document.",
)
@click.option("--window", type=int, help="Tokens per scoring window [default: min(context, 1024)].")
@click.option("--stride", type=int, help="Tokens between window starts [default: window/2].")
@click.option("--reference", metavar="BUNDLE_OR_MODEL", help="Top-1 agreement and KL against this model.")
@click.option("--tasks", metavar="FILES", help="Multiple-choice JSONL files (HellaSwag/ARC shape), comma-separated.")
@click.option("--limit", type=click.IntRange(min=1), help="At most N documents of --text and N examples per task.")
@click.option("--max-tokens", type=click.IntRange(min=2), help="At most N tokens of --text.")
@skip_options(scope="Checkpoint only. ")
@click.option(
    "--fill",
    type=click.Choice(FILLS),
    help="Checkpoint only: what a removed sublayer leaves behind (its mean output on --calib), as export does "
    "[default: as export].",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="With --skip auto:N or --fill mean: the text that ranks the layers and measures the fill "
    "[default: TinyStories for stories260K, else general English (WikiText-2)].",
)
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads [default: all cores].")
@click.option(
    "--stream/--no-stream",
    default=None,
    help="Checkpoints: hold one layer in memory at a time [default: when fp32 would not fit].",
)
@click.option("--no-integrity-check", is_flag=True, help="Use bundles whose files do not match their manifest.")
@checkpoint_options
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def command(
    model: str,
    text: Path | None,
    separator: str,
    window: int | None,
    stride: int | None,
    reference: str | None,
    tasks: str | None,
    limit: int | None,
    max_tokens: int | None,
    skip: str | None,
    skip_layers: str | None,
    calib: Path | None,
    fill: str | None,
    threads: int | None,
    stream: bool | None,
    no_integrity_check: bool,
    allow_download: bool,
    trust_remote_code: bool,
    allow_pickle: bool,
    as_json: bool,
) -> None:
    """Measure quality: perplexity, agreement with a reference, multiple-choice accuracy.

    MODEL is a bundle folder, or a checkpoint (alias, folder, cached hub id) with an optional skip set,
    so a skip set can be judged before an export is spent on it.

    \b
    Examples:
      edgekit eval out/skip8-int4 --text wiki.valid.txt
      edgekit eval llama2-7b --skip 8 --text wiki.valid.txt
      edgekit eval out/skip8-int4 --reference out/base-fp32 --text t.txt
      edgekit eval out/skip8-int4 --tasks hellaswag.jsonl,arc.jsonl --limit 200
      edgekit eval stories260k --skip 2 --text tinystories-valid.txt --separator '\\n'
    """
    req = EvalRequest(
        target=model,
        skip=parse_skip_count(skip) if skip is not None else None,
        skip_layers=skip_layers,
        calib=calib,
        fill=fill,
        text=text,
        separator=parse_separator(separator),
        window=window,
        stride=stride,
        reference=reference,
        tasks=_task_paths(tasks),
        limit=limit,
        max_tokens=max_tokens,
        check_integrity=not no_integrity_check,
        threads=threads,
        streaming=stream,
        allow_download=allow_download,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        progress=sys.stderr.isatty() and not as_json,
    )
    result = evaluate(req)
    if as_json:
        emit_json(result.to_dict())
    else:
        _print(result)


def _print(r: EvalResult) -> None:
    m = r.model
    kept = [i for i in range(m["num_layers"]) if i not in m["skipped"]]
    click.echo(
        f"{m['model']}  ({m['kind']}, {m['quant']}, attention in {len(kept)} of {m['num_layers']} layers, "
        f"removed from {layer_list(m['skipped'])})"
    )
    if r.perplexity and r.text:
        p, t = r.perplexity, r.text
        click.echo(
            f"  perplexity  {p.perplexity:.3f}  [95% CI {p.ci95[0]:.3f}-{p.ci95[1]:.3f}]  on {p.tokens} tokens, "
            f"{p.documents} documents of {Path(t.path).name} (window {t.window}, stride {t.stride})"
        )
    if r.agreement:
        a = r.agreement
        click.echo(
            f"  agreement   top-1 {a.top1_agreement:.2%}, mean KL {a.mean_kl:.4g} nats (max {a.max_kl:.3g}) over "
            f"{a.positions} positions vs {a.reference} (its perplexity {a.reference_perplexity:.3f})"
        )
    for task in r.tasks:
        click.echo(
            f"  task        {task.task}: acc {task.acc:.3f} ± {task.acc_stderr:.3f}, acc_norm {task.acc_norm:.3f} "
            f"± {task.acc_norm_stderr:.3f} on {task.examples} examples (chance {task.chance:.3f})"
        )
