"""A GGUF file as a checkpoint: its config and tokenizer written once into edgekit's cache as the files
the rest of the pipeline reads (config.json, tokenizer.json, tokenizer_config.json), its tensors read
from the file itself, dequantized one at a time.

The cache folder is keyed by the file's sha256, so a changed file never meets a stale conversion, and it
is written to a temporary folder and renamed, so an interrupted conversion leaves nothing half-done.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.checkpoint.fetch import cache_dir, sha256_file
from edgekit.checkpoint.gguf import GGUFWeights, read_gguf
from edgekit.checkpoint.gguf_tokenizer import write_tokenizer
from edgekit.errors import EdgekitError

# Bump when what is written into the cache folder changes, so old conversions are redone.
CONVERSION_VERSION = 1


@dataclass
class GGUFSource:
    file: Path
    folder: Path  # config.json + tokenizer files, in the cache
    weights: GGUFWeights
    manifest: dict[str, Any] = field(default_factory=dict)  # the manifest's source.gguf entry


def _convert(path: Path, config: dict[str, Any], folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        write_tokenizer(path, tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process converted the same file meanwhile: theirs is as good
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_gguf(path: Path) -> GGUFSource:
    model = read_gguf(path)
    digest = sha256_file(path)
    folder = cache_dir() / "gguf" / f"{digest[:16]}-v{CONVERSION_VERSION}"
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        _convert(path, model.config, folder)
    counts: dict[str, int] = {}
    for t in model.tensor_types.values():
        counts[t] = counts.get(t, 0) + 1
    manifest = {
        "file": path.name,
        "sha256": digest,
        "bytes": path.stat().st_size,
        "architecture": model.architecture,
        "tensor_types": dict(sorted(counts.items())),
        "tensor_type_by_name": model.tensor_types,
        "metadata": {k: v for k, v in model.metadata_summary.items() if k.startswith("general.")},
        "conversion": "each tensor dequantized to float32 with gguf.quants (llama.cpp's reference "
        "dequantizers), llama.cpp's Q/K row permutation undone; tokenizer converted by transformers",
    }
    if not model.weights.names():
        raise EdgekitError(f"{path.name} holds no tensors")
    return GGUFSource(path, folder, model.weights, manifest)
