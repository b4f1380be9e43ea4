"""Export parity on the real stories260K model: fp32/int8/int4 × skip 0/2, KV cache exercised."""

import json

import numpy as np
import onnx
import pytest

from edgekit.bundle.folder import read_bundle
from edgekit.checkpoint.load import load_torch_model, open_checkpoint
from edgekit.errors import EdgekitError
from edgekit.export.quantize import QuantConfig
from edgekit.quality.perplexity import perplexity, split_documents
from edgekit.runtime.session import DecoderSession
from edgekit.skip.skipset import SkipSet, last_n
from edgekit.skip.surgery import apply_skip, full_logits

IDS = [1, 403, 407, 261, 378, 308, 260, 403, 429, 414, 280, 300, 365, 302]


@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("skip", [0, 2])
def test_kv_cache_decode_equals_full_forward(bundle_factory, skip, quant):
    bundle = read_bundle(bundle_factory(skip=skip, quant=quant))
    session = DecoderSession(bundle.model_file)
    assert session.kv_slots == 5 - skip
    full = session.logits(IDS)
    stepped = session.cached_logits(IDS, prefill=5)
    scale = np.abs(full).max()
    # Quantized MatMulNBits (accuracy level 4) takes a different MLAS kernel for one row (decode) than for
    # many (prefill), so their int8 rounding differs slightly; fp32 must match to float noise.
    tolerance = 1e-4 if quant == "fp32" else 2.5e-2
    assert np.abs(stepped - full).max() <= tolerance * scale
    assert (stepped.argmax(-1) == full.argmax(-1)).mean() >= (1.0 if quant == "fp32" else 0.9)


def test_dynamic_int8_runs_on_qgemm_and_stays_close(bundle_factory):
    """--int8-kernel dynamic: per-channel int8 weights, activations quantized per tensor at run time."""
    bundle = read_bundle(bundle_factory(skip=2, quant="int8", int8_kernel="dynamic"))
    ops = [n.op_type for n in onnx.load(str(bundle.model_file)).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 3 * 5 + 2 * 3 + 1  # 3 whole layers, 2 MLP-only, lm_head
    assert "MatMulNBits" not in ops and "MatMul" not in ops
    q = bundle.manifest["quantization"]
    assert q["int8_kernel"] == "dynamic" and "MatMulIntegerToFloat" in q["quantizer"]
    v = bundle.manifest["verification"]
    assert v["ppl_onnx"] <= 1.05 * v["ppl_torch_fp32"] and v["top1_agreement"] >= 0.9
    session = DecoderSession(bundle.model_file)
    full = session.logits(IDS)
    stepped = session.cached_logits(IDS, prefill=5)
    # One activation scale per tensor and call: a prompt and a single token round differently, and more
    # coarsely than MatMulNBits' per-block scales (measured: up to 9% of the logit scale, against ~1%).
    assert np.abs(stepped - full).max() <= 0.15 * np.abs(full).max()
    assert (stepped.argmax(-1) == full.argmax(-1)).mean() >= 0.9
    with pytest.raises(EdgekitError, match="needs --quant int8"):
        QuantConfig(mode="int4", int8_kernel="dynamic")


@pytest.mark.parametrize("skip", [0, 2])
def test_fp32_export_matches_pytorch(bundle_factory, stories_path, skip):
    bundle = read_bundle(bundle_factory(skip=skip, quant="fp32"))
    model = apply_skip(load_torch_model(open_checkpoint(stories_path, "s")), last_n(skip, 5))
    ref = full_logits(model, IDS).numpy()
    got = DecoderSession(bundle.model_file).cached_logits(IDS, prefill=6)
    assert np.abs(got - ref).max() < 1e-3
    v = bundle.manifest["verification"]
    assert v["passed"] and v["greedy_match"] and v["top1_agreement"] == 1.0
    assert v["max_abs_logit_diff"] < 1e-3


def test_greedy_story_reproduces_pytorch(bundle_factory, stories_path):
    from tokenizers import Tokenizer

    bundle = read_bundle(bundle_factory(skip=0, quant="fp32"))
    tok = Tokenizer.from_file(str(bundle.path / "tokenizer.json"))
    prompt = tok.encode("Once upon a time").ids
    model = load_torch_model(open_checkpoint(stories_path, "s"))
    torch_ids = list(prompt)
    for _ in range(40):
        torch_ids.append(int(full_logits(model, torch_ids)[-1].argmax()))
    session = DecoderSession(bundle.model_file)
    logits, cache = session.forward(np.asarray([prompt]))
    onnx_ids = list(prompt)
    for _ in range(40):
        onnx_ids.append(int(logits[0, -1].argmax()))
        logits, cache = session.forward(np.asarray([[onnx_ids[-1]]]), cache)
    assert onnx_ids == torch_ids
    assert "Lily" in tok.decode(onnx_ids)  # the llama2.c sample story: "...a little girl named Lily"


def test_skipped_weights_are_gone_from_the_file(bundle_factory):
    full = read_bundle(bundle_factory(skip=0, quant="fp32"))
    skipped = read_bundle(bundle_factory(skip=2, quant="fp32"))
    model = onnx.load(str(skipped.model_file))
    names = {t.name for t in model.graph.initializer}
    assert not any("layers.3/attn" in n or "layers.4/attn" in n or "layers.4/input_layernorm" in n for n in names)
    assert any("layers.4/mlp" in n for n in names) and any("layers.2/attn" in n for n in names)
    assert sum(n.op_type == "GroupQueryAttention" for n in model.graph.node) == 3
    assert [i.name for i in model.graph.input][2:] == [
        *(f"past_key_values.{j}.{k}" for j in range(3) for k in ("key", "value")),
        "logits_to_keep",
    ]
    # q/k/v/o of two layers: 2 × (64·64 + 2·32·64 + 64·64) fp32 weights fewer
    saved = full.manifest["files"]["model.onnx"]["bytes"] - skipped.manifest["files"]["model.onnx"]["bytes"]
    assert saved >= 2 * (64 * 64 * 2 + 2 * 32 * 64) * 4


def test_int4_bundle_manifest(bundle_factory):
    int4 = read_bundle(bundle_factory(skip=2, quant="int4", lm_head_bits=8))
    int8 = read_bundle(bundle_factory(skip=2, quant="int8"))
    m = int4.manifest
    assert m["skip"]["kept"] == [0, 1, 2] and m["skip"]["skipped"] == [3, 4]
    assert [s["layer"] for s in m["graph"]["kv_slots"]] == [0, 1, 2]
    # stories260K ties its embedding to lm_head: one int8 table serves both (export/tied.py)
    assert m["quantization"]["embedding"].startswith("lm_head's int8 table") and m["quantization"]["lm_head"] == "int8"
    v = m["verification"]
    assert v["ppl_onnx"] > 0 and v["ppl_torch_fp32"] > 0 and 0 < v["top1_agreement"] <= 1
    assert m["files"]["model.onnx"]["bytes"] < 0.7 * int8.manifest["files"]["model.onnx"]["bytes"]
    json.dumps(m)  # the manifest is plain JSON
    ops = {n.op_type for n in onnx.load(str(int4.model_file)).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized", "GroupQueryAttention"} <= ops and "MatMul" not in ops


def test_fp32_perplexity_close_to_pytorch_and_grows_without_attention(bundle_factory, stories_path, corpora):
    from tokenizers import Tokenizer

    text = (corpora / "tinystories-valid-subset.txt").read_text()
    tok = Tokenizer.from_file(str(stories_path / "tokenizer.json"))
    docs = [tok.encode(d).ids for d in split_documents(text, "\n")[:6]]
    session = DecoderSession(read_bundle(bundle_factory(skip=0, quant="fp32")).model_file)
    ppl_onnx = perplexity(session.logits, docs, window=256).perplexity
    ckpt = open_checkpoint(stories_path, "s")
    model = load_torch_model(ckpt)
    ppl_torch = perplexity(lambda ids: full_logits(model, ids).numpy(), docs, window=256).perplexity
    assert 3.0 < ppl_torch < 7.0
    assert abs(ppl_onnx - ppl_torch) / ppl_torch < 1e-3
    # only layer 0 keeps attention in the exported graph
    kept_one = DecoderSession(read_bundle(bundle_factory(skip=4, quant="fp32")).model_file)
    assert perplexity(kept_one.logits, docs, window=256).perplexity > 2 * ppl_torch
    none_kept = apply_skip(load_torch_model(ckpt), SkipSet(5, (0, 1, 2, 3, 4), "all"))
    assert perplexity(lambda ids: full_logits(none_kept, ids).numpy(), docs, window=256).perplexity > 150


def test_a_skipped_export_reports_perplexity_against_the_intact_model(tmp_path):
    """The guard rail: a bundle that matches its own skipped twin perfectly can still be a wrecked model, so
    the verification also scores the unskipped fp32 model on the same tokens, and the summary says so."""
    import subprocess
    import sys

    out = tmp_path / "b"
    r = subprocess.run(
        [sys.executable, "-m", "edgekit", "export", "stories260k", "--skip", "2", "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    v = json.loads((out / "edgekit.json").read_text())["verification"]
    assert v["passed"] and v["ppl_unskipped_fp32"] < v["ppl_onnx"]  # removing attention costs on stories260K
    assert abs(v["ppl_onnx"] - v["ppl_torch_fp32"]) < 1e-3 * v["ppl_onnx"]  # fp32: the same skipped model
    assert "vs intact" in r.stdout and "all attention kept" in r.stdout
    # the last-N rule costs far more than the bound on this model: warned, with the way to measure
    m = json.loads((out / "edgekit.json").read_text())
    assert "last 2 layers costs" in m["warnings"][0] and "--skip auto:2" in m["warnings"][0]
    assert r.stderr.count("edgekit: warning:") == 1


def test_no_warning_for_a_chosen_skip_set(tmp_path):
    from edgekit.export.pipeline import ExportRequest, export

    m = export(ExportRequest(model="stories260k", skip_layers="2,4", output=tmp_path / "b")).manifest
    assert m["verification"]["ppl_unskipped_fp32"] and "warnings" not in m
