"""--kv-window: a sliding-window layer's KV cache holds only its window (Gemma 3's local layers), on
random Gemma 3 weights against transformers, through edgekit's two runtimes: DecoderSession (present
trimmed to the window each step) and KVEngine (window + one chunk of room, the window moved to the front
when full, prompts in chunks)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import save_random_model
from test_gemma3 import WINDOW, _config, _model, _reference_logits

from edgekit.bundle.folder import read_bundle
from edgekit.export.budget import estimate_memory
from edgekit.export.pipeline import ExportRequest, export
from edgekit.export.quantize import QuantConfig
from edgekit.runtime import kv_engine
from edgekit.runtime.kv_engine import KVEngine
from edgekit.runtime.session import DecoderSession

CONTEXT = 1024
IDS = [int(t) for t in np.random.default_rng(1).integers(3, 512, 600)]


@pytest.fixture(scope="module")
def gemma3_long(tmp_path_factory):
    return save_random_model(_model(_config(max_position_embeddings=CONTEXT)), tmp_path_factory.mktemp("g") / "src")


@pytest.fixture(scope="module")
def reference(gemma3_long):
    return {skipped: _reference_logits(gemma3_long, skipped, IDS) for skipped in ((), (1, 5))}


def _export(src, out, skipped=(), **quant):
    layers = ",".join(map(str, skipped)) or None
    q = QuantConfig(mode=quant.pop("mode", "fp32"), kv_window=True, **quant)
    return export(ExportRequest(model=str(src), quant=q, output=out, fill="zero", skip_layers=layers)).manifest


def _engine(bundle, capacity=CONTEXT) -> KVEngine:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return KVEngine(ort.InferenceSession(str(read_bundle(bundle).model_file), options), capacity)


def _engine_logits(engine, ids, prefill):
    rows = [engine.forward(ids[:prefill]).copy()]  # one row is a view of a buffer the next step reuses
    rows += [engine.forward([t]).copy() for t in ids[prefill:]]
    return np.concatenate(rows)


@pytest.mark.parametrize("skipped", [(), (1, 5)])  # one local and one global layer removed
def test_a_window_sized_cache_keeps_fp32_parity_far_past_the_window(gemma3_long, reference, tmp_path, skipped):
    out = tmp_path / "b"
    m = _export(gemma3_long, out, skipped)
    assert m["verification"]["passed"], m["verification"]
    local = [i for i in range(6) if i % 3 != 2 and i not in skipped]
    assert [s["layer"] for s in m["graph"]["kv_slots"] if "window" in s] == local
    assert m["graph"]["kv_window"] == WINDOW and "genai" not in m  # genai cannot feed window_attention_mask
    assert not (out / "genai_config.json").exists()
    want = reference[skipped]
    scale = np.abs(want).max()
    # DecoderSession: a prefill of one window, then 64 steps; its window slots never hold more than the window
    session = DecoderSession(read_bundle(out).model_file)
    got = session.cached_logits(IDS[: WINDOW + 64], WINDOW)
    assert np.abs(got - want[: WINDOW + 64]).max() < 1e-4 * scale
    _, cache = session.forward(np.asarray([IDS[:40]]))
    held = {n: t.shape[2] for n, t in cache.tensors.items()}
    assert {held[n] for n in session.window_names} == {WINDOW} and max(held.values()) == 40
    # KVEngine: a 300-token prompt (two chunks) and 300 steps: the window moves to the buffers' front twice
    engine = _engine(out)
    got = _engine_logits(engine, IDS, 300)
    assert np.abs(got - want).max() < 1e-4 * scale
    assert engine.length == 600 and WINDOW <= engine.window_length <= WINDOW + kv_engine.CAPACITY_STEP


def test_the_window_cache_shrinks_the_kv_memory_and_the_estimate_says_so(gemma3_long, tmp_path):
    _export(gemma3_long, tmp_path / "w")
    windowed = _engine(tmp_path / "w")
    full_bundle = tmp_path / "f"
    export(ExportRequest(model=str(gemma3_long), quant=QuantConfig(mode="fp32"), output=full_bundle))
    full = _engine(full_bundle)
    per_position = 2 * windowed.kv_heads * windowed.head_dim * 4
    # 2 global layers hold the context, 4 local ones the window plus one chunk
    assert full.kv_bytes == 6 * CONTEXT * per_position
    assert windowed.kv_bytes == (2 * CONTEXT + 4 * (WINDOW + kv_engine.CAPACITY_STEP)) * per_position
    spec = read_bundle(full_bundle)  # the manifest's per-token bytes count only the slots that grow
    m = read_bundle(tmp_path / "w").manifest["graph"]
    assert m["kv_bytes_per_token"] * 3 == spec.manifest["graph"]["kv_bytes_per_token"]
    from edgekit.checkpoint.load import open_checkpoint

    ckpt = open_checkpoint(gemma3_long, "g")
    kv = [estimate_memory(ckpt.spec, 6, QuantConfig(kv_window=w), CONTEXT, 32).kv_cache_bytes for w in (False, True)]
    assert kv[0] == full.kv_bytes and kv[1] == windowed.kv_bytes


def test_rewinding_a_window_cache_keeps_what_it_can_and_generation_continues_exactly(
    gemma3_long, reference, tmp_path, monkeypatch
):
    """Chat rewinds the cache to the common prefix of the next turn. A window-sized buffer holds the last
    window plus what came after its last move: a short rewind is kept, a longer one starts over (0)."""
    monkeypatch.setattr(kv_engine, "CAPACITY_STEP", 16)  # the window moves every 16 tokens
    out = tmp_path / "b"
    _export(gemma3_long, out)
    engine = _engine(out)
    engine.forward(IDS[:100], all_logits=False)
    assert engine.window_length <= WINDOW + 16
    room = engine.window_length - WINDOW
    assert engine.truncate(100 - room) == 100 - room  # still holds the window before position 100 - room
    want = reference[()]
    scale = np.abs(want).max()
    got = _engine_logits(engine, IDS[100 - room : 200], 1)
    assert np.abs(got - want[100 - room : 200]).max() < 1e-4 * scale
    assert engine.truncate(200 - engine.window_length) == 0 and engine.length == 0  # too far back: starts over
    assert np.abs(_engine_logits(engine, IDS[:120], 50) - want[:120]).max() < 1e-4 * scale


def test_an_int8_cache_can_be_window_sized_too(gemma3_long, tmp_path):
    m = _export(gemma3_long, tmp_path / "b", (4,), mode="int4", kv_cache="int8")
    v = m["verification"]
    assert m["graph"]["kv_dtype"] == "int8" and m["graph"]["kv_window"] == WINDOW
    assert abs(v["ppl_onnx"] - v["ppl_torch_fp32"]) < 0.1 * v["ppl_torch_fp32"], v
    engine = _engine(tmp_path / "b")
    engine.forward(IDS[:300], all_logits=False)
    assert engine.kv(0).dtype == np.int8 and engine.kv(0).shape[2] == engine.window_length


def test_the_cli_exports_a_window_bundle_and_chat_generates_what_the_full_cache_does(
    gemma3_long, tmp_path, capsys, monkeypatch
):
    """Through `edgekit export --kv-window` and the Generator (the chat path: sized buffers, rewinds
    between turns): greedy tokens equal to the full-cache bundle's, well past the window."""
    monkeypatch.setattr(kv_engine, "CAPACITY_STEP", 16)  # the window moves every 16 tokens
    from edgekit.cli import main
    from edgekit.runtime.chat import ChatTemplate
    from edgekit.runtime.generator import GenerationConfig, Generator

    template = ChatTemplate(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}", eos_token="</s>"
    )

    bundles = {}
    for name, flags in (("window", ["--kv-window"]), ("full", [])):
        bundles[name] = tmp_path / name
        with pytest.raises(SystemExit) as e:
            main(["export", str(gemma3_long), "--quant", "fp32", "-o", str(bundles[name]), *flags])
        assert e.value.code == 0
    assert "window-sized cache on 4 layers" in capsys.readouterr().out
    config = GenerationConfig(max_new_tokens=3 * WINDOW)
    tokens = {}
    for name, bundle in bundles.items():
        chat = Generator(bundle).chat_session(template=template)
        first = chat.reply("Once upon a time", config).token_ids
        tokens[name] = first + chat.reply("and then", config).token_ids
    assert len(tokens["full"]) > 2 * WINDOW and tokens["window"] == tokens["full"]
