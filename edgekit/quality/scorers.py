"""The one interface every metric scores through: an exported bundle (onnxruntime) or a PyTorch
checkpoint with a skip set applied. `models.py` opens them.

A user judges a skip set on the checkpoint before spending an export on it, then checks the bundle;
the fp32 numbers of the two agree to float rounding because both go through `Scorer.logits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError


@dataclass
class Scorer:
    """Base: tokenizer plus `logits(ids) → [len, vocab]` for one sequence; subclasses fill `logits`."""

    name: str
    kind: str  # "bundle" | "checkpoint"
    tokenizer: Any = field(repr=False)
    max_context: int
    vocab: int
    skipped: list[int]
    num_layers: int
    quant: str
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def logits(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError

    def generate(self, ids: list[int], max_new_tokens: int, stop: list[str] | None = None) -> list[int]:
        """Greedy continuation, recomputing the window each step (subclasses may use a KV cache)."""
        out: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(self.logits((ids + out)[-self.max_context :])[-1].argmax())
            out.append(tok)
            if self._stops(out, tok, stop):
                break
        return out

    def _stops(self, out: list[int], tok: int, stop: list[str] | None) -> bool:
        if tok in self.eos_token_ids:
            return True
        return bool(stop) and any(s in self.decode(out) for s in stop)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "kind": self.kind,
            "quant": self.quant,
            "skipped": self.skipped,
            "num_layers": self.num_layers,
            "max_context": self.max_context,
        }


class BundleScorer(Scorer):
    session: Any

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.session.logits(ids)

    def generate(self, ids: list[int], max_new_tokens: int, stop: list[str] | None = None) -> list[int]:
        ids = ids[-(self.max_context - max_new_tokens) :] if len(ids) + max_new_tokens > self.max_context else ids
        logits, cache = self.session.forward(np.asarray([ids]))
        out: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            if self._stops(out, tok, stop) or cache.length + 1 >= self.max_context:
                break
            logits, cache = self.session.forward(np.asarray([[tok]]), cache)
        return out


class TorchScorer(Scorer):
    model: Any

    def logits(self, ids: list[int]) -> np.ndarray:
        from edgekit.skip.surgery import full_logits

        return full_logits(self.model, ids).numpy()


def load_tokenizer(folder: Path) -> Any:
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise EdgekitError(f"{folder} has no tokenizer.json; edgekit evaluates only fast-tokenizer models")
    return Tokenizer.from_file(str(path))
