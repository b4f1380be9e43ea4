"""A board's install is the runtime alone (pip install edgekit, no extra): run, chat, profile, inspect and
verify must work without torch, transformers, onnx or gguf, and the export commands say what to install.
Here the export dependencies are hidden from a fresh interpreter; the wheel itself, installed into a venv
without them, ran the same commands (docs/runtime.md)."""

from __future__ import annotations

import subprocess
import sys

HIDE_EXPORT_DEPS = """
import importlib.abc, sys
HIDDEN = {"torch", "transformers", "onnx", "onnx_ir", "gguf", "safetensors", "huggingface_hub", "matplotlib"}
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Hide())
from edgekit.cli import main
main(sys.argv[1:])
"""


def _edgekit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE_EXPORT_DEPS, *args], capture_output=True, text=True, timeout=300)


def test_the_runtime_commands_run_without_the_export_dependencies(bundle_factory):
    bundle = str(bundle_factory(skip=2, quant="int4"))
    for args in (
        ("run", bundle, "Once upon a time", "--max-new-tokens", "8"),
        ("inspect", bundle),
        ("verify", bundle),
        ("profile", bundle, "--runs", "1", "--prompt-len", "16", "--gen-len", "8"),
    ):
        r = _edgekit(*args)
        assert r.returncode == 0, (args, r.stderr)
    assert "Once upon a time" in _edgekit("run", bundle, "Once upon a time", "--max-new-tokens", "4").stdout


def test_the_export_commands_name_the_extra_they_need():
    r = _edgekit("export", "stories260k")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "edgekit export needs" in r.stderr and "pip install 'edgekit[export]'" in r.stderr
    assert "(needs " in _edgekit("--help").stdout
