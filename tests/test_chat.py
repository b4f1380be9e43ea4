"""Chat: templates rendered like transformers, the Conversation delta, and chat on a real bundle.

Template parity: edgekit.runtime.chat renders byte-identically to transformers' apply_chat_template (imported
here only as the reference; the runtime never imports it). SmolLM2-Instruct's ChatML template is embedded
below, so nothing needs a download; where the GGUF happens to be cached, a test checks the constant is its text.

Generation: stories260K with a ChatML-style template injected into its tokenizer_config.json before export.
The model is not a chat model, so replies are nonsense; what is checked is the machinery: the kept KV cache
gives exactly the tokens of a fresh run of the whole conversation, /reset, the end-of-turn stop, the CLI.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import STORIES

from edgekit.errors import EdgekitError
from edgekit.runtime.chat import ChatTemplate, Conversation, detect_end_of_turn
from edgekit.runtime.generator import GenerationConfig, Generator

# SmolLM2-135M-Instruct's chat template, as in its GGUF (tokenizer.chat_template) and on the Hub.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

ALTERNATE_MSG = "Conversation roles must alternate user/assistant/user/assistant/..."
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('" + ALTERNATE_MSG + "') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Multi-line, indented template: exercises trim_blocks / lstrip_blocks, loopcontrols, tojson, namespace,
# {% generation %}, and tools/documents being passed as None.
# Gemma 3's template (google/gemma-3-*-it tokenizer_config.json): BOS rendered by the template, the system
# prompt folded into the first user turn, "model" for the assistant role, raise_exception, `| trim`.
GEMMA3 = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    '    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)
WHITESPACE_HEAVY = """{%- set ns = namespace(n=0) -%}
{% for message in messages %}
    {% if message.role == 'tool' %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ message.role }}>
    {% if message.role == 'assistant' %}
        {% generation %}{{ message.content | tojson }}{% endgeneration %}
    {% else %}
        {{ message.content }}
    {% endif %}
    {% if ns.n > 5 %}{% break %}{% endif %}
{% endfor %}
tools={{ tools is none }} docs={{ documents }} {{ {'k': '<&>'} | tojson }}
{% if add_generation_prompt %}
<assistant>
{% endif %}
"""

# Puts the system prompt in front of the *last* user message, so every turn rewrites earlier text.
REWRITES_HISTORY = (
    "{% set sys = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | list %}"
    "{% for m in messages if m.role != 'system' %}"
    "{% if m.role == 'user' and loop.last and sys %}<<SYS>>{{ sys[0] }}<</SYS>>{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CHATS: dict[str, list[dict[str, str]]] = {
    "user": [{"role": "user", "content": "Hello there!"}],
    "system_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "  Tell me a joke.\n"},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why? <&> 'quotes' \"dq\" ünïcødé"},
    ],
    "no_system_multi": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
}


@pytest.fixture(scope="module")
def smollm2() -> ChatTemplate:
    return ChatTemplate(SMOLLM2, bos_token="<|im_start|>", eos_token="<|im_end|>")


def hf_render(template: ChatTemplate, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    # The vocabulary is irrelevant for tokenize=False; only the template and the special tokens reach the renderer.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")),
        bos_token=template.bos_token,
        eos_token=template.eos_token,
        chat_template=template.source,
    )
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("chat", sorted(CHATS))
def test_smollm2_matches_transformers(smollm2: ChatTemplate, chat: str, add_generation_prompt: bool) -> None:
    messages = CHATS[chat]
    ours = smollm2.render(messages, add_generation_prompt=add_generation_prompt)
    assert ours == hf_render(smollm2, messages, add_generation_prompt)
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_smollm2_default_system_prompt(smollm2: ChatTemplate) -> None:
    text = smollm2.render(CHATS["user"])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "SmolLM" not in smollm2.render(CHATS["system_user"])


def test_embedded_template_is_the_gguf_one(smollm2_gguf: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(smollm2_gguf))
    assert reader.fields["tokenizer.chat_template"].contents() == SMOLLM2
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    eos = tokens[reader.fields["tokenizer.ggml.eos_token_id"].contents()]
    assert eos == "<|im_end|>"


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize("source", [LLAMA3, WHITESPACE_HEAVY, GEMMA3], ids=["llama3", "whitespace", "gemma3"])
def test_other_templates_match_transformers(source: str, chat: str, add_generation_prompt: bool) -> None:
    template = ChatTemplate(source, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    messages = CHATS[chat]
    ours = template.render(messages, add_generation_prompt=add_generation_prompt)
    assert ours == hf_render(template, messages, add_generation_prompt)


def test_gemma3_render_and_end_of_turn() -> None:
    template = ChatTemplate(GEMMA3, bos_token="<bos>", eos_token="<eos>")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}]
    assert template.render(messages) == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert template.end_of_turn == ("<end_of_turn>", "<eos>")
    with pytest.raises(EdgekitError, match="alternate"):
        template.render([{"role": "assistant", "content": "x"}])


def test_llama3_render() -> None:
    template = ChatTemplate(LLAMA3, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert template.render(CHATS["user"]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello there!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert template.end_of_turn == ("<|eot_id|>",)


def test_whitespace_template_details() -> None:
    text = ChatTemplate(WHITESPACE_HEAVY).render(CHATS["multi_turn"], add_generation_prompt=True)
    # lstrip_blocks + trim_blocks: no indentation or blank lines leak from block tags, but output lines keep theirs.
    assert "    <user>\n        Hi\n" in text
    assert '"Hello! How can I help?"' in text  # tojson, not HTML-escaped
    assert 'tools=True docs=None {"k": "<&>"}\n<assistant>\n' in text


def test_raise_exception_message() -> None:
    template = ChatTemplate(MISTRAL, bos_token="<s>", eos_token="</s>")
    assert template.render(CHATS["no_system_multi"]) == "<s>[INST] a [/INST]b</s>[INST] c [/INST]"
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(EdgekitError) as info:
        template.render(bad)
    assert str(info.value) == ALTERNATE_MSG
    with pytest.raises(EdgekitError, match="Only user and assistant roles are supported!"):
        template.render([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    # Llama 2 / Mistral have no turn marker: eos ends the turn.
    assert template.end_of_turn == ("</s>",)


@pytest.mark.parametrize(
    ("messages", "pattern"),
    [
        ([], "non-empty list"),
        ("hi", "non-empty list"),
        (["hi"], "message 0 must be a dict"),
        ([{"role": "bot", "content": "x"}], "role 'bot'"),
        ([{"role": "user"}], "string content"),
        ([{"role": "user", "content": 3}], "string content"),
    ],
)
def test_bad_messages(smollm2: ChatTemplate, messages: Any, pattern: str) -> None:
    with pytest.raises(EdgekitError, match=pattern) as info:
        smollm2.render(messages)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        ("{% for m in messages %}{{ m.content }", "chat template: syntax error"),
        ("{{ messages[0].content.nope.deeper }}", "chat template: UndefinedError"),
        ("{{ messages.__class__.__mro__ }}", "chat template: "),
        ("{% set ns = namespace(_x=1) %}", "chat template: SecurityError"),
    ],
)
def test_template_errors(source: str, pattern: str) -> None:
    with pytest.raises(EdgekitError, match=re.escape(pattern)) as info:
        ChatTemplate(source).render(CHATS["user"])
    assert "\n" not in str(info.value)


def test_strftime_now() -> None:
    text = ChatTemplate("{{ strftime_now('%Y') }}").render(CHATS["user"])
    assert re.fullmatch(r"\d{4}", text)


def test_extra_variables_reach_template() -> None:
    template = ChatTemplate("{{ enable_thinking }}|{{ bos_token }}|{{ bos_token is defined }}")
    assert template.render(CHATS["user"], enable_thinking=False) == "False||False"
    assert template.render(CHATS["user"], bos_token="X") == "|X|True"  # undefined variables render empty


def test_conversation_prefix_chatml(smollm2: ChatTemplate) -> None:
    conv = Conversation(system_prompt="Be brief.")
    fed = ""
    questions = ["Hello", "Capital of France?", "Meaning of life?"]
    for turn, (question, reply) in enumerate(zip(questions, ["Hi!", "Paris.", "42."], strict=True)):
        conv.add_user(question)
        prompt = conv.next_prompt(smollm2)
        full = smollm2.render(conv.messages, add_generation_prompt=True)
        assert prompt.continue_cache == (turn > 0)
        if turn == 0:
            assert prompt.text == full
        else:
            # The delta closes the previous reply with the end-of-turn token the model never fed back.
            assert prompt.text.startswith("<|im_end|>\n<|im_start|>user\n" + question)
            assert prompt.text.endswith("<|im_start|>assistant\n")
        fed += prompt.text
        assert fed == full
        conv.add_assistant(reply)
        fed += reply
        assert conv.fed == fed
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2


def test_conversation_stop_text_and_scripted(smollm2: ChatTemplate) -> None:
    conv = Conversation()
    conv.add_user("a")
    conv.next_prompt(smollm2)
    conv.add_assistant("b", stop_text="<|im_end|>")  # runtime fed the stop token too
    conv.add_user("c")
    prompt = conv.next_prompt(smollm2)
    assert prompt == ("\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n", True)
    conv.add_assistant("d", generated=False)  # scripted: not in the cache, so it comes in the next delta
    conv.add_user("e")
    prompt = conv.next_prompt(smollm2)
    assert prompt.continue_cache
    assert prompt.text.startswith("d<|im_end|>\n<|im_start|>user\ne")
    conv.add_assistant("x")
    with pytest.raises(EdgekitError, match="next_prompt"):
        conv.add_assistant("y")  # a second generated reply has no prompt it could have continued


def test_conversation_reset_and_forget(smollm2: ChatTemplate) -> None:
    conv = Conversation(system_prompt="S")
    conv.add_user("a")
    conv.next_prompt(smollm2)
    conv.add_assistant("b")
    conv.forget_cache()
    conv.add_user("c")
    prompt = conv.next_prompt(smollm2)
    assert not prompt.continue_cache
    assert prompt.text == smollm2.render(conv.messages)
    conv.reset()
    assert conv.messages == [{"role": "system", "content": "S"}]
    assert conv.fed == ""


def test_conversation_history_rewrite() -> None:
    template = ChatTemplate(REWRITES_HISTORY, eos_token="<|im_end|>")
    conv = Conversation(system_prompt="SYS")
    conv.add_user("one")
    first = conv.next_prompt(template)
    assert first.text.startswith("<<SYS>>SYS<</SYS>><|im_start|>user\none")
    conv.add_assistant("r1")
    conv.add_user("two")
    second = conv.next_prompt(template)
    assert not second.continue_cache
    assert second.text == template.render(conv.messages)
    assert second.text.startswith("<|im_start|>user\none<|im_end|>\n")  # system prompt moved off the first turn


def test_from_folder_stories_has_no_template() -> None:
    assert ChatTemplate.from_folder(STORIES) is None


def test_from_folder_variants(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": {"content": "<s>", "lstrip": False, "special": True},
                "eos_token": "<|im_end|>",
                "chat_template": [
                    {"name": "tool_use", "template": "TOOLS"},
                    {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"},
                ],
            }
        )
    )
    template = ChatTemplate.from_folder(tmp_path)
    assert template is not None
    assert (template.bos_token, template.eos_token) == ("<s>", "<|im_end|>")
    assert template.render(CHATS["user"]) == "<s>Hello there!<|im_end|>"
    assert template.end_of_turn == ("<|im_end|>",)
    # transformers 5 gives chat_template.jinja priority over the tokenizer_config.json entry.
    (tmp_path / "chat_template.jinja").write_text("JINJA {{ messages | length }}\n")
    template = ChatTemplate.from_folder(tmp_path)
    assert template is not None
    assert template.source == "JINJA {{ messages | length }}\n"
    assert template.render(CHATS["user"]) == "JINJA 1"  # jinja drops a single trailing newline, as in transformers


def test_from_folder_matches_transformers_loading(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>")),
        bos_token="<s>",
        eos_token="</s>",
        chat_template=MISTRAL,
    )
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    template = ChatTemplate.from_folder(tmp_path)
    assert template is not None
    assert template.source == loaded.chat_template
    messages = CHATS["no_system_multi"]
    assert template.render(messages) == loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_detect_end_of_turn() -> None:
    assert detect_end_of_turn("<start_of_turn>user ... <end_of_turn>", "<eos>") == ("<end_of_turn>", "<eos>")
    assert detect_end_of_turn("<|im_start|>...<|im_end|>", "<|endoftext|>") == ("<|im_end|>", "<|endoftext|>")
    assert detect_end_of_turn("[INST]", None) == ()


class _Vocab:
    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def token_to_id(self, token: str) -> int | None:
        return self.vocab.get(token)


def test_end_of_turn_ids_skips_missing() -> None:
    template = ChatTemplate("<|im_end|><|eot_id|>", eos_token="</s>")
    assert template.end_of_turn_ids(_Vocab({"<|im_end|>": 7, "</s>": 2})) == {7, 2}


def test_end_of_turn_ids_real_tokenizer(smollm2: ChatTemplate) -> None:
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    assert smollm2.end_of_turn == ("<|im_end|>",)
    assert smollm2.end_of_turn_ids(tok) == {tok.token_to_id("<|im_end|>")} == {3}


# ---- chat on a bundle --------------------------------------------------------------------------------

# ChatML-style, with BOS rendered by the template (as Llama 3's does): stories260K's vocabulary has no ChatML
# tokens, so the markers are plain text and only </s> (its EOS) ends a turn.
STORIES_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHORT = GenerationConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def chat_bundle(bundle_factory, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("chat-model") / "stories260k-chat"
    shutil.copytree(STORIES, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = STORIES_CHAT
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return bundle_factory(model=str(model))


@pytest.fixture(scope="module")
def plain_bundle(bundle_factory) -> Path:
    return bundle_factory()


def _edgekit(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgekit", *args], input=stdin, capture_output=True, text=True, timeout=120
    )


def test_bundle_carries_the_template(chat_bundle: Path) -> None:
    gen = Generator(chat_bundle)
    assert gen.chat_template is not None and gen.chat_template.source == STORIES_CHAT
    text = gen.render_chat([{"role": "user", "content": "hi"}])
    assert text == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # tokenized like apply_chat_template(tokenize=True): the template's BOS, and no second one added
    chat = gen.chat_session()
    result = chat.reply("hi", SHORT)
    assert result.prompt_ids[:2] != [1, 1] and result.prompt_ids[0] == 1
    assert result.prompt_ids == gen.tokenizer.encode(text, add_special_tokens=False).ids


def assert_same_cache(gen: Generator, fresh: Generator) -> None:
    """Both KV caches hold the same positions with the same keys and values."""
    assert gen.engine.length == fresh.engine.length
    for slot in range(len(gen.engine.past_names) // 2):
        for kind in ("key", "value"):
            np.testing.assert_allclose(gen.engine.kv(slot, kind), fresh.engine.kv(slot, kind), rtol=1e-4, atol=1e-4)


def test_multi_turn_cache_equals_a_fresh_run(chat_bundle: Path) -> None:
    """Each turn with the cache kept gives the tokens of the whole conversation run from an empty cache,
    while feeding only the new turn."""
    gen, fresh = Generator(chat_bundle), Generator(chat_bundle)
    chat = gen.chat_session(system="You tell stories.")
    previous = None
    for question in ("Once upon a time", "Tell me about Lily.", "What did the dog do?"):
        messages = [*chat.messages, {"role": "user", "content": question}]
        result = chat.reply(question, SHORT)
        fresh.forget_cache()
        ref = fresh.chat(messages, SHORT)
        assert ref.cached_tokens == 0
        assert result.prompt_ids == ref.prompt_ids
        assert result.token_ids == ref.token_ids and result.text == ref.text
        assert chat.messages[-1] == {"role": "assistant", "content": result.text}
        assert chat.last_prompt == gen.render_chat(messages)
        assert_same_cache(gen, fresh)
        if previous is None:
            assert result.cached_tokens == 0
        else:  # the previous turn's whole prompt came from the cache; the new turn was fed
            assert len(previous.prompt_ids) <= result.cached_tokens < len(result.prompt_ids)
        previous = result
    assert len(chat.messages) == 7
    # stream() still starts from an empty cache, and a chat turn after it finds less cached but the same tokens
    assert gen.generate("Once upon a time", SHORT).token_ids == fresh.generate("Once upon a time", SHORT).token_ids
    messages = [*chat.messages, {"role": "user", "content": "The end."}]
    again = chat.reply("The end.", SHORT)
    fresh.forget_cache()
    assert again.token_ids == fresh.chat(messages, SHORT).token_ids
    assert again.cached_tokens < len(previous.prompt_ids)
    assert_same_cache(gen, fresh)
    # a history that differs from the cache part-way (an edited reply) reuses only the common prefix
    edited = chat.messages
    edited[2]["content"] = "Something else entirely."
    edited.append({"role": "user", "content": "Go on."})
    result = gen.chat(edited, SHORT)
    fresh.forget_cache()
    assert result.token_ids == fresh.chat(edited, SHORT).token_ids
    assert 0 < result.cached_tokens < len(again.prompt_ids)
    assert_same_cache(gen, fresh)


def test_reset_forgets_conversation_and_cache(chat_bundle: Path) -> None:
    gen = Generator(chat_bundle)
    chat = gen.chat_session(system="S")
    first = chat.reply("hi", SHORT)
    chat.reply("more", SHORT)
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "S"}] and gen.engine.length == 0
    after = chat.reply("hi", SHORT)
    assert after.cached_tokens == 0
    assert (after.prompt_ids, after.token_ids) == (first.prompt_ids, first.token_ids)


def test_stops_on_end_of_turn_token(chat_bundle: Path) -> None:
    gen = Generator(chat_bundle)
    gen.eos_ids = frozenset()  # so only the end-of-turn rule can stop early
    first = gen.chat_session().reply("hi", SHORT).token_ids
    k = next(i for i in range(1, len(first)) if first[i] not in first[:i])
    marker = gen.tokenizer.id_to_token(first[k])
    template = ChatTemplate(STORIES_CHAT, bos_token="<s>", eos_token="</s>", end_of_turn=(marker,))
    result = gen.chat_session(template=template).reply("hi", SHORT)
    assert result.stop_reason == "end_of_turn" and result.token_ids == first[:k]
    # --ignore-eos (stop_on_eos=False) keeps going past it
    ignore = GenerationConfig(max_new_tokens=12, stop_on_eos=False)
    assert gen.chat_session(template=template).reply("hi", ignore).token_ids == first


def test_chat_errors(chat_bundle: Path, plain_bundle: Path) -> None:
    with pytest.raises(EdgekitError, match=r"has no chat template .*use a prompt without --chat"):
        Generator(plain_bundle).chat_session()
    gen = Generator(chat_bundle)
    chat = gen.chat_session(system="Once upon a time " * 200)
    with pytest.raises(EdgekitError, match=r"the conversation is \d+ tokens; this bundle serves at most 512"):
        chat.reply("hi", SHORT)
    assert [m["role"] for m in chat.messages] == ["system"]  # the failed turn is not kept
    with pytest.raises(EdgekitError, match="non-empty"):
        gen.chat_session().send("  ")
    # an abandoned stream leaves the conversation as it was, and the next turn is still exact
    chat = gen.chat_session()
    tokens = chat.send("hi", SHORT)
    next(tokens)
    tokens.close()
    assert chat.messages == []
    assert chat.reply("hi", SHORT).token_ids == Generator(chat_bundle).chat_session().reply("hi", SHORT).token_ids


def test_run_chat_cli(chat_bundle: Path, plain_bundle: Path) -> None:
    r = _edgekit("run", str(plain_bundle), "--chat", "hi")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "has no chat template" in lines[0], r.stderr
    assert lines[0].startswith("edgekit: error: ")
    r = _edgekit("run", str(chat_bundle), "hi", "--system", "S")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == ["edgekit: error: --system needs --chat"]
    r = _edgekit("run", str(chat_bundle), "--chat", "hi", "--system", "S", "--max-new-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    gen = Generator(chat_bundle)
    expected = gen.chat(messages, SHORT)
    assert out["rendered_prompt"] == gen.render_chat(messages)
    assert out["token_ids"] == expected.token_ids and out["messages"][-1]["content"] == expected.text
    r = _edgekit("run", str(chat_bundle), "--chat", "hi", "--max-new-tokens", "12")
    assert r.returncode == 0 and r.stdout == expected_reply(chat_bundle, None, "hi") + "\n"


def expected_reply(bundle: Path, system: str | None, text: str) -> str:
    return Generator(bundle).chat_session(system).reply(text, SHORT).text


def test_chat_cli_over_a_pipe(chat_bundle: Path) -> None:
    r = _edgekit("chat", str(chat_bundle), "--max-new-tokens", "12", stdin="hi\n/reset\n\nhello\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no banner or timings when stdin is not a terminal
    gen = Generator(chat_bundle)
    chat = gen.chat_session()
    one = chat.reply("hi", SHORT).text
    chat.reset()
    two = chat.reply("hello", SHORT).text
    assert r.stdout == one + "\n" + two + "\n"
    # without the /reset the second reply continues the conversation, so it differs (and /exit ends early)
    r2 = _edgekit("chat", str(chat_bundle), "--max-new-tokens", "12", stdin="hi\nhello\n/exit\nignored\n")
    chat = gen.chat_session()
    chat.reply("hi", SHORT)
    assert r2.returncode == 0 and r2.stdout == one + "\n" + chat.reply("hello", SHORT).text + "\n"
    assert r2.stdout != r.stdout
    r3 = _edgekit("chat", str(chat_bundle), "--top-p", "0", stdin="hi\n")
    assert r3.returncode != 0 and len(r3.stderr.strip().splitlines()) == 1 and "top-p" in r3.stderr
    assert "Example" in _edgekit("chat", "--help").stdout


def test_chat_never_imports_torch(chat_bundle: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from edgekit.runtime import GenerationConfig, Generator
        gen = Generator({str(chat_bundle)!r})
        gen.generate("Once upon a time", GenerationConfig(max_new_tokens=4))
        print("JINJA_FOR_PLAIN_RUN", "jinja2" in sys.modules)
        chat = gen.chat_session(system="S")
        for text in ("hi", "hello"):
            assert chat.reply(text, GenerationConfig(max_new_tokens=8)).token_ids
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        print("LOADED", bad)
        sys.exit(1 if bad else 0)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LOADED []" in proc.stdout and "JINJA_FOR_PLAIN_RUN False" in proc.stdout


# Written here in the style of Qwen3's template: the constructs it relies on (a namespace updated while walking
# the messages backwards, `is string`, str methods, splitting a reasoning block off past assistant turns) and
# the `enable_thinking` variable that apply_chat_template passes through as a keyword argument.
THINKING = (
    "{%- set ns = namespace(last_user=messages|length - 1) %}"
    "{%- for m in messages[::-1] %}{%- if m.role == 'user' and ns.last_user == messages|length - 1 %}"
    "{%- set ns.last_user = (messages|length - 1) - loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- set content = m.content if m.content is string else '' %}"
    "{%- if m.role == 'assistant' and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{{- '<|im_start|>' + m.role + '\\n' + content.strip() + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
EMPTY_THINK = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.mark.parametrize("thinking", [None, True, False])
def test_a_qwen3_style_template_and_its_variables_match_transformers(thinking: bool | None) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>\nplan\n</think>\n\nhello"},
        {"role": "user", "content": " and now? "},
    ]
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    ours = ChatTemplate(THINKING, variables=kwargs).render(messages)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>")))
    assert ours == tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, chat_template=THINKING, **kwargs
    )
    assert ours.endswith(EMPTY_THINK) == (thinking is False) and "plan" not in ours


def test_template_var_reaches_the_template_from_the_command_line(bundle_factory, tmp_path_factory) -> None:
    model = tmp_path_factory.mktemp("thinking-model") / "stories260k-thinking"
    shutil.copytree(STORIES, model)
    (model / "chat_template.jinja").write_text(THINKING)
    bundle = str(bundle_factory(model=str(model)))
    r = _edgekit(
        "run", bundle, "hi", "--chat", "--template-var", "enable_thinking=false", "--max-new-tokens", "4", "--json"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rendered_prompt"].endswith(EMPTY_THINK)
    r = _edgekit("run", bundle, "hi", "--chat", "--max-new-tokens", "4", "--json")
    assert not json.loads(r.stdout)["rendered_prompt"].endswith(EMPTY_THINK)
    r = _edgekit("chat", bundle, "--template-var", "enable_thinking", stdin="hi\n")
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr
    r = _edgekit("run", bundle, "hi", "--template-var", "enable_thinking=false")
    assert r.returncode == 2 and "--template-var needs --chat" in r.stderr
