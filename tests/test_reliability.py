"""Interruptions, a full disk, two exports at once, stale temporaries, and bundle integrity.

Real `edgekit export` processes are signalled at known points (tests/pause_export.py pauses the export
there) and the output folder is checked for anything left behind. Most are forked from a warm process
(tests/cli_zygote.py, saving ~3 s of imports each); one runs in a fresh interpreter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_zygote import Zygote

from edgekit.bundle.folder import TMP_MARK, check_integrity, clean_stale_temporaries, open_bundle, read_bundle
from edgekit.errors import EdgekitError

HERE = Path(__file__).resolve().parent
PAUSE = HERE / "pause_export.py"
EXPORT = ["export", "stories260k", "--skip", "2", "--quant", "int4"]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp), **extra}
    env.pop("EDGEKIT_DEBUG", None)
    return env


def _default_sigint() -> None:
    # A child of a non-interactive shell may inherit SIGINT as ignored; Python then never raises
    # KeyboardInterrupt. Give the export the disposition a terminal user's process has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote(hooks=True)
    yield z
    z.close()


class Export:
    """A real `edgekit export` process: forked from the warm zygote, or (fresh=True) a new interpreter.
    Runs in `root/work` with $TMPDIR `root/tmp`; its stderr goes to a file outside both."""

    count = 0

    def __init__(self, zygote, root: Path, argv, point="", release=None, fresh=False):
        Export.count += 1
        self.work, tmp = root / "work", root / "tmp"
        self.work.mkdir(exist_ok=True)
        tmp.mkdir(exist_ok=True)
        self.err = root / f"export-{Export.count}.err"
        env = _env(tmp, EDGEKIT_TEST_PAUSE_AT=point, EDGEKIT_TEST_RELEASE=str(release or root / "never"))
        self.zygote, self.proc = zygote, None
        if fresh:
            with open(self.err, "w") as err:
                self.proc = subprocess.Popen(
                    [sys.executable, str(PAUSE), *argv],
                    cwd=self.work,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    preexec_fn=_default_sigint,
                )
            self.pid = self.proc.pid
        else:
            self.pid = zygote.spawn(list(argv), self.work, env, root / f"export-{Export.count}.out", self.err)

    def wait_for_pause(self, point: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.err.exists() and f"paused at {point}" in self.err.read_text():
                return
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"export did not pause at {point}: {self.err.read_text()}")

    def wait(self) -> tuple[int, str]:
        rc = self.proc.wait(timeout=300) if self.proc is not None else self.zygote.wait(self.pid)
        return rc, self.err.read_text()


def _leftovers(work: Path) -> list[str]:
    return sorted(p.name for p in work.iterdir())


def _tmp_left(root: Path) -> list[str]:
    # third-party caches, not edgekit's: onnxruntime's telemetry id .ses, torch's empty torchinductor_$USER
    return sorted(p.name for p in (root / "tmp").iterdir() if p.name != ".ses" and "torchinductor" not in p.name)


@pytest.mark.parametrize(
    ("sig", "point", "fresh"),
    [
        (signal.SIGINT, "build", False),
        (signal.SIGTERM, "verify", True),
        (signal.SIGINT, "commit", False),
        (signal.SIGTERM, "commit", False),
    ],
    ids=["sigint-build", "sigterm-verify-fresh-process", "sigint-commit", "sigterm-commit"],
)
def test_signal_during_export_leaves_nothing(zygote, tmp_path, sig, point, fresh):
    argv = [*EXPORT, "-o", "b"] + ([] if point == "verify" else ["--no-verify"])
    export = Export(zygote, tmp_path, argv, point, fresh=fresh)
    export.wait_for_pause(point)
    os.kill(export.pid, sig)
    rc, err = export.wait()
    word, code = ("interrupted", 130) if sig == signal.SIGINT else ("terminated", 143)
    assert rc == code, err
    assert err.strip().splitlines()[-1] == f"edgekit: error: {word}"
    assert "Traceback" not in err
    assert _leftovers(export.work) == [], "no bundle, no temporary folder, no lock file"
    assert _tmp_left(tmp_path) == []


def test_sigkill_leftovers_are_never_a_bundle_and_the_next_run_cleans_them(zygote, tmp_path):
    # Killed while building, then killed again just before the rename (its temporary folder then holds
    # a complete bundle and manifest): neither may pass for a bundle; the third export cleans up,
    # and while it runs a fourth export to the same output is refused by the lock.
    first = Export(zygote, tmp_path, [*EXPORT, "-o", "b", "--no-verify"], "build")
    first.wait_for_pause("build")
    os.kill(first.pid, signal.SIGKILL)
    assert first.wait()[0] == -9
    work = first.work
    left = [p for p in work.iterdir() if TMP_MARK in p.name]
    assert len(left) == 1 and f"{TMP_MARK}{first.pid}-" in left[0].name
    assert (work / ".b.edgekit-lock").exists()
    assert not (work / "b").exists()

    second = Export(zygote, tmp_path, [*EXPORT, "-o", "b", "--no-verify"], "commit")
    second.wait_for_pause("commit")
    assert not left[0].exists(), "the second export removed the dead first export's temporary folder"
    os.kill(second.pid, signal.SIGKILL)
    second.wait()
    (stale,) = [p for p in work.iterdir() if TMP_MARK in p.name]
    assert (stale / "edgekit.json").is_file() and (stale / "model.onnx").is_file()
    for opener in (read_bundle, open_bundle):
        with pytest.raises(EdgekitError, match="unfinished export"):
            opener(stale)
    r = subprocess.run(
        [sys.executable, str(PAUSE), "verify", str(stale)], capture_output=True, text=True, env=_env(tmp_path / "tmp")
    )
    assert r.returncode == 1 and "unfinished export" in r.stderr

    release = tmp_path / "go"
    third = Export(zygote, tmp_path, [*EXPORT, "-o", "b", "--no-verify"], "build", release)
    third.wait_for_pause("build")
    assert not stale.exists()
    fourth = Export(zygote, tmp_path, [*EXPORT, "-o", "b", "--no-verify", "--force"])
    rc4, err4 = fourth.wait()
    release.touch()
    rc3, err3 = third.wait()
    assert rc4 == 1
    assert err4.strip().splitlines() == [
        f"edgekit: error: another edgekit export is writing {work / 'b'} right now; try again when it ends"
    ]
    assert rc3 == 0, err3
    assert _leftovers(work) == ["b"], "stale temporary folder and lock file are gone"
    assert check_integrity(read_bundle(work / "b")) == []
    assert _tmp_left(tmp_path) == []


def test_temporaries_of_live_exports_are_left_alone(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = tmp_path / f".b{TMP_MARK}{os.getpid()}-aaaa"
    gone = tmp_path / f".b{TMP_MARK}{dead.pid}-bbbb"
    other = tmp_path / f".c{TMP_MARK}{dead.pid}-cccc"  # another output's temporaries are not ours to judge
    for p in (mine, gone, other):
        p.mkdir()
    assert clean_stale_temporaries(tmp_path, "b") == [gone]
    assert mine.exists() and other.exists() and not gone.exists()


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_fails_cleanly(zygote, tmp_path):
    small = tmp_path / "work" / "small"
    if not _mount_tmpfs(small, "200k"):
        pytest.skip("cannot mount a size-limited tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        rc, err = Export(zygote, tmp_path, [*EXPORT, "-o", "small/b", "--no-verify"]).wait()
        assert rc == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err
        assert lines[0].startswith("edgekit: error: cannot write the bundle in") and "No space left" in lines[0]
        assert list(small.iterdir()) == [], "no bundle, no temporary folder, no lock file"
        assert _tmp_left(tmp_path) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


# --- integrity ---


def _sha256sum_lines(bundle: Path) -> str:
    files = json.loads((bundle / "edgekit.json").read_text())["files"]
    return "".join(f"{e['sha256']}  {name}\n" for name, e in files.items())


def test_verify_command_and_sha256sum_agree(tmp_path, bundle_factory):
    b = tmp_path / "b"
    shutil.copytree(bundle_factory(skip=2, quant="int4"), b)
    r = subprocess.run([sys.executable, str(PAUSE), "verify", str(b), "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    # On a device without edgekit: the manifest's table is a sha256sum check list.
    (tmp_path / "SUMS").write_text(_sha256sum_lines(b))
    assert subprocess.run(["sha256sum", "--quiet", "-c", str(tmp_path / "SUMS")], cwd=b).returncode == 0
    data = bytearray((b / "model.onnx").read_bytes())
    data[-100] ^= 1
    (b / "model.onnx").write_bytes(bytes(data))
    assert hashlib.sha256(data).hexdigest() not in _sha256sum_lines(b)
    r = subprocess.run([sys.executable, str(PAUSE), "verify", str(b), "--json"], capture_output=True, text=True)
    assert r.returncode == 1 and json.loads(r.stdout)["problems"] == ["model.onnx: sha256 differs from the manifest"]
    assert subprocess.run(["sha256sum", "--quiet", "-c", str(tmp_path / "SUMS")], cwd=b, capture_output=True).returncode


def test_open_bundle_refuses_tampering_unless_told(tmp_path, bundle_factory):
    b = tmp_path / "b"
    shutil.copytree(bundle_factory(skip=2, quant="int4"), b)
    assert open_bundle(b).path == b
    (b / "tokenizer.json").write_text((b / "tokenizer.json").read_text().replace('"<unk>"', '"<UNK>"', 1))
    with pytest.raises(EdgekitError, match=r"tokenizer\.json: sha256 differs.*--no-integrity-check"):
        open_bundle(b)
    assert open_bundle(b, check_integrity_first=False).path == b
    (b / "model.onnx").unlink()
    (b / "model.onnx").symlink_to(bundle_factory(skip=2, quant="int4") / "model.onnx")
    assert "model.onnx: a symbolic link, not a file" in check_integrity(read_bundle(b))


def test_fresh_export_manifest_passes_the_schema(bundle_factory):
    from edgekit.bundle.manifest import validate_manifest

    for kw in ({"skip": 2, "quant": "int4"}, {"skip": 0, "quant": "fp32"}):
        validate_manifest(json.loads((bundle_factory(**kw) / "edgekit.json").read_text()))


def test_tampered_bundle_runs_only_when_told(tmp_path, bundle_factory):
    b = tmp_path / "b"
    shutil.copytree(bundle_factory(skip=2, quant="int4"), b)
    (b / "generation_config.json").write_text("{}")  # harmless, but not what the manifest says
    run = [sys.executable, str(PAUSE), "run", str(b), "Once", "--max-new-tokens", "4"]
    refused = subprocess.run(run, capture_output=True, text=True, env=_env(tmp_path))
    assert refused.returncode == 1 and "does not match its manifest" in refused.stderr
    allowed = subprocess.run([*run, "--no-integrity-check"], capture_output=True, text=True, env=_env(tmp_path))
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.startswith("Once")


def test_benign_pickle_loads_with_the_flag_through_the_weights_only_loader(tmp_path, stories_path):
    import torch
    from safetensors.torch import load_file

    from edgekit.checkpoint.load import open_checkpoint

    shutil.copytree(stories_path, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(stories_path / "model.safetensors")
    torch.save(state, tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(EdgekitError, match="--allow-pickle"):
        open_checkpoint(tmp_path / "m", "m")
    ckpt = open_checkpoint(tmp_path / "m", "m", allow_pickle=True)
    name = "model.layers.0.mlp.up_proj.weight"
    assert (ckpt.weights.get(name) == state[name].numpy()).all()


def test_force_keeps_the_previous_bundle_when_the_swap_is_interrupted(tmp_path, monkeypatch):
    from edgekit.bundle.folder import bundle_writer

    target = tmp_path / "b"
    target.mkdir()
    (target / "edgekit.json").write_text("{}")
    (target / "model.onnx").write_text("old")
    real_rename = Path.rename

    def rename(self, dst):  # Ctrl-C lands between "move the old bundle aside" and "move the new one in"
        if TMP_MARK in self.name and not self.name.endswith("-old"):
            raise KeyboardInterrupt
        return real_rename(self, dst)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt), bundle_writer(target, force=True) as tmp:
        (tmp / "model.onnx").write_text("new")
    assert (target / "model.onnx").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
