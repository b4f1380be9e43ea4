"""The CLI as a user meets it: real subprocesses, one-line errors, nothing left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def edgekit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cwd / "hub"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "edgekit", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


def assert_clean_failure(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgekit: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_export_inspect_models_json(tmp_path):
    r = edgekit("export", "stories260k", "--skip", "2", "--quant", "int4", "-o", "b", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["skip"]["kept"] == [0, 1, 2] and out["verification"]["ppl_onnx"] > 0
    assert out["command"].startswith("edgekit export stories260k --skip 2")
    r = edgekit("inspect", "b", cwd=tmp_path)
    assert r.returncode == 0 and "kept 0-2; removed 3-4" in r.stdout
    assert json.loads(edgekit("inspect", "b", "--json", cwd=tmp_path).stdout)["skip"]["skipped"] == [3, 4]
    models = json.loads(edgekit("models", "--json", cwd=tmp_path).stdout)
    assert {"alias": "stories260k", "status": "embedded"}.items() <= next(
        m for m in models if m["alias"] == "stories260k"
    ).items()
    # an existing bundle is not overwritten without --force
    r = edgekit("export", "stories260k", "-o", "b", "--no-verify", cwd=tmp_path)
    assert_clean_failure(r, "already exists", "--force")
    assert json.loads((tmp_path / "b" / "edgekit.json").read_text())["skip"]["kept"] == [0, 1, 2]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["export", "llama2-7b"], ["meta-llama/Llama-2-7b-hf", "not found", "--allow-download"]),
        (["export", "nope-model"], ["not a folder, not an alias"]),
        (["export", "stories260k", "--skip", "5"], ["5 layers"]),
        (["export", "stories260k", "--skip", "x"], ["whole number"]),
        (["export", "stories260k", "--skip-layers", "1,9"], ["out of range", "0-4"]),
        (["export", "stories260k", "--skip-layers", "2,2"], ["listed twice"]),
        (["export", "stories260k", "--skip-layers", "3-1"], ["backwards"]),
        (["export", "stories260k", "--skip", "1", "--skip-layers", "2"], ["not both"]),
        (["export", "stories260k", "--quant", "int3"], ["int3"]),
        (["inspect", "missing-bundle"], ["does not exist"]),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, needles):
    r = edgekit(*args, "-o", "x", cwd=tmp_path) if args[0] == "export" else edgekit(*args, cwd=tmp_path)
    assert_clean_failure(r, *needles)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hub") == []


def test_unsupported_architecture(tmp_path):
    model = tmp_path / "gpt2ish"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 8, "n_head": 2}))
    r = edgekit("export", str(model), "-o", "x", cwd=tmp_path)
    assert_clean_failure(r, "unsupported architecture 'gpt2'")
    assert not (tmp_path / "x").exists()


def test_help_has_examples(tmp_path):
    for cmd in ("export", "inspect", "models"):
        r = edgekit(cmd, "--help", cwd=tmp_path)
        assert r.returncode == 0 and "Example" in r.stdout
