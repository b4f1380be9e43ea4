"""Run a bundle on onnxruntime + tokenizers + numpy: sessions and providers (`session`,
`providers`), generation with a shared KV buffer (`generator`), and profiling (`profile`).

May import: bundle, errors. Never torch or transformers (checked): this is what an app embeds.
"""

from edgekit.runtime.generator import Generation, GenerationConfig, Generator, Token
from edgekit.runtime.providers import RuntimeOptions

__all__ = ["Generation", "GenerationConfig", "Generator", "RuntimeOptions", "Token"]
