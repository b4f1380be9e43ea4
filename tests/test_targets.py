"""Device targets: recipes, --recipe resolution, memory budget, standard graph, ORT format, fixed shapes,
and bundles that onnxruntime-genai loads and generates from (the same greedy tokens as edgekit's runtime)."""

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import SMALL_SHAPE, save_random_model

from edgekit.bundle.folder import open_bundle
from edgekit.checkpoint.load import ModelSpec
from edgekit.cli import main
from edgekit.errors import EdgekitError
from edgekit.export.budget import check_budget, estimate_memory
from edgekit.export.mobile import check_ort_size, fixed_greedy, graph_bytes
from edgekit.export.pipeline import ExportRequest, export
from edgekit.export.quantize import QuantConfig
from edgekit.runtime.generator import GenerationConfig, Generator
from edgekit.runtime.session import DecoderSession
from edgekit.targets.recipes import RECIPES_DIR, get_recipe, load_recipe_file, resolve_options, shipped_recipes

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [1, 403, 407, 261, 378, 308, 260, 403, 429, 414]
LLAMA2_7B = ModelSpec(32, 4096, 11008, 32, 32, 128, 32000, 4096, 1e-5, False, None, 1, (2,))


def _greedy(path: Path, prompt: list[int], steps: int) -> list[int]:
    session = DecoderSession(path)
    logits, cache = session.forward(np.asarray([prompt]))
    out = []
    for _ in range(steps):
        out.append(int(logits[0, -1].argmax()))
        logits, cache = session.forward(np.asarray([[out[-1]]]), cache)
    return out


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


# --- recipes -----------------------------------------------------------------------------------------


def test_every_shipped_recipe_validates_and_has_a_make_target():
    recipes = {r.name: r for r in shipped_recipes()}
    assert set(recipes) >= {
        "laptop-x86-avx2",
        "laptop-x86-avx512-vnni",
        "raspberry-pi-5",
        "android-arm64",
        "apple",
        "qualcomm-npu",
    }
    help_text = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for r in recipes.values():
        assert f"make {r.make_target} " in help_text, r.make_target
        assert get_recipe(r.make_target) == r
        assert r.memory_gb > r.reserved_gb and r.threads >= 1
        text = (RECIPES_DIR / f"{r.name}.yaml").read_text()
        assert "Tested on" in text and "Unverified" in text  # the comment the issue asks for
    assert recipes["raspberry-pi-5"].arch == "arm64" and recipes["raspberry-pi-5"].cores == 4
    assert recipes["raspberry-pi-5"].memory_gb == 8
    # mobile EPs run no contrib ops: those recipes must use the standard graph
    for name in ("android-arm64", "apple", "qualcomm-npu"):
        assert recipes[name].flavour == "standard"
    assert recipes["android-arm64"].emit_ort
    assert (ROOT / "recipes").resolve() == RECIPES_DIR.resolve()  # the top-level folder is the package's


GOOD = (RECIPES_DIR / "raspberry-pi-5.yaml").read_text()


@pytest.mark.parametrize(
    ("edit", "key", "why"),
    [
        (lambda t: t.replace("  quant: int4", "  quant: int4\n  qaunt: int8"), "export.qaunt", "unknown key"),
        (lambda t: t + "colour: red\n", "colour", "unknown key"),
        (lambda t: t.replace("  quant: int4", "  quant: int3"), "export.quant", "must be one of"),
        (lambda t: t.replace("  threads: 4", "  threads: four"), "runtime.threads", "whole number"),
        (lambda t: t.replace("name: raspberry-pi-5", "name: ../../etc/passwd"), "name", "no paths"),
        (lambda t: t.replace("  cores: 4\n", ""), "device.cores", "required key is missing"),
        (lambda t: t.replace("  flavour: fused", "  flavour: standard"), "export.quant", "no int4 path"),
        (lambda t: t.replace("    - name: CPUExecutionProvider", "    - name: cpu"), "runtime.providers", "provider"),
        (lambda t: t.replace("  lm_head_bits: 8", "  lm_head_bits: 8\n  kv_cache: int2"), "export.kv_cache", "one of"),
        (
            lambda t: (
                t.replace("  flavour: fused", "  flavour: standard")
                .replace("  quant: int4", "  quant: int8")
                .replace("  lm_head_bits: 8", "  lm_head_bits: 8\n  kv_cache: int8")
            ),
            "export.kv_cache",
            "no quantized KV cache",
        ),
    ],
)
def test_broken_recipe_error_names_file_and_key(tmp_path, edit, key, why):
    path = tmp_path / "board.yaml"
    path.write_text(edit(GOOD))
    with pytest.raises(EdgekitError) as err:
        load_recipe_file(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {key}:"), msg
    assert why in msg


def test_a_recipes_kv_cache_reaches_the_bundle_and_the_command_line_beats_it(tmp_path, capsys):
    path = tmp_path / "board.yaml"
    path.write_text(GOOD.replace("  lm_head_bits: 8", "  lm_head_bits: 8\n  kv_cache: int8"))
    code, out, err = _cli(capsys, "export", "stories260k", "--recipe", str(path), "-o", str(tmp_path / "a"), "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m["graph"]["kv_dtype"] == "int8" and m["memory"]["kv_cache_bytes"] == 2 * 5 * 4 * 16 * 512
    code, out, err = _cli(
        capsys,
        "export",
        "stories260k",
        "--recipe",
        str(path),
        "--kv-cache",
        "auto",
        "-o",
        str(tmp_path / "b"),
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["graph"]["kv_dtype"] == "float32"


def test_recipe_lookup_refuses_path_like_names():
    with pytest.raises(EdgekitError, match="unknown recipe"):
        get_recipe("no-such-board")
    with pytest.raises(EdgekitError, match="does not exist"):
        get_recipe("../recipes/raspberry-pi-5.yml")
    with pytest.raises(EdgekitError, match="not a plain name"):
        get_recipe("Pi5 ")


def test_resolve_options_command_line_beats_recipe_beats_default():
    pi5 = get_recipe("raspberry-pi-5")
    defaults = {
        "skip": None,
        "skip_layers": None,
        "quant": "fp32",
        "flavour": "fused",
        "block_size": 32,
        "accuracy_level": 4,
        "symmetric": False,
        "lm_head_bits": None,
    }
    o = resolve_options(pi5, {}, defaults)
    assert (o["quant"], o["symmetric"], o["lm_head_bits"], o["flavour"]) == ("int4", True, 8, "fused")
    o = resolve_options(pi5, {"quant": "int8", "symmetric": False}, defaults)
    assert (o["quant"], o["symmetric"], o["lm_head_bits"]) == ("int8", False, 8)
    assert resolve_options(None, {}, defaults) == defaults


def test_cli_recipe_with_overrides(tmp_path, capsys):
    # recipe only: int8 symmetric from laptop-x86-avx512-vnni, context clamped to the model's 512
    code, out, err = _cli(
        capsys, "export", "stories260k", "--recipe", "laptop-avx512", "-o", str(tmp_path / "a"), "--no-verify", "--json"
    )
    assert code == 0, err
    m = json.loads(out)
    assert m["quantization"]["mode"] == "int8" and m["quantization"]["symmetric"] is True
    assert m["architecture"]["max_context"] == 512 and m["skip"]["skipped"] == []
    assert m["target"]["name"] == "laptop-x86-avx512-vnni" and m["target"]["threads"] == 8
    assert m["target"]["isa_preset"]["weights"] == "int8"
    # explicit flags win over the recipe; what the user did not type still comes from it
    code, out, err = _cli(
        capsys,
        "export",
        "stories260k",
        "--recipe",
        "laptop-x86-avx512-vnni",
        "--quant",
        "int4",
        "--skip",
        "2",
        "--max-context",
        "256",
        "-o",
        str(tmp_path / "b"),
        "--no-verify",
        "--json",
    )
    assert code == 0, err
    m = json.loads(out)
    assert (m["quantization"]["mode"], m["quantization"]["symmetric"]) == ("int4", True)
    assert m["skip"]["skipped"] == [3, 4] and m["architecture"]["max_context"] == 256
    assert m["memory"]["kept_layers"] == 3 and m["memory"]["context"] == 256
    genai = json.loads((tmp_path / "b" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_hidden_layers"] == 3
    assert genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 8


# --- memory budget -----------------------------------------------------------------------------------


def test_budget_refuses_7b_fp16_on_a_pi_and_says_what_fits():
    pi5 = get_recipe("raspberry-pi-5")
    with pytest.raises(EdgekitError) as err:
        check_budget(LLAMA2_7B, 0, QuantConfig(mode="fp16"), 2048, 128, pi5.usable_memory_bytes, "raspberry-pi-5")
    msg = str(err.value)
    assert "exceeds the 6.50 GB" in msg and "what would fit" in msg
    # every suggestion really fits
    found = re.findall(r"--quant int4 --skip (\d+)", msg)
    assert found
    int4 = QuantConfig(mode="int4", lm_head_bits=8)
    assert estimate_memory(LLAMA2_7B, 32 - int(found[0]), int4, 2048, 128).total_bytes <= pi5.usable_memory_bytes
    assert estimate_memory(LLAMA2_7B, 32 - int(found[0]) + 1, int4, 2048, 128).total_bytes > pi5.usable_memory_bytes
    # int4 7B at 2048 tokens: ~4.1 GB of weights (4.6 with --int4-mix q4_k_m), and the KV cache shrinks with
    # every skipped layer
    full, skipped = (estimate_memory(LLAMA2_7B, k, int4, 2048, 128) for k in (32, 24))
    assert 3.8 < full.weights_bytes / 1024**3 < 4.4
    mixed = estimate_memory(LLAMA2_7B, 32, replace(int4, int4_mix="q4_k_m"), 2048, 128)
    assert 4.3 < mixed.weights_bytes / 1024**3 < 4.8
    assert skipped.kv_cache_bytes == full.kv_cache_bytes * 24 // 32


def test_cli_budget_refusal_is_one_line_and_writes_nothing(tmp_path, capsys):
    code, out, err = _cli(capsys, "export", "stories260k", "--device-memory", "0.05", "-o", str(tmp_path / "x"))
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "exceeds the 0.05 GB" in lines[0] and "--device-memory" in lines[0]
    assert not (tmp_path / "x").exists()


def test_ort_format_refuses_over_2gb():
    with pytest.raises(EdgekitError, match="at most 2 GB"):
        check_ort_size(2 * 1024**3 + 1, "model.onnx")


def test_a_graphs_size_counts_its_shared_data_file_once(tmp_path):
    """SmolLM2's android export was refused as "98.85 GB": the 168 MB data file was counted once per tensor."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import convert_model_to_external_data

    weights = [numpy_helper.from_array(np.full((64, 64), i, np.float32), f"w{i}") for i in range(5)]
    graph = helper.make_graph(
        [helper.make_node("Add", ["w0", "w1"], ["y"])],
        "g",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])],
        weights,
    )
    model = helper.make_model(graph)
    convert_model_to_external_data(model, location="model.onnx.data", size_threshold=0)
    onnx.save(model, tmp_path / "model.onnx")
    data = (tmp_path / "model.onnx.data").stat().st_size
    assert data >= 5 * 64 * 64 * 4
    assert graph_bytes(tmp_path / "model.onnx") == (tmp_path / "model.onnx").stat().st_size + data


# --- standard graph, ORT format, fixed shapes ---------------------------------------------------------


@pytest.fixture(scope="module")
def android_bundle(tmp_path_factory) -> Path:
    recipe = get_recipe("android-arm64")
    req = ExportRequest(
        model="stories260k",
        quant=QuantConfig(mode="int8", lm_head_bits=8),
        flavour="standard",
        recipe=recipe,
        output=tmp_path_factory.mktemp("android") / "b",
        verify=False,  # parity of the standard graph is test_standard_flavour_...; here .ort vs .onnx
    )
    return export(req).bundle


@pytest.fixture(scope="module")
def standard_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("standard") / "s"
    return export(ExportRequest(model="stories260k", skip=2, flavour="standard", output=out)).bundle


def test_standard_flavour_keeps_the_contract_and_matches_pytorch(bundle_factory, standard_bundle):
    std = standard_bundle
    m = open_bundle(std).manifest
    v = m["verification"]
    assert v["passed"] and v["max_abs_logit_diff"] <= 1e-3 * v["max_abs_logit"] and v["greedy_match"]
    assert m["graph"]["flavour"] == "standard" and m["graph"]["contrib_ops"] == []
    assert m["graph"]["head_dim"] == 8  # not padded: that is GroupQueryAttention's need only
    graph = onnx.load(str(std / "model.onnx"))
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
    fused = DecoderSession(open_bundle(bundle_factory(skip=2)).model_file).session
    std_session = DecoderSession(std / "model.onnx").session
    assert [i.name for i in std_session.get_inputs()] == [i.name for i in fused.get_inputs()]
    assert [o.name for o in std_session.get_outputs()] == [o.name for o in fused.get_outputs()]
    assert _greedy(std / "model.onnx", PROMPT, 16) == _greedy(
        open_bundle(bundle_factory(skip=2)).model_file, PROMPT, 16
    )


def test_android_bundle_ort_matches_onnx_tokens(android_bundle):
    b = open_bundle(android_bundle)  # integrity: .ort, config and fixed/ files are all in the manifest
    m = b.manifest
    assert m["graph"]["flavour"] == "standard" and m["target"]["name"] == "android-arm64"
    assert m["ort_format"]["files"]["model.onnx"] == "model.ort"
    ops = (android_bundle / "required_operators.config").read_text()
    # the graph itself is plain ONNX; the config also lists MatMulNBits because onnxruntime's saved runtime
    # optimizations fuse DequantizeLinear→MatMul into it when the CPU EP ends up running those nodes
    assert "DequantizeLinear" in ops and "MatMul" in ops
    assert {n.domain for n in onnx.load(str(android_bundle / "model.onnx")).graph.node} <= {"", "ai.onnx"}
    reference = _greedy(android_bundle / "model.onnx", PROMPT, 20)
    assert _greedy(android_bundle / "model.ort", PROMPT, 20) == reference
    # and with the saved runtime optimizations replayed (what the CPU EP does with nodes no EP claimed)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.enable_saved_runtime_optimizations", "1")
    session = DecoderSession(android_bundle / "model.ort", options=so)
    logits, cache = session.forward(np.asarray([PROMPT]))
    replayed = []
    for _ in range(20):
        replayed.append(int(logits[0, -1].argmax()))
        logits, cache = session.forward(np.asarray([[replayed[-1]]]), cache)
    assert replayed == reference


def test_edgekit_runtime_runs_standard_bundles(android_bundle):
    # the standard graph concatenates KV, so the runtime feeds past as a copy instead of sharing a buffer
    gen = Generator(android_bundle)
    assert not gen.engine.shared
    ours = gen.generate(PROMPT, GenerationConfig(max_new_tokens=16, stop_on_eos=False)).token_ids
    assert ours == _greedy(android_bundle / "model.onnx", PROMPT, 16)
    again = gen.generate(PROMPT[:3], GenerationConfig(max_new_tokens=8, stop_on_eos=False)).token_ids
    assert again == _greedy(android_bundle / "model.onnx", PROMPT[:3], 8)


def test_fixed_shape_variants_match_the_dynamic_graph(android_bundle):
    fixed = android_bundle
    pre = onnx.load(str(fixed / "fixed-prefill.onnx"), load_external_data=False)
    for vi in [*pre.graph.input, *pre.graph.output]:
        assert all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim), vi.name
    dyn = android_bundle / "model.onnx"
    assert fixed_greedy(fixed / "fixed-prefill.onnx", fixed / "fixed-decode.onnx", PROMPT, 12) == _greedy(
        dyn, PROMPT, 12
    )
    # a prompt longer than the 64-token prefill window runs in left-padded chunks
    long_prompt = (PROMPT * 9)[:83]
    assert fixed_greedy(fixed / "fixed-prefill.ort", fixed / "fixed-decode.ort", long_prompt, 8) == _greedy(
        dyn, long_prompt, 8
    )


# --- onnxruntime-genai --------------------------------------------------------------------------------


def genai_tokens(bundle: Path, prompt: list[int], new_tokens: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(bundle))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


@pytest.mark.parametrize(("skip", "quant"), [(0, "fp32"), (2, "fp32"), (2, "int4")])
def test_onnxruntime_genai_generates_edgekit_tokens(bundle_factory, skip, quant):
    bundle = bundle_factory(skip=skip, quant=quant)
    cfg = json.loads((bundle / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["num_hidden_layers"] == 5 - skip
    assert cfg["model"]["decoder"]["head_size"] == 16  # the padded head_dim the graph's KV uses
    assert cfg["search"]["past_present_share_buffer"] is True
    ours = Generator(bundle).generate(PROMPT, GenerationConfig(max_new_tokens=24)).token_ids
    theirs = genai_tokens(bundle, PROMPT, 24)
    if theirs and theirs[-1] in (2,):  # genai includes the EOS it stopped on; edgekit's runtime does not
        theirs = theirs[:-1]
    assert len(ours) >= 8 and theirs == ours


def test_onnxruntime_genai_runs_the_standard_graph(standard_bundle):
    bundle = standard_bundle
    assert json.loads((bundle / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is False
    expected = _greedy(bundle / "model.onnx", PROMPT, 24)
    theirs = genai_tokens(bundle, PROMPT, 24)
    assert theirs[: len(theirs) - (theirs[-1] == 2)] == expected[: len(theirs) - (theirs[-1] == 2)]
    assert len(theirs) >= 8


# --- estimate vs measured ------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from Linux /proc")
def test_memory_estimate_bounds_the_measured_peak(bundle_factory):
    """profile's own measurement (edgekit.runtime.profile.measure) in a fresh process; its peak is read from VmHWM,
    the new process image's high-water mark (ru_maxrss would carry this pytest process's peak across exec)."""
    bundle = bundle_factory(skip=2, quant="int4")
    est = open_bundle(bundle).manifest["memory"]
    spec = {
        "bundle": str(bundle),
        "prompt_lens": [32],
        "gen_len": 8,
        "warmup": 1,
        "provider": "cpu",
        "threads": None,
        "affinity": None,
        "spin": True,
    }
    code = (
        "import json, sys; from edgekit.runtime.profile import measure; measure(json.loads(sys.argv[1])); "
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"
    )
    r = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    peak = int(r.stdout.split()[-1]) * 1024
    # the estimate is an upper bound for the whole process: interpreter, numpy, onnxruntime, tokenizers
    assert 0 < peak <= est["total_bytes"], (peak, est)
    assert est["weights_bytes"] == pytest.approx(est["model_file_bytes"], rel=0.1)


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_standard_flavour_parity_on_random_models(kind, tmp_path):
    """Shapes stories260K lacks: 4:1 GQA, head_dim 32, q/k/v biases (Qwen2), a sliding window shorter than
    the verification sequence (Mistral, window 6: the mask's window term is exercised)."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    common = {**SMALL_SHAPE, "num_hidden_layers": 3}
    if kind == "qwen2":
        config = Qwen2Config(**common)
    else:
        config = MistralConfig(**common, sliding_window=6)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if kind == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    src = save_random_model(model, tmp_path / "src")
    req = ExportRequest(model=str(src), skip_layers="1", flavour="standard", output=tmp_path / "b")
    m = export(req).manifest
    v = m["verification"]
    assert v["passed"] and v["top1_agreement"] == 1.0 and v["greedy_match"], v
    assert v["max_abs_logit_diff"] < 1e-3 * max(v["max_abs_logit"], 0.1)
    assert m["graph"]["head_dim"] == 32 and m["graph"]["flavour"] == "standard"


def test_recipe_conflicts_are_refused_before_building(tmp_path, capsys):
    code, _, err = _cli(
        capsys,
        "export",
        "stories260k",
        "--recipe",
        "android",
        "--flavour",
        "fused",
        "-o",
        str(tmp_path / "x"),
        "--no-verify",
    )
    assert code == 1 and "need --flavour standard" in err and not (tmp_path / "x").exists()
    code, _, err = _cli(
        capsys,
        "export",
        "stories260k",
        "--flavour",
        "standard",
        "--quant",
        "int4",
        "-o",
        str(tmp_path / "y"),
        "--no-verify",
    )
    assert code == 1 and "no int4" in err and not (tmp_path / "y").exists()


def test_recipes_cli_lists_and_shows(capsys):
    code, out, err = _cli(capsys, "recipes")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == len(shipped_recipes()) and any(ln.startswith("raspberry-pi-5 ") for ln in lines)
    code, out, err = _cli(capsys, "recipes", "show", "pi5")
    assert code == 0 and "raspberry-pi-5" in out and "6.5 GB for the model" in out and "unverified" in out
    code, out, err = _cli(capsys, "recipes", "show", "pi5", "--json")
    assert code == 0 and json.loads(out)["providers"] == [{"name": "CPUExecutionProvider", "options": {}}]
    code, out, err = _cli(capsys, "recipes", "show", "no-such-board")
    assert code == 1 and err.startswith("edgekit: error: unknown recipe 'no-such-board'")


def test_a_qdq_recipe_needs_an_fp32_graph_with_fixed_shapes():
    from edgekit.targets.recipes import parse_recipe

    text = (RECIPES_DIR / "qualcomm-npu-qdq.yaml").read_text()
    assert parse_recipe(text, "ok").qdq == {"activations": "uint16", "weights": "uint8"}
    with pytest.raises(EdgekitError, match="needs fixed_shapes, quant fp32"):
        parse_recipe(text.replace("quant: fp32", "quant: fp16"), "fp16")
    with pytest.raises(EdgekitError, match="activations must be one of uint16, uint8"):
        parse_recipe(text.replace("activations: uint16", "activations: int4"), "int4")
