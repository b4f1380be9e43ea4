from __future__ import annotations

from pathlib import Path

import click

from edgekit.bundle.folder import Bundle, check_integrity, read_bundle
from edgekit.cli.output import emit_json
from edgekit.errors import EdgekitError


def _cores(value: str | None) -> list[str]:
    if value is None:
        return []
    from edgekit.targets.arm_env import CORES, DEFAULT_CORES

    names = list(DEFAULT_CORES) if value == "all" else [c.strip() for c in value.split(",") if c.strip()]
    unknown = [c for c in names if c not in CORES]
    if unknown or not names:
        raise EdgekitError(f"--emulate {value!r}: cores are {', '.join(CORES)} (comma-separated) or all")
    return names


def _emulate(bundle: Bundle, cores: list[str], text: Path | None, as_json: bool) -> list[dict]:
    from edgekit.targets.arm_env import CORES
    from edgekit.targets.emulate import check_cores, probe_jobs, probe_text

    say = (lambda line: None) if as_json else (lambda line: click.echo(f"  {line}", err=True))
    jobs = probe_jobs(bundle, text=text)
    checks = check_cores(jobs, cores, say=say)
    if not as_json:
        source = (text or probe_text(bundle)).name
        click.echo(
            f"emulated aarch64 against this host: {len(jobs[0].text_ids)} tokens of {source} in one prompt, "
            f"{jobs[0].new_tokens} greedy tokens"
        )
        for c in checks:
            result = c.agreement.summary() if c.agreement else f"error: {c.error}"
            click.echo(f"  {c.core:12s} {c.job.graph:5s}  {result}   ({CORES[c.core].boards})")
    return [c.to_dict() for c in checks]


def _hint(bundle: Bundle) -> str:
    quant = bundle.manifest.get("quantization") or {}
    if quant.get("mode") == "int8" and bundle.manifest["graph"].get("flavour") == "standard":
        return (
            "; onnxruntime fuses this graph's DequantizeLinear->MatMul into MatMulNBits at accuracy level 4 "
            "(int8 compute where a core has dot products, fp32 where not); its .ort file is stored unfused"
        )
    if quant.get("mode") in ("int4", "int8") and quant.get("accuracy_level") == 4:
        return (
            "; accuracy level 4 computes in int8 where a core has dot products and in fp32 where not, each "
            "rounding its own way: --accuracy-level 1 computes the same everywhere"
        )
    return ""


def _disagreement(bundle: Bundle, checks: list[dict]) -> str | None:
    """The one-line failure (a graph that errors, or computes text of another quality), or None."""
    bad = [c for c in checks if c["error"] or c["agreement"]["verdict"] == "differs"]
    if not bad:
        return None
    first = bad[0]
    if first["error"]:
        return f"the bundle's {first['graph']} graph does not run on emulated {first['core']}: {first['error']}"
    a = first["agreement"]
    return (
        f"on {', '.join(sorted({c['core'] for c in bad}))} this bundle computes differently from this host "
        f"(greedy {a['greedy_same']}/{a['greedy_total']} tokens equal, perplexity {a['other_ppl']:.3g} vs "
        f"{a['host_ppl']:.3g}){_hint(bundle)}"
    )


def _close_note(bundle: Bundle, checks: list[dict]) -> str | None:
    close = sorted({c["core"] for c in checks if c["agreement"] and c["agreement"]["verdict"] == "close"})
    if not close:
        return None
    return (
        f"note: on {', '.join(close)} the greedy text diverges from this host's at the same perplexity: this "
        f"host's checks vouch for the quality there, not for the exact words{_hint(bundle)}"
    )


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--emulate",
    metavar="CORES",
    help="Also run the bundle on emulated aarch64 onnxruntime (qemu-user-static) on these cores, e.g. "
    "cortex-a72 (Raspberry Pi 4) or cortex-a53,cortex-a76, or all, and compare with this host.",
)
@click.option(
    "--text",
    type=click.Path(path_type=Path, dir_okay=False),
    help="With --emulate: the text to compare logits on (default: the export's verification text).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (exit status 1 when it fails).")
def command(bundle: Path, emulate: str | None, text: Path | None, as_json: bool) -> None:
    """Check a bundle before trusting it: manifest schema, then every file's size and sha256; with
    --emulate, also whether aarch64 cores compute what this host does.

    Exits 0 only when edgekit.json is well formed and every file matches it, with no file missing or
    added, and (with --emulate) every graph runs on every core at the host's quality: exact, agrees (the
    same greedy text), close (other words, perplexity within 2%) or differs (a failure). No edgekit on
    the device? `sha256sum -c` does the file part (see docs/reliability.md). Emulation tells whether
    the ARM kernels compute the same; only the board tells speed and memory.

    \b
    Example:
      edgekit verify out/stories260k-skip2-int4
      edgekit verify out/stories260k-skip2-int4 --emulate cortex-a72
      edgekit verify out/stories260k-skip2-int4 --emulate all --json
    """
    cores = _cores(emulate)
    if text is not None and not cores:
        raise EdgekitError("--text goes with --emulate (the text the cores are compared on)")
    b = read_bundle(bundle)
    problems = check_integrity(b)
    if as_json:
        checks = _emulate(b, cores, text, as_json) if cores and not problems else []
        failure = _disagreement(b, checks)
        out = {"bundle": str(b.path), "ok": not problems and not failure, "files": len(b.manifest["files"])}
        out["problems"] = problems
        if cores:
            out["emulated"] = checks
        emit_json(out)
        if problems or failure:
            raise SystemExit(1)
        return
    if problems:
        for p in problems:  # the full list on stdout; stderr gets the one-line verdict
            click.echo(f"  {p}")
        raise EdgekitError(
            f"bundle {b.path} does not match its manifest: {len(problems)} problem{'s' if len(problems) > 1 else ''}"
            f" ({problems[0]})"
        )
    total = sum(f["bytes"] for f in b.manifest["files"].values())
    click.echo(
        f"ok  {b.path}: manifest schema {b.manifest['schema_version']}, {len(b.manifest['files'])} files, "
        f"{total} bytes, every sha256 matches"
    )
    if cores:
        checks = _emulate(b, cores, text, as_json)
        if note := _close_note(b, checks):
            click.echo(note, err=True)
        if failure := _disagreement(b, checks):
            raise EdgekitError(failure)
