"""Chat templates and multi-turn conversations for the torch-free runtime.

Renders a model's Jinja chat template the way ``transformers`` does (same sandbox, environment options, globals and
filters), so a prompt built here tokenizes to exactly what the exported model saw in its reference pipeline.
This module must not import torch or transformers: it ships with the onnxruntime-only runtime (jinja2 + stdlib).
`Generator.chat_session` / `Generator.chat` (generator.py) run a bundle with the template found here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgekit.errors import EdgekitError

ROLES = frozenset({"system", "user", "assistant", "tool"})

# Tokenizers don't say which special token closes an assistant turn, and generation_config.json (which sometimes lists
# them as ids) isn't always exported, so we recognise the well-known markers by searching the template text. Order
# matters only for the order of ChatTemplate.end_of_turn; the eos token is always appended.
_END_OF_TURN_MARKERS: tuple[str, ...] = (
    "<|im_end|>",  # ChatML: Qwen, SmolLM, Hermes, ...
    "<|eot_id|>",  # Llama 3.x
    "<|eom_id|>",  # Llama 3.1+ after a tool call ("end of message", the model waits for the tool result)
    "<end_of_turn>",  # Gemma
    "<|end|>",  # Phi-3 / Phi-4-mini
    "<|END_OF_TURN_TOKEN|>",  # Cohere Command-R
    "<|endofturn|>",  # HyperCLOVA X / EXAONE-style
)


class _TokenToId(Protocol):
    def token_to_id(self, token: str) -> int | None: ...


def _raise_exception(message: str) -> None:
    # Templates call this to reject a conversation (e.g. "roles must alternate"); the message is written for the end
    # user, so it is passed on unchanged instead of being wrapped like other template errors.
    raise EdgekitError(str(message))


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Same as transformers' override: Jinja's own tojson HTML-escapes "<", ">", "&" and "'", which would change the
    # prompt text (tool schemas, JSON arguments) compared to what the model was trained on.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# The parameter keeps transformers' name `format`, since templates may pass it by keyword.
def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    # transformers replaces the `dict` global so templates can build dicts without reaching dict's class attributes.
    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Mirrors transformers: underscore attributes on a namespace are a known sandbox-escape vector for Hub templates.
    # No named `self`, like Jinja's Namespace, so that `namespace(self=...)` still works in a template.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


class _GenerationTag(jinja2.ext.Extension):
    # Templates written for training mark assistant text with {% generation %}...{% endgeneration %} so transformers
    # can build an assistant-token mask. At inference we only need the tag to parse and render its body unchanged.
    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


def _make_environment() -> ImmutableSandboxedEnvironment:
    # Options must match transformers' _cached_compile_jinja_template: trim_blocks/lstrip_blocks change whitespace.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    return _make_environment()


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    # A Conversation renders the same template every turn; compiling is far slower than rendering.
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise EdgekitError(_one_line(f"chat template: syntax error on line {e.lineno}: {e.message}")) from e


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as plain strings or as serialized AddedToken dicts.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgekitError(_one_line(f"cannot read {path}: {e}")) from e
    if not isinstance(data, dict):
        raise EdgekitError(f"{path}: expected a JSON object")
    return data


def _pick_template(value: Any, where: Path) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    # Multiple named templates: a list of {name, template} (tokenizer_config.json) or, once loaded, a dict.
    if isinstance(value, list):
        value = {
            item.get("name"): item.get("template")
            for item in value
            if isinstance(item, Mapping) and isinstance(item.get("template"), str)
        }
    if isinstance(value, Mapping):
        default = value.get("default")
        if isinstance(default, str):
            return default
        raise EdgekitError(f"{where}: chat_template has several templates but none named 'default'")
    raise EdgekitError(f"{where}: chat_template must be a string or a list of {{name, template}}")


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise EdgekitError("chat messages must be a non-empty list of {role, content} dicts")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise EdgekitError(f"chat message {i} must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise EdgekitError(f"chat message {i} has role {role!r}; expected one of {', '.join(sorted(ROLES))}")
        if not isinstance(message.get("content"), str):
            raise EdgekitError(f"chat message {i} ({role}) must have string content")
        # Copy, so the template can't see later edits; drop None values as transformers does, because templates test
        # for a missing key (`'name' in message`) rather than for None.
        checked.append({key: value for key, value in message.items() if value is not None})
    return checked


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str | None = None
    eos_token: str | None = None
    end_of_turn: tuple[str, ...] = field(default=())
    # extra variables every render passes, as apply_chat_template's **kwargs do (Qwen3: enable_thinking)
    variables: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.end_of_turn:
            object.__setattr__(self, "end_of_turn", detect_end_of_turn(self.source, self.eos_token))

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate | None:
        """The template of an exported tokenizer folder, or None when the model has none (a base model)."""
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        # Same precedence as transformers 5: a chat_template.jinja file wins over the tokenizer_config.json entry
        # (save_pretrained writes the file and drops the entry, but older exports only have the entry).
        jinja_path = folder / "chat_template.jinja"
        if jinja_path.is_file():
            source: str | None = jinja_path.read_text(encoding="utf-8")
        else:
            source = _pick_template(config.get("chat_template"), config_path)
        if not source:
            return None
        special_path = folder / "special_tokens_map.json"
        # Legacy exports keep bos/eos only in special_tokens_map.json.
        special = _read_json(special_path) if special_path.is_file() else {}
        bos = _token_content(config.get("bos_token")) or _token_content(special.get("bos_token"))
        eos = _token_content(config.get("eos_token")) or _token_content(special.get("eos_token"))
        return cls(source=source, bos_token=bos, eos_token=eos)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for `messages`, identical to transformers' apply_chat_template(..., tokenize=False)."""
        checked = _validate_messages(messages)
        template = _compile(self.source)
        # transformers passes only the special tokens that are set (an unset one stays undefined in the template, so
        # `bos_token is defined` checks behave the same) and always passes tools/documents, even as None.
        context: dict[str, Any] = {"tools": None, "documents": None}
        if self.bos_token is not None:
            context["bos_token"] = self.bos_token
        if self.eos_token is not None:
            context["eos_token"] = self.eos_token
        context.update(self.variables)
        context.update(extra)
        try:
            return template.render(messages=checked, add_generation_prompt=add_generation_prompt, **context)
        except EdgekitError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            # Sandbox and Python errors from a Hub template are the template's fault, not the caller's; one line.
            raise EdgekitError(_one_line(f"chat template: {type(e).__name__}: {e}")) from e

    def end_of_turn_ids(self, tokenizer: _TokenToId) -> set[int]:
        """Ids of the end-of-turn tokens, to use as stop ids; markers missing from the vocab are skipped."""
        ids = set()
        for token in self.end_of_turn:
            token_id = tokenizer.token_to_id(token)
            if token_id is not None:
                ids.add(token_id)
        return ids


def detect_end_of_turn(source: str, eos_token: str | None) -> tuple[str, ...]:
    found = [marker for marker in _END_OF_TURN_MARKERS if marker in source]
    # The eos token always stops generation; Llama 2 / Mistral "[INST]" templates have no other turn marker.
    if eos_token and eos_token not in found:
        found.append(eos_token)
    return tuple(found)


class NextPrompt(NamedTuple):
    text: str
    """What to feed the model now: the new suffix when `continue_cache`, else the whole rendered conversation."""
    continue_cache: bool
    """True: append `text` to the existing KV cache. False: clear the cache and feed `text` from position 0."""


class Conversation:
    """A multi-turn chat that feeds the model only what is new each turn, so the KV cache can be kept.

    Protocol per turn::

        conv.add_user(question)
        prompt = conv.next_prompt(template)       # feed prompt.text (reset the cache first unless continue_cache)
        reply = generate(...)                     # decoded text of the generated tokens, without the stop token
        conv.add_assistant(reply)                 # the reply is already in the cache

    The prefix check is done on text, so it can't see a tokenizer merging across the old/new boundary; for templates
    whose turns are separated by special tokens (ChatML, Llama 3, Gemma) that can't happen. edgekit's own Generator
    (generator.py, `chat_session`) compares token ids with its KV cache instead, which also covers that case and a
    reply generated in a non-canonical tokenization; this class is for runtimes that can only be handed text.
    """

    def __init__(self, system_prompt: str | None = None) -> None:
        self.system_prompt = system_prompt
        self._messages: list[dict[str, str]] = []
        # The text the model's KV cache holds, as it appears in the rendering: the last rendering plus what was
        # generated after it. Empty means the cache holds nothing of this conversation.
        self._fed = ""
        self._awaiting_reply = False
        self.reset()

    @property
    def messages(self) -> list[dict[str, str]]:
        return [dict(m) for m in self._messages]

    @property
    def fed(self) -> str:
        return self._fed

    def reset(self) -> None:
        """Start over (keeping the system prompt); the next prompt will ask for a cache reset."""
        self._messages = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        self.forget_cache()

    def forget_cache(self) -> None:
        """Call when the runtime dropped its KV cache (e.g. context overflow), so the next prompt is sent in full."""
        self._fed = ""
        self._awaiting_reply = False

    def add_user(self, text: str) -> None:
        self._add("user", text)
        self._awaiting_reply = False

    def add_assistant(self, text: str, *, generated: bool = True, stop_text: str = "") -> None:
        """Record an assistant reply.

        generated: the reply was produced by continuing the last next_prompt(), so its tokens are already in the
            cache. Pass False for a scripted reply: it will then be part of the next prompt instead.
        stop_text: the text of the end-of-turn token if the runtime also ran it through the model. Most runtimes
            don't (the sampled stop token is never fed back), in which case the next prompt starts with it.
        """
        if generated and not self._awaiting_reply:
            raise EdgekitError("add_assistant(generated=True) needs a preceding next_prompt() for the reply to follow")
        self._add("assistant", text)
        if generated:
            self._fed += text + stop_text
        self._awaiting_reply = False

    def next_prompt(self, template: ChatTemplate, **extra: Any) -> NextPrompt:
        full = template.render(self._messages, add_generation_prompt=True, **extra)
        # A template that rewrites history (moves the system prompt, drops old reasoning, ...) breaks the prefix
        # property; then the cached positions are stale and everything must be fed again.
        reuse = bool(self._fed) and full.startswith(self._fed)
        text = full[len(self._fed) :] if reuse else full
        self._fed = full
        self._awaiting_reply = True
        return NextPrompt(text, reuse)

    def _add(self, role: str, text: str) -> None:
        if not isinstance(text, str):
            raise EdgekitError(f"{role} message must be a string, got {type(text).__name__}")
        self._messages.append({"role": role, "content": text})
