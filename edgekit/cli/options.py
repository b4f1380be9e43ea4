"""Option groups that several commands share, as click decorators (one definition, one help text)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import click

from edgekit.runtime.providers import PROVIDERS

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _stack(*options: Decorator) -> Decorator:
    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):  # the first listed shows first in --help
            f = option(f)
        return f

    return apply


def skip_options(scope: str = "") -> Decorator:
    """--skip N|RULE:N and --skip-layers LIST; `scope` prefixes the help (e.g. "Checkpoint only. ")."""
    return _stack(
        click.option(
            "--skip",
            "skip",
            metavar="N|auto:N",
            help=f"{scope}Remove the attention sublayers of the last N layers, or of N ranked on the model: "
            "auto:N (measured, the default ranking), cosine:N (1 - cos, cheaper) or gatenorm:N (from the weights, "
            "no data).",
        ),
        click.option(
            "--skip-layers", metavar="LIST", help=f"{scope}Remove attention from these layers, e.g. 20,24-31."
        ),
    )


checkpoint_options = _stack(
    click.option("--allow-download", is_flag=True, help="Download the model from the Hugging Face hub if needed."),
    click.option("--trust-remote-code", is_flag=True, help="Allow a checkpoint's own Python code (never by default)."),
    click.option("--allow-pickle", is_flag=True, help="Load *.bin pickle weights with torch's weights-only loader."),
)

runtime_options = _stack(
    click.option(
        "--provider",
        default="cpu",
        show_default=True,
        metavar="NAME",
        help="Execution provider: " + ", ".join(PROVIDERS) + ".",
    ),
    click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads [default: one per core]."),
    click.option(
        "--affinity",
        metavar="SPEC",
        help="Pin intra-op threads (onnxruntime session.intra_op_thread_affinities), e.g. '1;2;3' for 4 threads.",
    ),
    click.option(
        "--no-spin", is_flag=True, help="Let idle threads sleep instead of spinning (busy or battery machines)."
    ),
    click.option("--no-integrity-check", is_flag=True, help="Skip the sha256 check of the bundle's files."),
)


def generation_options(max_new_tokens: int = 64) -> Decorator:
    """Sampling and stopping options, handed to the command as one `config: GenerationConfig` argument
    (an invalid value is an EdgekitError when the command runs: one line)."""
    options = _stack(
        click.option(
            "--max-new-tokens", default=max_new_tokens, show_default=True, type=int, help="Stop after this many tokens."
        ),
        click.option("--temperature", default=0.0, show_default=True, type=float, help="0 is greedy."),
        click.option("--top-k", default=0, show_default=True, type=int, help="Sample from the k likeliest (0: all)."),
        click.option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling mass."),
        click.option("--seed", type=int, help="Seed for sampling (same seed, same text)."),
        click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token."),
    )

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from edgekit.runtime.generator import GenerationConfig

            kwargs["config"] = GenerationConfig(
                max_new_tokens=kwargs.pop("max_new_tokens"),
                temperature=kwargs.pop("temperature"),
                top_k=kwargs.pop("top_k"),
                top_p=kwargs.pop("top_p"),
                seed=kwargs.pop("seed"),
                stop_on_eos=not kwargs.pop("ignore_eos"),
            )
            return f(*args, **kwargs)

        return options(wrapper)

    return apply


template_var_option = click.option(
    "--template-var",
    "template_vars",
    multiple=True,
    metavar="KEY=VALUE",
    help="A variable for the chat template, as apply_chat_template's keyword arguments: e.g. "
    "enable_thinking=false (Qwen3 answers without a thinking block). true/false and numbers are parsed; "
    "repeat for several.",
)


def parse_template_vars(values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE with KEY a name", param_hint="--template-var")
        lowered = raw.strip().lower()
        value: Any = {"true": True, "false": False}.get(lowered, raw)
        if value is raw:
            for kind in (int, float):
                try:
                    value = kind(raw)
                    break
                except ValueError:
                    continue
        out[key.strip()] = value
    return out


def with_variables(template: Any, variables: dict[str, Any]) -> Any:
    """The bundle's chat template with --template-var values (None stays None: the chat then says why)."""
    if template is None or not variables:
        return template
    return dataclasses.replace(template, variables={**template.variables, **variables})
