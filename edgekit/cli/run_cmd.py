from __future__ import annotations

import sys
from pathlib import Path

import click

from edgekit.cli.options import runtime_options
from edgekit.cli.output import emit_json
from edgekit.runtime.generator import GenerationConfig, Generator, Token
from edgekit.runtime.providers import RuntimeOptions


@click.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--max-new-tokens", default=64, show_default=True, type=int, help="Stop after this many tokens.")
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy.")
@click.option("--top-k", default=0, show_default=True, type=int, help="Sample from the k likeliest (0: all).")
@click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling mass.")
@click.option("--seed", type=int, help="Seed for sampling (same seed, same text).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--no-echo", is_flag=True, help="Print only the continuation, not the prompt.")
@runtime_options
@click.option("--json", "as_json", is_flag=True, help="Print tokens, text and timings as JSON at the end.")
def command(
    bundle: Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    ignore_eos: bool,
    no_echo: bool,
    provider: str,
    threads: int | None,
    affinity: str | None,
    no_spin: bool,
    no_integrity_check: bool,
    as_json: bool,
) -> None:
    """Generate text from a bundle, streaming it to stdout (torch is never loaded).

    Timings go to stderr after the text; with --json nothing is streamed and one JSON object is printed.

    \b
    Examples:
      edgekit run out/stories260k-skip2-int4 "Once upon a time" --max-new-tokens 64
      edgekit run out/stories260k-skip2-int4 "Once upon a time" --temperature 0.8 --top-p 0.9 --seed 1
      edgekit run out/x "Hello" --provider xnnpack --threads 4 --json
    """
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_on_eos=not ignore_eos,
    )
    options = RuntimeOptions(provider=provider, threads=threads, affinity=affinity, spin=not no_spin)
    gen = Generator(bundle, options, check_integrity=not no_integrity_check)

    def show(token: Token) -> None:
        sys.stdout.write(token.text)
        sys.stdout.flush()

    if not as_json and not no_echo:
        show(Token(-1, prompt, 0.0))
    result = gen.generate(prompt, config, on_token=None if as_json else show)
    if as_json:
        emit_json(
            {
                "bundle": str(gen.bundle.path),
                "provider": provider,
                "placement": gen.placement.to_dict(),
                "load_s": gen.load_s,
                **result.to_dict(),
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
