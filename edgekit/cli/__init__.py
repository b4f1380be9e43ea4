"""The `edgekit` command line: parses options, calls the library, prints. No logic of its own.

Every failure the user can cause ends as one line on stderr and a non-zero exit: `EdgekitError` and
click's usage errors alike. Commands register themselves in COMMANDS (one module per command).

May import: every other subpackage (it is the top layer).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import NoReturn

import click

from edgekit import __version__
from edgekit.errors import EdgekitError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup path (temporary bundles) runs."""


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    raise Terminated()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgekit")
def cli() -> None:
    """edgekit: make Llama-style models cheap enough for laptops, ARM boards and phones.

    Removes the attention sublayers of chosen decoder layers (arXiv 2404.05741), exports to ONNX with a
    KV cache for the layers that keep attention, quantizes with onnxruntime and writes a verified bundle.

    \b
    Example:
      edgekit export stories260k --skip 2 --quant int4
      edgekit inspect out/stories260k-skip2-int4
    """


def _register() -> None:
    from edgekit.cli import (
        analyze_cmd,
        chat_cmd,
        eval_cmd,
        export_cmd,
        inspect_cmd,
        models_cmd,
        profile_cmd,
        recipes_cmd,
        run_cmd,
        sweep_cmd,
        verify_cmd,
    )

    for module in (
        export_cmd,
        inspect_cmd,
        models_cmd,
        run_cmd,
        chat_cmd,
        profile_cmd,
        analyze_cmd,
        sweep_cmd,
        verify_cmd,
        eval_cmd,
        recipes_cmd,
    ):
        cli.add_command(module.command)


_register()


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rc = cli.main(args=argv, prog_name="edgekit", standalone_mode=False)
    except EdgekitError as e:
        _fail(str(e), e.exit_code)
    except click.exceptions.Abort as e:
        # click turns KeyboardInterrupt (and so our SIGTERM) into Abort; keep SIGTERM's exit status
        _fail(*(("terminated", 143) if isinstance(e.__context__, Terminated) else ("interrupted", 130)))
    except Terminated:
        _fail("terminated", 143)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except Exception as e:  # an edgekit bug, still one line unless debugging
        if os.environ.get("EDGEKIT_DEBUG"):
            raise
        _fail(
            f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
            "(set EDGEKIT_DEBUG=1 for the traceback)",
            2,
        )
    sys.exit(rc if isinstance(rc, int) else 0)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"edgekit: error: {' '.join(message.split())}", err=True)
    sys.exit(code)
