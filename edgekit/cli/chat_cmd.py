from __future__ import annotations

import sys
from pathlib import Path

import click

from edgekit.cli import Terminated
from edgekit.cli.options import (
    generation_options,
    parse_template_vars,
    runtime_options,
    template_var_option,
    with_variables,
)
from edgekit.runtime.generator import ChatSession, GenerationConfig, Generator
from edgekit.runtime.providers import RuntimeOptions

COMMANDS = "/reset starts over, /exit or end of input (Ctrl-D) ends"


@click.command("chat")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--system", metavar="TEXT", help="The system prompt (kept across /reset).")
@template_var_option
@generation_options(max_new_tokens=256)
@runtime_options
def command(
    bundle: Path,
    system: str | None,
    template_vars: tuple[str, ...],
    config: GenerationConfig,
    provider: str,
    threads: int | None,
    affinity: str | None,
    no_spin: bool,
    no_integrity_check: bool,
) -> None:
    """Chat with a bundle: one user message per line of stdin, each reply streamed to stdout.

    The bundle needs a chat template (its tokenizer's, carried over by `edgekit export`). The KV cache
    is kept across turns, so each turn runs only its own tokens; a reply ends at the template's
    end-of-turn token, EOS or --max-new-tokens. `/reset` forgets the conversation (the system prompt
    stays), `/exit` or end of input ends. Reads a pipe as well as a terminal; the banner and per-turn
    timings go to stderr, and only when stdin is a terminal. A conversation that outgrows the bundle's
    context ends the command with one line (/reset earlier to keep going).

    \b
    Examples:
      edgekit chat out/smollm2-int4
      edgekit chat out/smollm2-int4 --system "You are a pirate." --temperature 0.7 --seed 1
      edgekit chat out/qwen3-int4 --template-var enable_thinking=false
      printf 'Hi!\\nAnd who are you?\\n' | edgekit chat out/smollm2-int4 --max-new-tokens 64
    """
    options = RuntimeOptions(provider=provider, threads=threads, affinity=affinity, spin=not no_spin)
    variables = parse_template_vars(template_vars)
    gen = Generator(bundle, options, check_integrity=not no_integrity_check)
    session = gen.chat_session(system, with_variables(gen.chat_template, variables))
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"edgekit chat: {gen.bundle.path} ({gen.placement.summary()}); {COMMANDS}", err=True)
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            continue
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            if interactive:
                click.echo("[conversation cleared]", err=True)
            continue
        if command.startswith("/") and " " not in command:
            click.echo(f"[unknown command {command}: {COMMANDS}]", err=True)
            continue
        _turn(session, text, config, interactive)


def _turn(session: ChatSession, text: str, config: GenerationConfig, interactive: bool) -> None:
    tokens = session.send(text, config)
    try:
        while True:
            try:
                token = next(tokens)
            except StopIteration as done:
                result = done.value
                break
            sys.stdout.write(token.text)
            sys.stdout.flush()
    except KeyboardInterrupt as e:
        # Ctrl-C at a terminal stops this reply only (the turn is not kept); SIGTERM and pipes still end the command.
        if isinstance(e, Terminated) or not interactive:
            raise
        tokens.close()
        sys.stdout.write("\n")
        click.echo("[reply interrupted; the turn is not kept]", err=True)
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    if interactive:
        ms = result.decode_ms_per_token
        click.echo(
            f"[{len(result.token_ids)} tokens, stop: {result.stop_reason}; "
            f"{len(result.prompt_ids) - result.cached_tokens} new prompt tokens, {result.cached_tokens} cached"
            + (f"; {ms:.1f} ms/token]" if ms else "]"),
            err=True,
        )
