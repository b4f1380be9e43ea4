"""Run a bundle: a small generation engine on onnxruntime + tokenizers + numpy, nothing else.

This module (and everything it imports) must never import torch or transformers: it is what an app on
a phone or a board embeds. A test checks `sys.modules` after generating.

The KV cache costs no copies between steps. Each kept layer's key and value live in one buffer of
shape [1, kv_heads, capacity, head_dim], bound with onnxruntime IO binding as both the graph's
`past_key_values.{j}` input and its `present.{j}` output. GroupQueryAttention sees the same pointer on
both sides, switches to its shared-buffer mode and writes only the new positions in place; the number
of valid positions comes from `attention_mask` (its length is the current total, its sum - 1 the
`seqlens_k`). The buffer is allocated once per session (grown only if a later call needs more), never
per step.

    from edgekit.runtime.generator import GenerationConfig, Generator

    gen = Generator("out/stories260k-skip2-int4")
    for token in gen.stream("Once upon a time", GenerationConfig(max_new_tokens=64, temperature=0.8, seed=1)):
        print(token.text, end="", flush=True)

Chat (bundles whose tokenizer has a chat template; see chat.py): the generator remembers which token ids its
KV cache holds, and a chat turn feeds only the ids after the longest common prefix with the newly rendered
conversation, so a multi-turn session re-runs only the new turn yet sees exactly the tokens a fresh run of
the whole conversation would.

    chat = gen.chat_session(system="You are terse.")
    for token in chat.send("Hello!"):
        print(token.text, end="", flush=True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.bundle.folder import Bundle, open_bundle
from edgekit.errors import EdgekitError
from edgekit.runtime.fixed_engine import FixedEngine, open_fixed
from edgekit.runtime.kv_engine import CAPACITY_STEP, KVEngine
from edgekit.runtime.providers import (
    STATIC_SHAPE_PROVIDERS,
    RuntimeOptions,
    create_session,
    resolve,
    short_name,
    with_recipe_options,
)
from edgekit.runtime.sampling import GenerationConfig, Sampler

if TYPE_CHECKING:  # chat.py needs jinja2, imported only when a chat is run
    from edgekit.runtime.chat import ChatTemplate


class _Detokenizer:
    """Incremental text: emit a token's text only once it decodes to whole characters.

    Decoding token by token breaks byte-fallback characters and drops sentencepiece's leading spaces,
    so each step decodes a short window that starts a few tokens back and emits only the new suffix.
    """

    def __init__(self, tokenizer: Any, context: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context[-4:])
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""


@dataclass
class Token:
    id: int
    text: str  # the text this token completes ('' while a multi-byte character is unfinished)
    seconds: float  # the forward step (and sampling) that produced it; the first includes the prefill


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    pieces: list[str] = field(default_factory=list)  # each token's streamed text; "".join(pieces) == text
    stop_reason: str = ""  # "eos", "end_of_turn" (chat), "length" or "context"
    prefill_s: float = 0.0  # prompt forward + first token: the time to first token
    step_s: list[float] = field(default_factory=list)  # each later token's forward + sampling
    # The same in CPU time of the whole process (all threads): on a machine shared with other work, the
    # work done per token is steadier than the wall clock (threads that spin while idle add to it).
    prefill_cpu_s: float = 0.0
    step_cpu_s: list[float] = field(default_factory=list)
    # Leading prompt_ids already in the KV cache (a chat turn's history), so not fed again; 0 for stream().
    cached_tokens: int = 0

    @property
    def decode_ms_per_token(self) -> float | None:
        return 1000 * float(np.median(self.step_s)) if self.step_s else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["prompt_tokens"] = len(self.prompt_ids)
        out["new_tokens"] = len(self.token_ids)
        out["decode_ms_per_token_median"] = self.decode_ms_per_token
        fed = len(self.prompt_ids) - self.cached_tokens
        out["prefill_tokens_per_s"] = fed / self.prefill_s if self.prefill_s else None
        return out


class Generator:
    """A bundle ready to generate: session, tokenizer, KV buffers. Not thread-safe; one sequence at a time.

    `kv_capacity` fixes the KV buffers' length up front (at most the bundle's context); by default they
    are sized to the first call's prompt + max_new_tokens (rounded up to 256) and grown only when a later
    call needs more, so a short chat on a 4k-context 7B model does not hold a 4k cache.
    """

    def __init__(
        self,
        bundle: str | Path | Bundle,
        options: RuntimeOptions | None = None,
        check_integrity: bool = True,
        kv_capacity: int | None = None,
    ) -> None:
        from tokenizers import Tokenizer

        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle, check_integrity)
        arch = self.bundle.manifest["architecture"]
        self.max_context = int(arch["max_context"])
        self.eos_ids = frozenset(arch.get("eos_token_ids") or ())
        self.options = with_recipe_options(options or RuntimeOptions(), self.bundle.manifest)
        start = time.perf_counter()
        fixed = (self.bundle.manifest.get("fixed_shapes") or {}).get("files")
        if fixed and short_name(resolve(self.options.provider).ort_name) in STATIC_SHAPE_PROVIDERS:
            # the provider compiles static shapes: the fixed prefill/decode pair (placement: both graphs)
            fixed_engine, self.placement = open_fixed(self.bundle.path, fixed, self.options)
            self.engine: KVEngine | FixedEngine = fixed_engine
            self.session = fixed_engine.decode
            self.max_context = min(self.max_context, self.engine.capacity)
        else:
            self.session, self.placement = create_session(self.bundle.model_file, self.options)
            self.engine = KVEngine(self.session, 0, shared=self.bundle.manifest["graph"].get("flavour") != "standard")
        self.load_s = time.perf_counter() - start
        tok_file = self.bundle.path / "tokenizer.json"
        if not tok_file.is_file():
            raise EdgekitError(f"bundle {self.bundle.path} has no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(tok_file))
        if kv_capacity is not None and not 1 <= kv_capacity <= self.max_context:
            raise EdgekitError(f"kv_capacity {kv_capacity}: must be between 1 and the context {self.max_context}")
        self.engine.reserve(kv_capacity or 0)
        self.last: Generation | None = None
        self._cached: list[int] = []  # the ids in the KV cache, in order (engine.length of them)
        self._template: ChatTemplate | None = None
        self._template_loaded = False

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise EdgekitError("the prompt is empty (no tokens)")
        if len(ids) > self.max_context:
            raise EdgekitError(
                f"the prompt is {len(ids)} tokens; this bundle serves at most {self.max_context} "
                "(its max_context): shorten the prompt or export with a larger --max-context"
            )
        return ids

    def stream(self, prompt: str | Sequence[int], config: GenerationConfig | None = None) -> Iterator[Token]:
        """Yield tokens as they are made. The finished `Generation` is the generator's return value and
        `self.last`. `prompt` is text (tokenized with the bundle's tokenizer, BOS as it adds it) or ids.
        Always starts from an empty cache."""
        return (yield from self._run(self._prompt_ids(prompt), config or GenerationConfig(), keep=0))

    def forget_cache(self) -> None:
        """Empty the KV cache (the next chat turn feeds its whole conversation)."""
        self.engine.reset()
        self._cached = []

    def _run(
        self, ids: list[int], config: GenerationConfig, keep: int, turn_ids: frozenset[int] = frozenset()
    ) -> Iterator[Token]:
        """Generate after `ids`, of which the first `keep` are already in the cache (only the rest is fed).
        Stops on the EOS ids, and on `turn_ids` (a chat template's end-of-turn tokens) as "end_of_turn"."""
        # the last generated token is never fed, hence the - 1
        needed = min(self.max_context, len(ids) + config.max_new_tokens - 1)
        if needed > self.engine.capacity:  # growing drops the old content: feed everything
            self.engine.reserve(min(self.max_context, -(-needed // CAPACITY_STEP) * CAPACITY_STEP))
            keep = 0
        keep = self.engine.truncate(keep)  # fewer when a window-sized cache cannot rewind that far
        self._cached = ids[:keep]
        sample = Sampler(config)
        detok = _Detokenizer(self.tokenizer, ids)
        result = Generation(prompt_ids=ids, cached_tokens=keep)
        self.last = result
        eos_ids = self.eos_ids

        start, cpu = time.perf_counter(), time.process_time()
        token = sample(self.engine.forward(ids[keep:], all_logits=False)[-1])
        self._cached = list(ids)
        result.prefill_s = elapsed = time.perf_counter() - start
        result.prefill_cpu_s = time.process_time() - cpu
        while True:
            if config.stop_on_eos and (token in eos_ids or token in turn_ids):
                result.stop_reason = "eos" if token in eos_ids else "end_of_turn"
                break
            result.token_ids.append(token)
            text = detok.push(token)
            result.pieces.append(text)
            yield Token(token, text, elapsed)
            if len(result.token_ids) >= config.max_new_tokens:
                result.stop_reason = "length"
                break
            if self.engine.length >= self.max_context:
                result.stop_reason = "context"
                break
            start, cpu = time.perf_counter(), time.process_time()
            token = sample(self.engine.forward([token])[0])
            self._cached.append(result.token_ids[-1])
            elapsed = time.perf_counter() - start
            result.step_cpu_s.append(time.process_time() - cpu)
            result.step_s.append(elapsed)
        result.text = "".join(result.pieces)
        return result

    def generate(
        self,
        prompt: str | Sequence[int],
        config: GenerationConfig | None = None,
        on_token: Callable[[Token], None] | None = None,
    ) -> Generation:
        """Run to the end; `on_token` sees each token as it is made."""
        return _drain(self.stream(prompt, config), on_token)

    # -- chat ---------------------------------------------------------------------------------------

    @property
    def chat_template(self) -> ChatTemplate | None:
        """The bundle's chat template (chat_template.jinja, else tokenizer_config.json), None for a base model."""
        if not self._template_loaded:
            from edgekit.runtime.chat import ChatTemplate

            self._template = ChatTemplate.from_folder(self.bundle.path)
            self._template_loaded = True
        return self._template

    def _require_template(self, template: ChatTemplate | None) -> ChatTemplate:
        template = template or self.chat_template
        if template is None:
            raise EdgekitError(
                f"bundle {self.bundle.path} has no chat template (tokenizer_config.json chat_template / "
                "chat_template.jinja); use a prompt without --chat"
            )
        return template

    def render_chat(self, messages: list[dict[str, str]], template: ChatTemplate | None = None) -> str:
        """The prompt text for `messages` plus the assistant's turn opening, as transformers renders it."""
        return self._require_template(template).render(messages, add_generation_prompt=True)

    def chat_stream(
        self,
        messages: list[dict[str, str]],
        config: GenerationConfig | None = None,
        template: ChatTemplate | None = None,
    ) -> Iterator[Token]:
        """Stream the assistant's reply to `messages` ([{role, content}], the last one the user's).

        The rendered conversation is tokenized as transformers' apply_chat_template(tokenize=True) does
        (add_special_tokens=False: a template that wants BOS renders it). Only the ids after the longest
        common prefix with what the KV cache holds are fed, so repeating a conversation with one more turn
        re-runs only that turn, and the tokens equal a run from an empty cache. Stops on EOS and on the
        template's end-of-turn tokens. A conversation longer than the context is an EdgekitError.
        """
        return self._chat_run(messages, config, template)[1]

    def _chat_run(
        self, messages: list[dict[str, str]], config: GenerationConfig | None, template: ChatTemplate | None
    ) -> tuple[str, Iterator[Token]]:
        template = self._require_template(template)
        text = template.render(messages, add_generation_prompt=True)
        ids = self._chat_ids(text)
        cached = self._cached if self.engine.length == len(self._cached) else []
        keep = _common_prefix(cached, ids)
        keep = min(keep, len(ids) - 1)  # at least one id is fed, for the next token's logits
        turn_ids = frozenset(template.end_of_turn_ids(self.tokenizer))
        return text, self._run(ids, config or GenerationConfig(), keep=keep, turn_ids=turn_ids)

    def chat(
        self,
        messages: list[dict[str, str]],
        config: GenerationConfig | None = None,
        on_token: Callable[[Token], None] | None = None,
        template: ChatTemplate | None = None,
    ) -> Generation:
        """One reply to `messages`, run to the end (see chat_stream); `on_token` sees each token."""
        return _drain(self.chat_stream(messages, config, template), on_token)

    def chat_session(self, system: str | None = None, template: ChatTemplate | None = None) -> ChatSession:
        """A multi-turn conversation on this generator (its KV cache is kept between turns)."""
        return ChatSession(self, self._require_template(template), system)

    def _chat_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise EdgekitError("the chat template rendered an empty prompt")
        if len(ids) >= self.max_context:
            raise EdgekitError(
                f"the conversation is {len(ids)} tokens; this bundle serves at most {self.max_context} "
                "(its max_context) and the reply needs room: start over (/reset in `edgekit chat`, "
                "ChatSession.reset()) or export with a larger --max-context"
            )
        return ids


class ChatSession:
    """A multi-turn chat with a Generator: keeps the messages, and the KV cache between turns.

        chat = gen.chat_session(system="Be brief.")
        for token in chat.send("Hi!", config):      # streams the reply; the Generation is the return value
            print(token.text, end="", flush=True)
        reply = chat.reply("And then?")             # or run a turn to the end → Generation
        chat.reset()                                # forget the conversation and the cache

    A turn is recorded (user message + reply text) once its reply is finished; a turn that fails or whose
    stream is abandoned leaves the messages as they were. Another use of the same Generator in between
    (stream, generate, another session) is safe: the next turn then finds less of its history cached.
    """

    def __init__(self, generator: Generator, template: ChatTemplate, system: str | None = None) -> None:
        self.generator = generator
        self.template = template
        self.system = system
        self._messages: list[dict[str, str]] = []
        self.last_prompt = ""  # the whole conversation as rendered for the last turn
        self.reset()

    @property
    def messages(self) -> list[dict[str, str]]:
        return [dict(m) for m in self._messages]

    def reset(self) -> None:
        """Start over (the system prompt stays) and empty the generator's KV cache."""
        self._messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.last_prompt = ""
        self.generator.forget_cache()

    def send(self, text: str, config: GenerationConfig | None = None) -> Iterator[Token]:
        """Stream the reply to the user message `text`; returns (StopIteration.value) the Generation."""
        if not isinstance(text, str) or not text.strip():
            raise EdgekitError("a chat message must be non-empty text")
        messages = [*self._messages, {"role": "user", "content": text}]
        return self._turn(messages, config)

    def _turn(self, messages: list[dict[str, str]], config: GenerationConfig | None) -> Iterator[Token]:
        prompt, tokens = self.generator._chat_run(messages, config, self.template)
        result = yield from tokens
        self.last_prompt = prompt
        self._messages = [*messages, {"role": "assistant", "content": result.text}]
        return result

    def reply(
        self, text: str, config: GenerationConfig | None = None, on_token: Callable[[Token], None] | None = None
    ) -> Generation:
        """Run a turn to the end; `on_token` sees each token as it is made."""
        return _drain(self.send(text, config), on_token)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _drain(it: Iterator[Token], on_token: Callable[[Token], None] | None) -> Generation:
    while True:
        try:
            token = next(it)
        except StopIteration as done:
            return done.value
        if on_token is not None:
            on_token(token)
