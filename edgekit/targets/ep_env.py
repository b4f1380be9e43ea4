"""Execution providers that come in their own onnxruntime build, run beside the host's.

PyPI's `onnxruntime-openvino` is a whole onnxruntime (the same `onnxruntime` module, built with the
OpenVINO EP): installed next to the host's, one would overwrite the other. So it gets a virtual
environment of its own, cached in `$EDGEKIT_CACHE/eps/<name>-<version>`, and the agreement probes
(`edgekit.runtime.agreement`) run there in one process, the way `edgekit.targets.emulate` runs them on
emulated ARM cores. Plugin EPs (onnxruntime-qnn) need none of this: they load into the host's onnxruntime.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgekit.checkpoint.fetch import cache_dir
from edgekit.errors import EdgekitError
from edgekit.runtime.agreement import Probe, ProbeJob
from edgekit.targets.arm_env import RUNTIME_EXTRAS
from edgekit.targets.emulate import run_probe_process

# provider -> (the pip package that is its onnxruntime build, the version measured with)
SEPARATE_BUILDS = {"openvino": ("onnxruntime-openvino", "1.24.1")}


@dataclass(frozen=True)
class ProviderEnvironment:
    provider: str
    home: Path

    @property
    def python(self) -> Path:
        return self.home / "bin" / "python"


def provider_environment(provider: str, home: Path | None = None, say=lambda line: None) -> ProviderEnvironment:
    """The cached virtual environment with `provider`'s onnxruntime build, made if missing."""
    if provider not in SEPARATE_BUILDS:
        raise EdgekitError(
            f"provider {provider!r} has no separate onnxruntime build: expected {', '.join(SEPARATE_BUILDS)}"
        )
    package, version = SEPARATE_BUILDS[provider]
    env = ProviderEnvironment(provider, home or cache_dir() / "eps" / f"{provider}-{version}")
    if (env.home / "ready").is_file():
        return env
    say(f"building the {package} {version} environment in {env.home} (once)")
    shutil.rmtree(env.home, ignore_errors=True)
    env.home.parent.mkdir(parents=True, exist_ok=True)
    # built in place: a virtual environment's scripts name its folder, so it cannot be renamed into place
    pip = [str(env.python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    steps = [
        ([sys.executable, "-m", "venv", str(env.home)], "python -m venv"),
        ([*pip, f"{package}=={version}", "numpy", "tokenizers", *RUNTIME_EXTRAS], f"pip install {package}=={version}"),
    ]
    for cmd, what in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            shutil.rmtree(env.home, ignore_errors=True)
            tail = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}").splitlines()[-1]
            raise EdgekitError(f"{what} failed: {tail}")
    (env.home / "ready").write_text(f"{package}=={version}\n", encoding="utf-8")
    return env


def run_in_environment(env: ProviderEnvironment, jobs: list[ProbeJob], timeout: float = 3600) -> list[Probe | str]:
    """Each job's probe (or its one-line error) computed by the environment's onnxruntime build."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root")}
    clean["PYTHONDONTWRITEBYTECODE"] = "1"
    return run_probe_process([str(env.python)], clean, jobs, f"{env.provider} environment", timeout)[0]
