"""The bundle: a folder with the model, its tokenizer and `edgekit.json`, written atomically.

A bundle is built in a hidden temporary folder next to its target and renamed into place only once
complete, so a crash or Ctrl-C never leaves something that looks like a bundle. A lock file keeps two
exports from writing the same target at once; temporary folders left by a killed process (SIGKILL,
power loss) carry the writer's pid and are removed by the next export to the same parent folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError

MANIFEST = "edgekit.json"
SCHEMA_VERSION = 1
TMP_MARK = ".edgekit-tmp-"
REQUIRED_KEYS = ("schema_version", "model", "source", "architecture", "skip", "graph", "quantization", "files")


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def model_file(self) -> Path:
        return self.path / self.manifest["graph"]["file"]

    @property
    def kept_layers(self) -> list[int]:
        return list(self.manifest["skip"]["kept"])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(parent: Path, name: str) -> list[Path]:
    """Remove temporary folders of dead exports of `name` in `parent`; return what was removed."""
    removed = []
    for p in parent.glob(f".{name}{TMP_MARK}*"):
        try:
            pid = int(p.name.rsplit(TMP_MARK, 1)[1].split("-")[0])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _check_target(target: Path, force: bool) -> None:
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise EdgekitError(f"output {target} exists and is not a folder; choose another -o")
        if not force:
            raise EdgekitError(f"output {target} already exists; pass --force to replace it")
        if any(target.iterdir()) and not (target / MANIFEST).is_file():
            raise EdgekitError(f"output {target} is a non-empty folder that is not an edgekit bundle; not replacing it")
    parent = target.parent
    if parent.exists() and not parent.is_dir():
        raise EdgekitError(f"output parent {parent} is not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgekitError(f"cannot create output folder {parent}: {e.strerror}") from e
    if not os.access(parent, os.W_OK):
        raise EdgekitError(f"output folder {parent} is not writable")


@contextlib.contextmanager
def bundle_writer(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on clean exit it becomes `target`, on any error it is removed."""
    target = target.absolute()
    _check_target(target, force)
    lock_path = target.parent / f".{target.name}.edgekit-lock"
    try:
        lock = open(lock_path, "w")  # noqa: SIM115 - held for the whole export
    except OSError as e:
        raise EdgekitError(f"cannot write in {target.parent}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise EdgekitError(f"another edgekit export is writing {target} right now") from e
        clean_stale_temporaries(target.parent, target.name)
        tmp = target.parent / f".{target.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            _commit(tmp, target, force)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        lock.close()


def _commit(tmp: Path, target: Path, force: bool) -> None:
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    if target.exists():
        if not force:  # appeared while we were exporting
            raise EdgekitError(f"output {target} appeared during the export; pass --force to replace it")
        old = target.parent / f".{target.name}{TMP_MARK}{os.getpid()}-old"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add the file table and write `edgekit.json` last, once every other file is final."""
    manifest = {**manifest, "files": file_table(folder)}
    data = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    with open(folder / MANIFEST, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def read_bundle(path: Path | str) -> Bundle:
    path = Path(path)
    if TMP_MARK in path.name:
        raise EdgekitError(f"{path} is an unfinished export's temporary folder, not a bundle")
    mf = path / MANIFEST
    if not path.is_dir():
        raise EdgekitError(f"bundle {path} does not exist" if not path.exists() else f"bundle {path} is not a folder")
    if not mf.is_file():
        raise EdgekitError(f"{path} is not an edgekit bundle: it has no {MANIFEST}")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgekitError(f"{mf} is not valid JSON: {e}") from e
    validate_manifest(manifest, mf)
    return Bundle(path, manifest)


def validate_manifest(manifest: Any, where: Path | str = MANIFEST) -> None:
    if not isinstance(manifest, dict):
        raise EdgekitError(f"{where}: the manifest is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise EdgekitError(f"{where}: manifest lacks '{missing[0]}'")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise EdgekitError(
            f"{where}: manifest schema {manifest['schema_version']!r}; this edgekit reads schema {SCHEMA_VERSION}"
        )
    for key in ("skip", "graph", "quantization", "files", "architecture", "source"):
        if not isinstance(manifest[key], dict):
            raise EdgekitError(f"{where}: manifest '{key}' is not an object")
    graph, skip = manifest["graph"], manifest["skip"]
    if not isinstance(graph.get("file"), str) or "/" in graph["file"] or graph["file"].startswith("."):
        raise EdgekitError(f"{where}: manifest graph.file must be a plain file name")
    for key in ("kept", "skipped"):
        if not isinstance(skip.get(key), list) or not all(isinstance(i, int) for i in skip[key]):
            raise EdgekitError(f"{where}: manifest skip.{key} must be a list of layer indices")
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or ".." in Path(name).parts:
            raise EdgekitError(f"{where}: manifest entry for file '{name}' is malformed")


def check_integrity(bundle: Bundle) -> list[str]:
    """Problems found comparing files with the manifest's sizes and sha256 (empty list: intact)."""
    problems = []
    for name, entry in bundle.manifest["files"].items():
        p = bundle.path / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != entry.get("bytes"):
            problems.append(f"{name}: size {p.stat().st_size} != {entry.get('bytes')}")
        elif sha256_file(p) != entry["sha256"]:
            problems.append(f"{name}: sha256 differs")
    listed = set(bundle.manifest["files"]) | {MANIFEST}
    problems += [
        f"{p.name}: not in the manifest" for p in bundle.path.iterdir() if p.is_file() and p.name not in listed
    ]
    return problems


def open_bundle(path: Path | str, check_integrity_first: bool = True) -> Bundle:
    """What `run`, `profile` and `eval` call: read the manifest and, unless told otherwise, refuse a
    bundle whose files do not match their recorded sha256 (tampered or damaged in transit)."""
    bundle = read_bundle(path)
    if check_integrity_first:
        problems = check_integrity(bundle)
        if problems:
            raise EdgekitError(
                f"bundle {bundle.path} does not match its manifest ({problems[0]}"
                + (f", and {len(problems) - 1} more" if len(problems) > 1 else "")
                + "); re-export it, or pass --no-integrity-check to use it anyway"
            )
    return bundle
