"""The schema of `edgekit.json`, checked before anything reads a bundle.

A manifest comes from disk, possibly from someone else's machine, so every field a reader relies on is
checked here once (type, range, and the cross-field facts: kept + skipped layers partition the model,
KV slot j serves kept layer j, every file name stays inside the bundle) and readers can then index it
without defensive code. Unknown keys are allowed, so newer writers stay readable. `export._manifest`
writes what this checks; a test exports a bundle and validates it, so the two cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from edgekit.errors import EdgekitError

SCHEMA_VERSION = 1
MANIFEST = "edgekit.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

Check = Callable[[Any, str], None]


class _Bad(Exception):
    """A field that breaks the schema; turned into one EdgekitError naming the manifest and the field."""


def _type(*types: type) -> Check:
    def check(v: Any, at: str) -> None:
        # bool is an int in Python; a JSON true where a count belongs is still wrong.
        if (isinstance(v, bool) and bool not in types) or not isinstance(v, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise _Bad(f"{at} must be {names}, not {type(v).__name__}")

    return check


def _count(minimum: int = 0) -> Check:
    def check(v: Any, at: str) -> None:
        _type(int)(v, at)
        if v < minimum:
            raise _Bad(f"{at} must be at least {minimum}")

    return check


def _number(v: Any, at: str) -> None:
    _type(int, float)(v, at)


def _optional(inner: Check) -> Check:
    def check(v: Any, at: str) -> None:
        if v is not None:
            inner(v, at)

    return check


def _list(item: Check) -> Check:
    def check(v: Any, at: str) -> None:
        _type(list)(v, at)
        for i, x in enumerate(v):
            item(x, f"{at}[{i}]")

    return check


def _file_name(v: Any, at: str) -> None:
    """A relative path inside the bundle: no absolute paths, no '..', no backslashes, no hidden files."""
    _type(str)(v, at)
    p = PurePosixPath(v)
    if not v or "\\" in v or "\x00" in v or p.is_absolute() or any(part in ("..", ".", "") for part in v.split("/")):
        raise _Bad(f"{at} {v!r} is not a file name inside the bundle")
    if any(part.startswith(".") for part in p.parts):
        raise _Bad(f"{at} {v!r} is a hidden file")


def _sha256(v: Any, at: str) -> None:
    _type(str)(v, at)
    if not _SHA256.match(v):
        raise _Bad(f"{at} is not a sha256 hex digest")


def _object(fields: dict[str, tuple[bool, Check]]) -> Check:
    """fields: key → (required, check)."""

    def check(v: Any, at: str) -> None:
        _type(dict)(v, at)
        for key, (required, inner) in fields.items():
            if key in v:
                inner(v[key], f"{at}.{key}" if at else key)
            elif required:
                raise _Bad(f"lacks '{at}.{key}'" if at else f"lacks '{key}'")

    return check


def _files(v: Any, at: str) -> None:
    _type(dict)(v, at)
    if not v:
        raise _Bad(f"{at} is empty")
    entry = _object({"sha256": (True, _sha256), "bytes": (True, _count(0))})
    for name, e in v.items():
        _file_name(name, f"{at} key")
        if name == MANIFEST:
            raise _Bad(f"{at} lists {MANIFEST} itself")
        entry(e, f"{at}[{name!r}]")


_REQ, _OPT = True, False
_STR = _type(str)
_MANIFEST = _object(
    {
        "schema_version": (_REQ, _type(int)),
        "created": (_OPT, _STR),
        "model": (_REQ, _object({"name": (_REQ, _STR), "family": (_OPT, _STR)})),
        "source": (
            _REQ,
            _object(
                {
                    "id": (_REQ, _STR),
                    "resolved_from": (_OPT, _STR),
                    "config_sha256": (_REQ, _sha256),
                    "architecture": (_OPT, _STR),
                    "model_type": (_REQ, _STR),
                }
            ),
        ),
        "architecture": (
            _REQ,
            _object(
                {
                    "num_layers": (_REQ, _count(1)),
                    "hidden_size": (_REQ, _count(1)),
                    "intermediate_size": (_REQ, _count(1)),
                    "num_attention_heads": (_REQ, _count(1)),
                    "num_key_value_heads": (_REQ, _count(1)),
                    "head_dim": (_REQ, _count(1)),
                    "vocab_size": (_REQ, _count(1)),
                    "max_context": (_REQ, _count(2)),
                    "tie_word_embeddings": (_OPT, _type(bool)),
                    "bos_token_id": (_OPT, _optional(_count(0))),
                    "eos_token_ids": (_REQ, _list(_count(0))),
                }
            ),
        ),
        "skip": (
            _REQ,
            _object(
                {
                    "rule": (_REQ, _STR),
                    "skipped": (_REQ, _list(_count(0))),
                    "kept": (_REQ, _list(_count(0))),
                    "attention_layers": (_OPT, _count(1)),
                }
            ),
        ),
        "graph": (
            _REQ,
            _object(
                {
                    "file": (_REQ, _file_name),
                    "external_data": (_OPT, _optional(_file_name)),
                    "flavour": (_REQ, _STR),
                    "opset": (_REQ, _count(1)),
                    "inputs": (_REQ, _list(_STR)),
                    "outputs": (_REQ, _list(_STR)),
                    "kv_layout": (_REQ, _STR),
                    "kv_dtype": (_REQ, _STR),
                    "kv_heads": (_REQ, _count(1)),
                    "head_dim": (_REQ, _count(1)),
                    "kv_slots": (
                        _REQ,
                        _list(
                            _object(
                                {
                                    "slot": (_REQ, _count(0)),
                                    "layer": (_REQ, _count(0)),
                                    "window": (_OPT, _count(1)),
                                }
                            )
                        ),
                    ),
                    "kv_bytes_per_token": (_REQ, _count(0)),
                    "kv_window": (_OPT, _count(1)),
                    "kv_window_bytes": (_OPT, _count(0)),
                }
            ),
        ),
        "quantization": (
            _REQ,
            _object(
                {
                    "mode": (_REQ, _STR),
                    "bits": (_REQ, _optional(_count(1))),
                    "block_size": (_OPT, _count(1)),
                    "accuracy_level": (_OPT, _count(0)),
                    "lm_head": (_OPT, _STR),
                    "embedding": (_OPT, _STR),
                }
            ),
        ),
        "tokenizer": (_OPT, _object({"files": (_REQ, _list(_file_name))})),
        "verification": (
            _OPT,
            _optional(
                _object(
                    {
                        "max_abs_logit_diff": (_REQ, _number),
                        "top1_agreement": (_REQ, _number),
                        "greedy_match": (_REQ, _type(bool)),
                        "ppl_onnx": (_OPT, _optional(_number)),
                        "ppl_torch_fp32": (_OPT, _optional(_number)),
                    }
                )
            ),
        ),
        "files": (_REQ, _files),
        "command": (_OPT, _STR),
        "packages": (_OPT, _type(dict)),
        "timings_s": (_OPT, _type(dict)),
    }
)


def _cross_checks(m: dict[str, Any]) -> None:
    arch, skip, graph, files = m["architecture"], m["skip"], m["graph"], m["files"]
    n = arch["num_layers"]
    kept, skipped = skip["kept"], skip["skipped"]
    if kept != sorted(set(kept)) or skipped != sorted(set(skipped)):
        raise _Bad("skip.kept and skip.skipped must be sorted lists without repeats")
    if sorted(kept + skipped) != list(range(n)):
        raise _Bad(f"skip.kept and skip.skipped must together name each of the {n} layers exactly once")
    if not kept:
        raise _Bad("skip.kept is empty: every model keeps attention in at least one layer")
    slots = [(s["slot"], s["layer"]) for s in graph["kv_slots"]]
    if slots != list(enumerate(kept)):
        raise _Bad("graph.kv_slots must map slot j to the j-th kept layer")
    for key in ("file", "external_data"):
        if graph.get(key) is not None and graph[key] not in files:
            raise _Bad(f"graph.{key} {graph[key]!r} is not in files")
    quant, ver = m["quantization"], m.get("verification")
    if quant["bits"] is not None:
        for key in ("block_size", "lm_head", "embedding"):
            if key not in quant:
                raise _Bad(f"lacks 'quantization.{key}', which a {quant['bits']}-bit bundle records")
    if ver and ver.get("ppl_onnx") is not None and ver.get("ppl_torch_fp32") is None:
        raise _Bad("verification.ppl_onnx has no verification.ppl_torch_fp32 to compare with")
    for name in m.get("tokenizer", {}).get("files", []):
        if name not in files:
            raise _Bad(f"tokenizer file {name!r} is not in files")


def validate_manifest(manifest: Any, where: str = MANIFEST) -> None:
    """Raise EdgekitError with the first schema violation; return quietly for a well-formed manifest."""
    if not isinstance(manifest, dict):
        raise EdgekitError(f"{where}: the manifest is not a JSON object")
    version = manifest.get("schema_version")
    if "schema_version" in manifest and version != SCHEMA_VERSION:
        raise EdgekitError(f"{where}: manifest schema {str(version)[:40]}; this edgekit reads schema {SCHEMA_VERSION}")
    try:
        _MANIFEST(manifest, "")
        _cross_checks(manifest)
    except _Bad as e:
        raise EdgekitError(f"{where}: manifest {str(e)[:300]}") from None
