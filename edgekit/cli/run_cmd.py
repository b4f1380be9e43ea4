from __future__ import annotations

import sys
from pathlib import Path

import click

from edgekit.cli.options import (
    generation_options,
    parse_template_vars,
    runtime_options,
    template_var_option,
    with_variables,
)
from edgekit.cli.output import emit_json
from edgekit.runtime.generator import GenerationConfig, Generator, Token
from edgekit.runtime.providers import RuntimeOptions


@click.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@generation_options()
@click.option("--no-echo", is_flag=True, help="Print only the continuation, not the prompt.")
@click.option(
    "--chat",
    is_flag=True,
    help="PROMPT is a user message: render it with the bundle's chat template and print the reply only.",
)
@click.option("--system", metavar="TEXT", help="With --chat: the system prompt.")
@template_var_option
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print tokens, text and timings as JSON at the end.")
def command(
    bundle: Path,
    prompt: str,
    config: GenerationConfig,
    no_echo: bool,
    chat: bool,
    system: str | None,
    template_vars: tuple[str, ...],
    provider: str,
    threads: int | None,
    affinity: str | None,
    no_spin: bool,
    no_integrity_check: bool,
    as_json: bool,
) -> None:
    """Generate text from a bundle, streaming it to stdout (torch is never loaded).

    Timings go to stderr after the text; with --json nothing is streamed and one JSON object is printed.
    With --chat, PROMPT is one user turn rendered with the bundle's chat template (generation stops at
    the template's end-of-turn token too); --json then adds the rendered prompt. For a multi-turn
    conversation use `edgekit chat`.

    \b
    Examples:
      edgekit run out/stories260k-skip2-int4 "Once upon a time" --max-new-tokens 64
      edgekit run out/stories260k-skip2-int4 "Once upon a time" --temperature 0.8 --top-p 0.9 --seed 1
      edgekit run out/x "Hello" --provider xnnpack --threads 4 --json
      edgekit run out/smollm2-int4 --chat "What is the capital of France?" --system "Be brief."
    """
    for given, name in ((system is not None, "--system"), (bool(template_vars), "--template-var")):
        if given and not chat:
            raise click.UsageError(f"{name} needs --chat")
    variables = parse_template_vars(template_vars)
    options = RuntimeOptions(provider=provider, threads=threads, affinity=affinity, spin=not no_spin)
    gen = Generator(bundle, options, check_integrity=not no_integrity_check)

    def show(token: Token) -> None:
        sys.stdout.write(token.text)
        sys.stdout.flush()

    on_token = None if as_json else show
    session = None
    if chat:
        session = gen.chat_session(system, with_variables(gen.chat_template, variables))
        result = session.reply(prompt, config, on_token=on_token)
    else:
        if not as_json and not no_echo:
            show(Token(-1, prompt, 0.0))
        result = gen.generate(prompt, config, on_token=on_token)
    if as_json:
        extra = {} if session is None else {"rendered_prompt": session.last_prompt, "messages": session.messages}
        emit_json(
            {
                "bundle": str(gen.bundle.path),
                "provider": provider,
                "placement": gen.placement.to_dict(),
                "load_s": gen.load_s,
                **result.to_dict(),
                **extra,
            }
        )
        return
    sys.stdout.write("\n")
    ms = result.decode_ms_per_token
    click.echo(
        f"[{len(result.token_ids)} tokens, stop: {result.stop_reason}; load {gen.load_s:.2f} s, "
        f"first token {1000 * result.prefill_s:.1f} ms for {len(result.prompt_ids)} prompt tokens, "
        + (f"decode {ms:.2f} ms/token ({1000 / ms:.1f} tok/s); " if ms else "")
        + f"{gen.placement.summary()}]",
        err=True,
    )
