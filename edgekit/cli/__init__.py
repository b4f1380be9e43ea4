"""The `edgekit` command line: parses options, calls the library, prints. No logic of its own.

Every failure the user can cause ends as one line on stderr and a non-zero exit: `EdgekitError` and
click's usage errors alike. COMMANDS maps each command to its module (one per command), imported on use.

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


# Each command's module, imported when the command runs (or its help is shown): `edgekit run` on a board
# installed without the export extra (torch, transformers, onnx) must not import the export pipeline.
COMMANDS = {
    "export": "export_cmd",
    "inspect": "inspect_cmd",
    "models": "models_cmd",
    "run": "run_cmd",
    "chat": "chat_cmd",
    "profile": "profile_cmd",
    "analyze": "analyze_cmd",
    "sweep": "sweep_cmd",
    "verify": "verify_cmd",
    "eval": "eval_cmd",
    "recipes": "recipes_cmd",
}
EXPORT_EXTRA = "pip install 'edgekit[export]'"


def _missing(name: str, package: str) -> click.Command:
    """A stand-in for a command whose dependencies are not installed: says which, and how to get them."""

    @click.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def command() -> None:
        raise EdgekitError(f"edgekit {name} needs {package}, which is not installed here: {EXPORT_EXTRA}")

    command.short_help = f"(needs {package}: {EXPORT_EXTRA})"
    return command


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        import importlib

        try:
            module = importlib.import_module(f"edgekit.cli.{COMMANDS[name]}")
        except ModuleNotFoundError as e:  # a device install: the runtime only
            if (e.name or "edgekit").split(".")[0] == "edgekit":
                raise
            return _missing(name, e.name)
        return module.command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
