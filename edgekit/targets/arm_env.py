"""An aarch64 Python with onnxruntime, run on an x86-64 host under qemu's user-mode emulation.

No ARM board and nothing installed system-wide but Debian's `qemu-user-static`: Debian's arm64 Python
3.11 and the libraries it needs are downloaded with apt into a folder of its own (its own sources list,
state and cache: the host's dpkg is untouched) and unpacked with `dpkg -x`; PyPI's aarch64 wheels of the
host's onnxruntime, numpy and tokenizers versions go in with `pip install --target --platform`. The
result is cached in `$EDGEKIT_CACHE/arm64/<key>` (about 30 s and 260 MB the first time).

Two quirks of qemu 7.2 shape this: it shows the guest the host's x86 `/proc/cpuinfo`, on which
onnxruntime's cpuinfo library crashes at import, so every emulated core gets a root of its own whose
`/proc/cpuinfo` is in ARM's format, with the features the guest's AT_HWCAP reports (qemu's `-L` prefix
redirects only paths that exist under it); and a guest inherits the host's environment, so it is run
with a clean one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from edgekit.checkpoint.fetch import cache_dir
from edgekit.errors import EdgekitError

DEBIAN_SUITE = "bookworm"  # Python 3.11: the same minor version as the wheels' cp311 tag
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_PACKAGES = ("python3.11", "libstdc++6")  # apt resolves the rest (libc6, libssl3, zlib1g, ...)
GUEST_PYTHON = "/usr/bin/python3.11"
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
PINNED = ("onnxruntime", "numpy", "tokenizers")  # the kernels and the tokenizer, as on the host
RUNTIME_EXTRAS = ("click", "jinja2", "pyyaml", "psutil")  # what the rest of edgekit's runtime imports


@dataclass(frozen=True)
class Core:
    name: str  # qemu's -cpu name
    implementer: int  # MIDR fields, as /proc/cpuinfo shows them on the real core
    part: int
    boards: str


# The cores worth checking: which devices carry them, and so whether int8 dot products (asimddp) exist.
CORES: dict[str, Core] = {
    c.name: c
    for c in (
        Core("cortex-a53", 0x41, 0xD03, "Raspberry Pi 3, Pi Zero 2 W; no dot product"),
        Core("cortex-a72", 0x41, 0xD08, "Raspberry Pi 4, Pi 400; no dot product"),
        Core("cortex-a76", 0x41, 0xD0B, "Raspberry Pi 5; dot product"),
        Core("neoverse-n1", 0x41, 0xD0C, "AWS Graviton2, Ampere Altra; dot product"),
        Core("cortex-a57", 0x41, 0xD07, "Jetson Nano, Jetson TX2; no dot product"),
        Core("a64fx", 0x46, 0x001, "Fujitsu A64FX; SVE"),
    )
}
DEFAULT_CORES = ("cortex-a53", "cortex-a72", "cortex-a76", "neoverse-n1")

# Linux's arm64 hwcap bit names (arch/arm64/include/uapi/asm/hwcap.h), in bit order.
_HWCAP = (
    *("fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp", "cpuid"),
    *("asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512", "sve"),
    *("asimdfhm", "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg"),
)
_HWCAP2 = (
    *("dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint", "svei8mm"),
    *("svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti", "mte"),
)


@dataclass(frozen=True)
class ArmEnvironment:
    home: Path

    @property
    def root(self) -> Path:  # the Debian arm64 userland
        return self.home / "root"

    @property
    def site(self) -> Path:  # the aarch64 wheels
        return self.home / "site"


def qemu_binary() -> str:
    found = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if not found:
        raise EdgekitError(
            "emulating aarch64 needs qemu's user-mode emulator: apt-get install qemu-user-static (Debian/Ubuntu)"
        )
    return found


def pinned_versions() -> dict[str, str]:
    try:
        return {name: metadata.version(name) for name in PINNED}
    except metadata.PackageNotFoundError as e:
        raise EdgekitError(f"emulation pins the host's versions, but {e.name} is not installed here") from e


def _run(cmd: list[str], what: str, **kwargs) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise EdgekitError(f"{what} failed: {last}")


def _debian_userland(root: Path, work: Path) -> None:
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        raise EdgekitError("building the arm64 userland needs apt-get and dpkg (a Debian or Ubuntu host)")
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    if not keyring.is_file():
        raise EdgekitError(f"building the arm64 userland needs Debian's archive keyring ({keyring})")
    for sub in ("state/lists/partial", "cache/archives/partial"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    (work / "status").touch()
    (work / "sources.list").write_text(
        f"deb [arch=arm64 signed-by={keyring}] {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n", encoding="utf-8"
    )
    apt = ["apt-get", "-q", "-y"]
    for key, value in {
        "Dir::Etc::SourceList": work / "sources.list",
        "Dir::Etc::SourceParts": "/dev/null",
        "Dir::State": work / "state",
        "Dir::State::status": work / "status",  # empty: apt resolves every dependency, as on a bare system
        "Dir::Cache": work / "cache",
        "APT::Architecture": "arm64",
        "APT::Architectures::": "arm64",
        "Debug::NoLocking": "1",  # our own state folder: the host's apt lock is not ours to take
    }.items():
        apt += ["-o", f"{key}={value}"]
    _run([*apt, "update"], "apt-get update (Debian arm64 package lists)")
    _run([*apt, "install", "--download-only", "--no-install-recommends", *DEBIAN_PACKAGES], "apt-get download")
    root.mkdir(parents=True)
    for deb in sorted((work / "cache" / "archives").glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(root)], f"dpkg -x {deb.name}")


def _wheels(site: Path, versions: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(site)]
    for platform in WHEEL_PLATFORMS:
        cmd += ["--platform", platform]
    cmd += ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    cmd += [f"{name}=={version}" for name, version in versions.items()] + list(RUNTIME_EXTRAS)
    _run(cmd, "pip install of the aarch64 wheels")


def arm_environment(home: Path | None = None, say=lambda line: None) -> ArmEnvironment:
    """The cached aarch64 environment for the host's onnxruntime/numpy/tokenizers, built if missing."""
    versions = pinned_versions()
    key = hashlib.sha256(json.dumps([DEBIAN_SUITE, DEBIAN_PACKAGES, versions], sort_keys=True).encode()).hexdigest()
    env = ArmEnvironment(home or cache_dir() / "arm64" / key[:12])
    if (env.home / "ready").is_file():
        return env
    say(f"building the aarch64 environment in {env.home} (Debian {DEBIAN_SUITE} arm64 + PyPI wheels, once)")
    tmp = env.home.with_name(f"{env.home.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _debian_userland(tmp / "root", tmp / "apt")
        shutil.rmtree(tmp / "apt")
        _wheels(tmp / "site", versions)
        (tmp / "ready").write_text(json.dumps(versions), encoding="utf-8")
        try:
            tmp.rename(env.home)
        except OSError:  # another process finished first: use theirs
            if not (env.home / "ready").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return env


def core_root(env: ArmEnvironment, core: str) -> Path:
    """A root for one emulated core: the shared userland by symlinks, and its own ARM-format /proc/cpuinfo."""
    if core not in CORES:
        raise EdgekitError(f"core {core!r}: expected one of {', '.join(CORES)}")
    view = env.home / "cores" / core
    if (view / "proc" / "cpuinfo").is_file():
        return view
    (view / "proc").mkdir(parents=True, exist_ok=True)
    for entry in env.root.iterdir():
        link = view / entry.name
        if not link.exists():
            link.symlink_to(entry)
    hwcap, hwcap2 = _guest_hwcaps(view, core)
    features = [n for i, n in enumerate(_HWCAP) if hwcap >> i & 1]
    features += [n for i, n in enumerate(_HWCAP2) if hwcap2 >> i & 1]
    c = CORES[core]
    entry = (
        "BogoMIPS\t: 108.00\nFeatures\t: {f}\nCPU implementer\t: 0x{i:02x}\nCPU architecture: 8\n"
        "CPU variant\t: 0x0\nCPU part\t: 0x{p:03x}\nCPU revision\t: 0\n\n"
    ).format(f=" ".join(features), i=c.implementer, p=c.part)
    text = "".join(f"processor\t: {n}\n{entry}" for n in range(os.cpu_count() or 1))
    tmp = view / "proc" / f"cpuinfo.tmp-{os.getpid()}"
    tmp.write_text(text, encoding="ascii")
    tmp.replace(view / "proc" / "cpuinfo")
    return view


_AUXV_SCRIPT = (
    "import struct; a = dict(struct.iter_unpack('<QQ', open('/proc/self/auxv', 'rb').read()));"
    "print(a.get(16, 0), a.get(26, 0))"  # AT_HWCAP, AT_HWCAP2
)


def _guest_hwcaps(root: Path, core: str) -> tuple[int, int]:
    proc = subprocess.run(
        [qemu_binary(), "-L", str(root), str(root) + GUEST_PYTHON, "-I", "-c", _AUXV_SCRIPT],
        env=guest_env(core, []),
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode:
        raise EdgekitError(f"the emulated {core} Python did not start: {(proc.stderr or 'no output').strip()[-200:]}")
    hwcap, hwcap2 = (int(x) for x in proc.stdout.split())
    return hwcap, hwcap2


def guest_env(core: str, pythonpath: list[Path], extra: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment for a guest: the host's variables (its PYTHONPATH, LD_*) would leak in."""
    env = {
        "QEMU_CPU": core,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "HOME": os.environ.get("HOME", "/root"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    return {**env, **(extra or {})}


def guest_command(env: ArmEnvironment, core: str, args: list[str]) -> list[str]:
    root = core_root(env, core)
    return [qemu_binary(), "-L", str(root), str(root) + GUEST_PYTHON, *args]
