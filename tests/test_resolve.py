import shutil
from pathlib import Path

import pytest

from edgekit.checkpoint.resolve import resolve_model
from edgekit.errors import EdgekitError


def test_embedded_alias(stories_path):
    r = resolve_model("stories260k")
    assert r.how == "embedded" and r.path == stories_path and (r.path / "model.safetensors").is_file()
    assert resolve_model("Stories260K").path == stories_path  # aliases are case-insensitive


def test_local_folder(stories_path, tmp_path):
    local = tmp_path / "my-llama"
    shutil.copytree(stories_path, local)
    r = resolve_model(str(local))
    assert r.how == "local" and r.path == local.resolve()


def _fake_cache(cache: Path, hub_id: str, src: Path) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/...}."""
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    rev = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    snap = repo / "snapshots" / rev
    shutil.copytree(src, snap)
    return snap


def test_hub_id_and_alias_found_in_hf_cache(stories_path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = _fake_cache(tmp_path / "hub", "someone/tiny-llama", stories_path)
    r = resolve_model("someone/tiny-llama")
    assert r.how == "hf-cache" and r.path == snap and r.source_id == "someone/tiny-llama"
    snap7b = _fake_cache(tmp_path / "hub", "meta-llama/Llama-2-7b-hf", stories_path)
    r = resolve_model("llama2-7b")
    assert r.path == snap7b and r.source_id == "meta-llama/Llama-2-7b-hf"


def test_missing_model_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(EdgekitError) as e:
        resolve_model("llama2-7b")
    msg = str(e.value)
    assert "meta-llama/Llama-2-7b-hf" in msg and str(tmp_path / "empty-hub") in msg and "--allow-download" in msg
    assert "\n" not in msg
    with pytest.raises(EdgekitError, match="not a folder, not an alias"):
        resolve_model("no-such-model")


def test_a_file_is_taken_for_a_gguf_and_refused_when_it_is_not_one(tmp_path):
    from edgekit.checkpoint.load import open_checkpoint

    f = tmp_path / "weights.onnx"
    f.write_text("x")
    r = resolve_model(str(f))
    assert r.how == "local-gguf" and r.path == f.resolve()
    with pytest.raises(EdgekitError, match=r"weights\.onnx is not a GGUF file \(bad magic"):
        open_checkpoint(r.path, r.source_id)
