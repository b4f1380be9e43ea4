"""The device install, proven on emulated aarch64: edgekit's wheel installed by the guest's own pip.

The host builds edgekit's wheel and lets pip collect, for aarch64 and CPython 3.11, everything that wheel
asks for (`pip download --platform manylinux_2_28_aarch64`). If the base dependencies named torch or
transformers they would be collected too; the wheelhouse is then all the guest may install from
(`--no-index`), so the guest's pip, resolving markers as an aarch64 machine, decides what a board gets.
Then the guest runs `python -m edgekit ...` from that install alone (not the checker's site folder).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from edgekit.targets.arm_env import WHEEL_PLATFORMS, ArmEnvironment, guest_command, guest_env

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "check_arm" / "device-install"


def _host(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{what} failed: {(proc.stderr.strip() or proc.stdout).splitlines()[-1]}")


def _guest(
    env: ArmEnvironment, core: str, args: list[str], path: list[Path], stdin: str = "", timeout: float = 1800
) -> dict:
    start = time.perf_counter()
    home = WORK / "home"
    proc = subprocess.run(
        guest_command(env, core, args),
        env=guest_env(core, path, {"HOME": str(home), "PIP_NO_CACHE_DIR": "1"}),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = (proc.stdout + proc.stderr).strip()
    return {"rc": proc.returncode, "tail": out[-600:], "seconds": round(time.perf_counter() - start, 1)}


def guest_install(env: ArmEnvironment, core: str, say=print) -> dict:
    shutil.rmtree(WORK, ignore_errors=True)
    wheels, prefix = WORK / "wheelhouse", WORK / "prefix"
    (WORK / "home").mkdir(parents=True)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    _host(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)], "building edgekit's wheel"
    )
    wheel = next(wheels.glob("edgekit-*.whl"))
    platform = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    target = [*platform, "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    _host([*pip, "download", "--dest", str(wheels), *target, str(wheel)], "collecting the aarch64 dependencies")
    _host([*pip, "download", "--no-deps", "--dest", str(WORK / "pip"), "pip"], "downloading pip")
    pip_wheel = next((WORK / "pip").glob("pip-*.whl"))
    collected = sorted(p.name for p in wheels.glob("*.whl"))
    say(f"device install: {len(collected)} aarch64 wheels collected for {wheel.name}; installing with the guest's pip")
    install_args = [f"{pip_wheel}/pip", "install", "--no-index", "--find-links", str(wheels)]
    installed = _guest(env, core, [*install_args, "--target", str(prefix), "edgekit"], [])
    if installed["rc"]:
        raise SystemExit(f"the guest's pip install failed: {installed['tail']}")
    probe = (
        "import importlib.util as u; print(*(u.find_spec(m) is not None for m in ('torch', 'transformers', 'onnx')))"
    )
    found = _guest(env, core, ["-c", probe], [prefix])
    torch, transformers, onnx = (word == "True" for word in found["tail"].split()[-3:])
    size = sum(f.stat().st_size for f in prefix.rglob("*") if f.is_file())
    return {
        "core": core,
        "wheel": wheel.name,
        "wheels": collected,
        "install_seconds": installed["seconds"],
        "prefix_mb": round(size / 2**20, 1),
        "torch_importable": torch or transformers,
        "onnx_importable": onnx,
        "prefix": str(prefix),
        "summary": (
            f"{len(collected)} wheels, {size / 2**20:.0f} MB installed by the guest's pip in "
            f"{installed['seconds']:.0f} s on {core}; torch {'PRESENT' if torch else 'absent'}, transformers "
            f"{'PRESENT' if transformers else 'absent'}, onnx {'present' if onnx else 'absent'}"
        ),
    }


def guest_edgekit(env: ArmEnvironment, install: dict, core: str, args: list[str], stdin: str = "") -> dict:
    return _guest(env, core, ["-m", "edgekit", *args], [Path(install["prefix"])], stdin)
