"""Build every contender of bench/peers.py: the peers' virtual environments, then each model file, with the
wall time and peak RSS (whole process tree) of each toolchain. Everything is cached under
bench/work/peers/ (gitignored): a finished build leaves a `.peer.json` with its numbers and is reused.

A contender that cannot be built is kept with its error (the last lines of its log), so the report says
exactly why it is missing instead of failing the whole run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import psutil
from peak_rss import tree_rss

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "peers"
TOOLS = ROOT / "bench" / "peers_tools.py"
MAIN_PY = sys.executable  # edgekit's own environment: the one running this script
LLAMA_VERSION = "0.3.36"
# AVX-512 on, AMX off: the AMX path crashed with "Illegal instruction" on quantized models here.
LLAMA_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX2=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON "
    "-DGGML_AVX512_BF16=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
    "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
)
# torch first and pinned in every venv: the local CPU wheel, never the CUDA build an unpinned torch pulls.
VENV_PACKAGES = {
    "optimum": [["torch==2.13.0"], ["optimum-onnx[onnxruntime]==0.1.0", "transformers<4.58", "psutil", "onnx-ir"]],
    "genai": [
        ["torch==2.13.0"],
        ["onnxruntime-genai==0.18.0", "transformers>=5,<6", "onnx", "onnxruntime", "onnx-ir", "safetensors"],
    ],
    # the converter's own requirements (requirements-convert_hf_to_gguf.txt), torch at the local wheel
    "llama": [["torch==2.13.0"], ["transformers==4.57.6", "numpy>=2", "sentencepiece", "protobuf>=4.21,<5"]],
}


def venv_python(tool: str) -> Path:
    return WORK / tool / "bin" / "python"


def llama_source() -> Path:
    """The llama-cpp-python sdist, unpacked: its vendor/llama.cpp holds the GGUF converter."""
    src = WORK / "src" / f"llama_cpp_python-{LLAMA_VERSION}"
    tgz = WORK / "src" / f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"
    if not (src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        if not tgz.is_file():
            pip = [MAIN_PY, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            _run([*pip, f"llama-cpp-python=={LLAMA_VERSION}", "-d", str(tgz.parent)], WORK / "logs" / "sdist.log")
        with tarfile.open(tgz) as t:
            t.extractall(tgz.parent, filter="data")
    return src


def _run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        rc = subprocess.run(["nice", "-n", "15", *map(str, cmd)], stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} ... exited {rc.returncode}: {_tail(log)}")


def _tail(log: Path, n: int = 3) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return " | ".join(lines[-n:])


def ensure_venv(tool: str) -> None:
    """Create bench/work/peers/<tool> with its pinned packages (once; `.ready` marks it done)."""
    venv = WORK / tool
    if (venv / ".ready").is_file():
        return
    log = WORK / "logs" / f"venv-{tool}.log"
    if not venv_python(tool).is_file():
        _run([sys.base_prefix + "/bin/python3", "-m", "venv", str(venv)], log)
    pip = [str(venv_python(tool)), "-m", "pip", "install", "-q"]
    for group in VENV_PACKAGES[tool]:
        _run([*pip, *group], log)
    if tool == "llama":
        _run([*pip, str(llama_wheel())], log)
    (venv / ".ready").write_text("ok\n")


def llama_wheel() -> Path:
    """llama-cpp-python built from its PyPI sdist (~15+ minutes on 2 cores), cached as a wheel."""
    wheels = WORK / "wheels"
    found = sorted(wheels.glob(f"llama_cpp_python-{LLAMA_VERSION}-*.whl"))
    if found:
        return found[-1]
    env = {**os.environ, "CMAKE_ARGS": LLAMA_CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    tgz = llama_source().parent / f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"
    py = venv_python("llama")
    _run([py, "-m", "pip", "install", "-q", "scikit-build-core"], WORK / "logs" / "llama-wheel.log")
    _run([py, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(tgz)], WORK / "logs" / "llama-wheel.log", env)
    return sorted(wheels.glob(f"llama_cpp_python-{LLAMA_VERSION}-*.whl"))[-1]


@dataclass
class Contender:
    model: str
    name: str  # e.g. "genai int4 skip6"
    tool: str  # edgekit | optimum | genai | llama.cpp
    quant: str
    skipped: list[int]
    kind: str  # the runner in peers_child.py
    path: str
    file_name: str | None = None
    args: list[str] = field(default_factory=list)  # extra export options (edgekit)
    source: str | None = None  # what it is built from, when not the model's checkpoint folder (a GGUF)
    build: dict = field(default_factory=dict)  # export_s, export_peak_rss_bytes, file_bytes
    error: str | None = None

    @property
    def python(self) -> str:
        return MAIN_PY if self.tool == "edgekit" else str(venv_python(self.kind))

    def to_dict(self) -> dict:
        return asdict(self)


def _measured(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run a build command niced, its output to `log`; wall seconds and peak RSS of the process tree."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        t0 = time.perf_counter()
        child = subprocess.Popen(["nice", "-n", "10", *map(str, cmd)], stdout=f, stderr=subprocess.STDOUT, env=env)
        proc, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            with contextlib.suppress(psutil.Error):  # the child exited between checks
                peak = max(peak, tree_rss(proc))
            time.sleep(0.1)
    if child.returncode != 0:
        raise RuntimeError(f"exit {child.returncode}: {_tail(log)}")
    return {"export_s": round(time.perf_counter() - t0, 1), "export_peak_rss_bytes": peak}


def _file_bytes(path: Path, file_name: str | None) -> int:
    if path.is_file():
        return path.stat().st_size
    stem = file_name or "model.onnx"
    return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith(stem))


def build(c: Contender, ckpt: Path) -> Contender:
    """Build one contender (unless cached); records its error instead of raising."""
    out = Path(c.path)
    marker = (out.parent if out.suffix == ".gguf" else out) / f".peer-{out.name}.json"
    source = _edgekit_tree() if c.tool == "edgekit" else None
    if marker.is_file():
        cached = json.loads(marker.read_text())
        if cached.get("edgekit_tree") == source:  # an edgekit bundle is rebuilt when edgekit's code changed
            c.build = cached
            return c
    if c.quant == "native":  # run as shipped: nothing to build
        c.build = {"export_s": 0.0, "export_peak_rss_bytes": 0, "file_bytes": out.stat().st_size}
        return c
    log = WORK / "logs" / f"build-{c.model}-{c.name.replace(' ', '-')}.log"
    skip = ",".join(map(str, c.skipped))
    try:
        if c.tool == "edgekit":
            cmd = [MAIN_PY, "-m", "edgekit", "export", c.source or ckpt, "--quant", c.quant, "--no-verify"]
            cmd += ["-o", out, "--force"] + (["--skip-layers", skip] if skip else []) + c.args
        elif c.tool == "optimum":
            ensure_venv("optimum")
            export = out.parent / "optimum-export"
            first = _cached_step(export, c.model, "optimum", ["optimum-export", ckpt, export])
            cmd = [venv_python("optimum"), TOOLS, "optimum-quant", export, out, c.quant]
        elif c.tool == "genai":
            ensure_venv("genai")
            cmd = [venv_python("genai"), TOOLS, "genai", ckpt, out, c.quant, skip]
        elif c.source:  # a shipped GGUF, requantized by llama.cpp's own quantizer
            ensure_venv("llama")
            cmd = [venv_python("llama"), TOOLS, "gguf-quant", c.source, out, c.quant]
        else:
            ensure_venv("llama")
            f16 = out.parent / f"f16-skip{len(c.skipped)}.gguf"
            conv = llama_source() / "vendor" / "llama.cpp"
            first = _cached_step(f16, c.model, "llama", ["gguf-f16", ckpt, f16, skip, conv])
            cmd = [venv_python("llama"), TOOLS, "gguf-quant", f16, out, c.quant]
        c.build = _measured(cmd, log)
        # export/convert + quantize: one toolchain run, like the others
        if c.tool == "optimum" or (c.tool == "llama.cpp" and not c.source):
            c.build["first_step"] = first
            c.build["export_s"] += first["export_s"]
            peaks = (c.build["export_peak_rss_bytes"], first.get("export_peak_rss_bytes") or 0)
            c.build["export_peak_rss_bytes"] = max(peaks)
        c.build["file_bytes"] = _file_bytes(out, c.file_name)
        c.build["edgekit_tree"] = source
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(c.build))
    except Exception as e:  # a peer that cannot be built is reported, not fatal
        c.error = f"{type(e).__name__}: {e}"
    return c


def _edgekit_tree() -> str | None:
    """The committed edgekit/ tree's hash (None outside git): edgekit bundles built by other code are stale."""
    out = subprocess.run(["git", "rev-parse", "HEAD:edgekit"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


def _cached_step(out: Path, model: str, venv: str, args: list) -> dict:
    """A first step that two contenders share (the fp32 export both quantizations start from, the f16
    GGUF), run once; its time and peak RSS are cached beside it and added to each contender's."""
    marker = out.parent / f".peer-{out.name}.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    log = WORK / "logs" / f"build-{model}-{out.name}.log"
    stats = _measured([venv_python(venv), TOOLS, *args], log)
    marker.write_text(json.dumps(stats))
    return stats


def set_genai_threads(path: Path, threads: int) -> None:
    """genai reads its session options from genai_config.json: the same intra-op threads as everyone."""
    cfg_path = path / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads
    opts["inter_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=4))
