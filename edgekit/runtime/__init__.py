"""Run a bundle on onnxruntime + tokenizers + numpy: sessions and providers (`session`,
`providers`), generation with a shared KV buffer (`generator`), chat templates and multi-turn
conversations (`chat`, jinja2), and profiling (`profile`).

May import: bundle, errors. Never torch or transformers (checked): this is what an app embeds.
"""

from typing import Any

from edgekit.runtime.generator import ChatSession, Generation, GenerationConfig, Generator, Token
from edgekit.runtime.providers import RuntimeOptions

__all__ = [
    "ChatSession",
    "ChatTemplate",
    "Conversation",
    "Generation",
    "GenerationConfig",
    "Generator",
    "RuntimeOptions",
    "Token",
]

_CHAT_NAMES = ("ChatTemplate", "Conversation")


def __getattr__(name: str) -> Any:
    # chat.py needs jinja2; import it only when a chat name is used, so plain generation never loads it.
    if name in _CHAT_NAMES:
        from edgekit.runtime import chat

        return getattr(chat, name)
    raise AttributeError(f"module 'edgekit.runtime' has no attribute {name!r}")
