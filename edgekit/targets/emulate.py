"""Run a bundle's agreement probes on emulated aarch64 cores and compare them with the host's.

The host computes each probe (`edgekit.runtime.agreement`) natively; each core then runs all of them in
one guest process (a guest Python start costs ~2 s under emulation) and writes them to a folder the host
reads back. Emulation says whether the ARM kernels compute what x86's do; it says nothing about speed,
memory or heat, which only the board can tell.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import edgekit
from edgekit import DATA_DIR
from edgekit.bundle.folder import Bundle
from edgekit.errors import EdgekitError
from edgekit.runtime.agreement import Agreement, Probe, ProbeJob, compare, jobs_to_file, probe, read_probe
from edgekit.targets.arm_env import ArmEnvironment, arm_environment, guest_command, guest_env

FALLBACK_TEXT = DATA_DIR / "calib-tinystories.txt"


@dataclass(frozen=True)
class CoreCheck:
    core: str
    job: ProbeJob
    agreement: Agreement | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "core": self.core,
            "bundle": self.job.bundle,
            "graph": self.job.graph,
            "agreement": self.agreement.to_dict() if self.agreement else None,
            "error": self.error,
        }


def bundle_graphs(bundle: Bundle) -> list[str]:
    """The graphs a bundle carries: model.onnx always, its .ort twin and the fixed pair when exported."""
    files = bundle.manifest["files"]
    graphs = ["onnx"]
    if bundle.model_file.with_suffix(".ort").relative_to(bundle.path).as_posix() in files:
        graphs.append("ort")
    if (bundle.manifest.get("fixed_shapes") or {}).get("files"):
        graphs.append("fixed")
    return graphs


def probe_text(bundle: Bundle) -> Path:
    """The text the export verified perplexity on, when it is one edgekit ships; else TinyStories."""
    name = (bundle.manifest.get("verification") or {}).get("ppl_text")
    shipped = DATA_DIR / name if isinstance(name, str) and "/" not in name else None
    return shipped if shipped and shipped.is_file() else FALLBACK_TEXT


def probe_jobs(
    bundle: Bundle, graphs: list[str] | None = None, text: Path | None = None, tokens: int = 96, new_tokens: int = 24
) -> list[ProbeJob]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(bundle.path / "tokenizer.json"))
    source = text or probe_text(bundle)
    try:
        ids = tokenizer.encode(source.read_text(encoding="utf-8")).ids
    except (OSError, UnicodeDecodeError) as e:
        raise EdgekitError(f"cannot read the probe text {source}: {e}") from e
    fixed = bundle.manifest.get("fixed_shapes") or {}
    room = min(int(bundle.manifest["architecture"]["max_context"]), int(fixed.get("context") or 1 << 30)) - 1
    tokens = min(tokens, room, len(ids))
    prompt = ids[: min(8, tokens)]
    new_tokens = min(new_tokens, room - len(prompt))
    if tokens < 2 or new_tokens < 1:
        raise EdgekitError(f"the probe text {source} is too short for this bundle ({len(ids)} tokens)")
    return [
        ProbeJob(str(bundle.path.resolve()), g, ids[:tokens], prompt, new_tokens, threads=2)
        for g in graphs or bundle_graphs(bundle)
    ]


def _edgekit_on_path(work: Path) -> Path:
    # A folder holding only a link to this edgekit package: the host's site-packages (x86 builds of numpy
    # and the rest) must not reach the guest's path.
    folder = work / "src"
    folder.mkdir()
    (folder / "edgekit").symlink_to(Path(edgekit.__file__).resolve().parent)
    return folder


def run_probe_process(
    cmd: list[str], env: dict[str, str], jobs: list[ProbeJob], what: str, timeout: float = 3600
) -> tuple[list[Probe | str], float]:
    """Jobs run by `cmd + [-m edgekit.runtime.agreement JOBS OUT]` in another Python (an emulated core, a
    separate onnxruntime build): each job's probe or its one-line error, and the process's wall seconds."""
    with tempfile.TemporaryDirectory(prefix="edgekit-probe-") as tmp_name:
        work = Path(tmp_name)
        jobs_to_file(jobs, work / "jobs.json")
        args = ["-m", "edgekit.runtime.agreement", str(work / "jobs.json"), str(work / "out")]
        start = time.perf_counter()
        try:
            env = {
                **env,
                "PYTHONPATH": os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(_edgekit_on_path(work))])),
            }
            proc = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise EdgekitError(f"the {what} run took longer than {timeout:.0f} s") from e
        seconds = time.perf_counter() - start
        if proc.returncode:
            tail = (proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}").splitlines()[-1]
            raise EdgekitError(f"the {what} run failed: {tail}")
        results: list[Probe | str] = []
        for i in range(len(jobs)):
            npz, err = work / "out" / f"{i}.npz", work / "out" / f"{i}.error"
            results.append(read_probe(npz) if npz.is_file() else err.read_text(encoding="utf-8"))
        return results, seconds


def run_on_core(
    env: ArmEnvironment, core: str, jobs: list[ProbeJob], timeout: float = 3600
) -> tuple[list[Probe | str], float]:
    """Each job's probe (or its one-line error) from the emulated core, and the guest's wall seconds."""
    cmd = guest_command(env, core, [])
    return run_probe_process(cmd, guest_env(core, [env.site]), jobs, f"emulated {core}", timeout)


def check_cores(
    jobs: list[ProbeJob],
    cores: list[str],
    env: ArmEnvironment | None = None,
    say=lambda line: None,
    timeout: float = 3600,
) -> list[CoreCheck]:
    """Every job on every core against the host; a probe the host cannot run is an error, not a result."""
    env = env or arm_environment(say=say)
    host = [probe(job) for job in jobs]
    checks: list[CoreCheck] = []
    for core in cores:
        guest, seconds = run_on_core(env, core, jobs, timeout)
        say(f"{core}: {len(jobs)} probes in {seconds:.0f} s (emulated)")
        for job, mine, theirs in zip(jobs, host, guest, strict=True):
            if isinstance(theirs, str):
                checks.append(CoreCheck(core, job, None, theirs))
            else:
                checks.append(CoreCheck(core, job, compare(mine, theirs, job.text_ids)))
    return checks
