from __future__ import annotations

from pathlib import Path

import click

from edgekit.bundle.folder import check_integrity, read_bundle
from edgekit.cli.output import emit_json
from edgekit.errors import EdgekitError


@click.command("verify")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (exit status 1 when it fails).")
def command(bundle: Path, as_json: bool) -> None:
    """Check a bundle before trusting it: manifest schema, then every file's size and sha256.

    Exits 0 only when edgekit.json is well formed and every file matches it, with no file missing or
    added. No edgekit on the device? `sha256sum -c` does the file part (see docs/reliability.md).

    \b
    Example:
      edgekit verify out/stories260k-skip2-int4
      edgekit verify out/stories260k-skip2-int4 --json
    """
    b = read_bundle(bundle)
    problems = check_integrity(b)
    if as_json:
        emit_json({"bundle": str(b.path), "ok": not problems, "files": len(b.manifest["files"]), "problems": problems})
        if problems:
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
