"""The bundle: a folder with the model, its tokenizer and `edgekit.json`, written atomically.

A bundle is built in a hidden temporary folder next to its target and renamed into place only once
complete, so a crash or Ctrl-C never leaves something that looks like a bundle. A lock file keeps two
exports from writing the same target at once; temporary folders left by a killed process (SIGKILL,
power loss) carry the writer's pid and are removed by the next export to the same parent folder.
"""

from __future__ import annotations

import contextlib
import errno
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

from edgekit.bundle.manifest import MANIFEST, SCHEMA_VERSION, validate_manifest
from edgekit.errors import EdgekitError

__all__ = ["MANIFEST", "SCHEMA_VERSION", "Bundle", "open_bundle", "read_bundle", "validate_manifest"]

TMP_MARK = ".edgekit-tmp-"
LOCK_SUFFIX = ".edgekit-lock"
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few KB; refuse to parse a huge one
# Errors that mean "the disk or the folder refused the write", not an edgekit bug.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM}


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


def _check_target(target: Path, force: bool) -> list[Path]:
    """Refuse targets we must not write; create the missing parent folders and return them."""
    if TMP_MARK in target.name or target.name.endswith(LOCK_SUFFIX) or target.name.startswith("."):
        # such names are reserved for edgekit's own temporaries (and hidden folders are easy to lose)
        raise EdgekitError(f"output name {target.name!r} is reserved or hidden; choose another -o")
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
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(created)
        raise EdgekitError(f"cannot create output folder {parent}: {e.strerror}") from e
    if not os.access(parent, os.W_OK):
        raise EdgekitError(f"output folder {parent} is not writable")
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Undo the parent folders an export created (deepest first), unless something else is in them now."""
    for p in folders:
        with contextlib.suppress(OSError):
            p.rmdir()


@contextlib.contextmanager
def bundle_writer(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder to fill; on clean exit it becomes `target`, on any error it is removed."""
    target = target.absolute()
    created = _check_target(target, force)
    lock_path = target.parent / f".{target.name}{LOCK_SUFFIX}"
    try:
        lock = _acquire_lock(lock_path, target)
    except BaseException:
        _remove_empty(created)
        raise
    done = False
    try:
        clean_stale_temporaries(target.parent, target.name)
        tmp = target.parent / f".{target.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            yield tmp
            _commit(tmp, target, force)
            done = True
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
                raise EdgekitError(f"cannot write the bundle in {target.parent}: {e.strerror}; nothing was kept") from e
            raise
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        lock.close()
        if not done:
            _remove_empty(created)


def _acquire_lock(lock_path: Path, target: Path) -> Any:
    """An exclusive flock on `lock_path`. The file is unlinked when its holder finishes, so a waiter may
    have locked an inode that is already gone: check that the path still names the locked file."""
    for _ in range(5):
        try:
            lock = open(lock_path, "a")  # noqa: SIM115 - held for the whole export
        except OSError as e:
            raise EdgekitError(f"cannot write in {target.parent}: {e.strerror}") from e
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            lock.close()
            raise EdgekitError(f"another edgekit export is writing {target} right now; try again when it ends") from e
        try:
            if os.fstat(lock.fileno()).st_ino == os.stat(lock_path).st_ino:
                return lock
        except FileNotFoundError:
            pass
        lock.close()
    raise EdgekitError(f"could not lock {lock_path}: other exports keep replacing it")


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
        try:
            tmp.rename(target)
        except BaseException:  # Ctrl-C or an error between the two renames: put the previous bundle back
            old.rename(target)
            raise
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
        if mf.stat().st_size > MAX_MANIFEST_BYTES:
            raise EdgekitError(f"{mf} is {mf.stat().st_size} bytes; a manifest is a few KB, so this is not one")
        manifest = json.loads(mf.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgekitError(f"{mf} is not valid JSON: {e}") from e
    except RecursionError as e:  # deeply nested JSON
        raise EdgekitError(f"{mf} is not a manifest: its JSON nests too deeply") from e
    except OSError as e:
        raise EdgekitError(f"cannot read {mf}: {e.strerror}") from e
    validate_manifest(manifest, str(mf))
    return Bundle(path, manifest)


def check_integrity(bundle: Bundle) -> list[str]:
    """Problems found comparing files with the manifest's sizes and sha256 (empty list: intact)."""
    problems = []
    for name, entry in bundle.manifest["files"].items():
        p = bundle.path / name
        try:
            if p.is_symlink():  # a link can point anywhere; the bundle must hold its own bytes
                problems.append(f"{name}: a symbolic link, not a file")
            elif not p.is_file():
                problems.append(f"{name}: missing")
            elif p.stat().st_size != entry["bytes"]:
                problems.append(f"{name}: size {p.stat().st_size} != {entry['bytes']} in the manifest")
            elif sha256_file(p) != entry["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest")
        except OSError as e:
            problems.append(f"{name}: cannot read ({e.strerror})")
    listed = set(bundle.manifest["files"]) | {MANIFEST}
    problems += [
        f"{rel}: not in the manifest"
        for rel in sorted(p.relative_to(bundle.path).as_posix() for p in bundle.path.rglob("*") if not p.is_dir())
        if rel not in listed
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
