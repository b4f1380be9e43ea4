"""The peers' own toolchains, each run inside its own virtual environment by bench/peers_build.py.

    optimum-export CKPT OUT          optimum-onnx export (text-generation-with-past), fp32
    optimum-quant EXPORT OUT QUANT   its quantizer: int8 = ORTQuantizer dynamic int8 (AVX-512 VNNI config,
                                     per channel); int4 = onnxruntime's MatMulNBitsQuantizer over the same
                                     export (optimum has no int4 of its own), block 32, accuracy level 4
    genai    CKPT OUT QUANT [SKIP]   onnxruntime-genai model builder, int8/int4, block 32, accuracy level 4;
                                     SKIP (e.g. 16-21) patches the builder to leave out those layers'
                                     input norm + attention, as edgekit does, and drops their KV cache
    gguf-f16 CKPT OUT [SKIP] CONV    llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist, in
                                     folder CONV) to f16; SKIP converts the model as DeciLM (Nemotron-NAS)
                                     with those layers attention-free
    gguf-quant F16 OUT QTYPE         llama_model_quantize (llama-quantize's engine) to Q8_0/Q4_0; F16 may
                                     also be a quantized GGUF (requantized, as `llama-quantize
                                     --allow-requantize` does)

Only the standard library is imported at the top: each command imports its toolchain itself.
"""

from __future__ import annotations

import json
import runpy
import shutil
import sys
from pathlib import Path


def parse_layers(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


# ---- optimum-onnx ----


def optimum_export(ckpt: str, out: str) -> None:
    """optimum-cli export onnx --task text-generation-with-past, as its Python call (fp32)."""
    from optimum.exporters.onnx import main_export

    main_export(ckpt, output=Path(out), task="text-generation-with-past", device="cpu")


def optimum_quant(export: str, out: str, quant: str) -> None:
    """Quantize an optimum export: int8 = ORTQuantizer dynamic (AVX-512 VNNI config, per channel);
    int4 = onnxruntime's MatMulNBitsQuantizer (optimum has no int4 of its own), block 32, accuracy level 4."""
    src, dst = Path(export), Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".json":  # config + generation config: ORTModelForCausalLM reads them
            shutil.copyfile(f, dst / f.name)
    if quant == "int8":
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig

        quantizer = ORTQuantizer.from_pretrained(src, file_name="model.onnx")
        qconfig = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
        quantizer.quantize(save_dir=dst, quantization_config=qconfig)  # writes model_quantized.onnx
    elif quant == "int4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load(str(src / "model.onnx"))
        q = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, accuracy_level=4)
        q.process()
        q.model.save_model_to_file(str(dst / "model_quantized.onnx"), use_external_data_format=True)
    else:
        raise SystemExit(f"unknown quant {quant}")


# ---- onnxruntime-genai model builder ----


def genai(ckpt: str, out: str, quant: str, skip: str = "") -> None:
    import importlib

    from onnxruntime_genai.models import builder

    # builder.py imports its siblings as top-level modules (`from builders import ...`): patch that copy
    base = importlib.import_module("builders.base")

    skipped = set(parse_layers(skip))
    if skipped:
        original = base.Model.make_layer

        def make_layer(self, layer_id, layer):
            if layer_id not in skipped:
                return original(self, layer_id, layer)
            # The residual stream goes straight into the post-attention SkipSimplifiedLayerNorm: its
            # (root, skip) inputs are still the previous layer's residual and MLP output.
            simple = self.layernorm_attrs["simple"]
            self.make_layernorm(
                layer_id, layer.post_attention_layernorm, skip=True, simple=simple, location="post_attention"
            )
            self.make_mlp(layer_id, self.get_mlp_module(layer_id, layer), root_input=self.layernorm_attrs["output_0"])
            self.layernorm_attrs["first_layernorm"] = False
            if layer_id == self.num_layers - 1:
                self.layernorm_attrs["last_layernorm"] = True
            return None

        base.Model.make_layer = make_layer
    cache = Path(out).with_name(Path(out).name + ".cache")
    sys.argv = [
        "builder", "-i", ckpt, "-o", out, "-p", quant, "-e", "cpu", "-c", str(cache),
        "--extra_options", "accuracy_level=4", "block_size=32",
    ]  # fmt: skip
    runpy.run_module(builder.__name__, run_name="__main__")  # its command line, with the patch in place
    shutil.rmtree(cache, ignore_errors=True)
    if skipped:
        _drop_skipped_kv(Path(out), skipped)


def _drop_skipped_kv(out: Path, skipped: set[int]) -> None:
    """Skipped layers have no KV cache: drop their (now unused) past inputs and present outputs and renumber
    the kept layers' slots contiguously, as genai numbers slots 0..num_hidden_layers-1."""
    import onnx

    path = out / "model.onnx"
    model = onnx.load(str(path))
    g = model.graph
    kept = sorted({int(i.name.split(".")[1]) for i in g.input if i.name.startswith("past_key_values.")} - skipped)
    remap = {f".{old}.": f".{new}." for new, old in enumerate(kept)}

    def dead(name: str) -> bool:
        return name.startswith(("past_key_values.", "present.")) and int(name.split(".")[1]) in skipped

    for coll in (g.input, g.output):
        keep = [v for v in coll if not dead(v.name)]
        del coll[:]
        coll.extend(keep)
    rename = {}
    for v in [*g.input, *g.output]:
        if v.name.startswith(("past_key_values.", "present.")):
            head, idx, tail = v.name.split(".", 2)
            new = f"{head}{remap['.' + idx + '.']}{tail}"
            rename[v.name], v.name = new, new
    for node in g.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    data = out / "model.onnx.data"
    data.unlink(missing_ok=True)  # onnx appends to an existing external-data file
    onnx.save(model, str(path), save_as_external_data=True, location=data.name)
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"]["num_hidden_layers"] = len(kept)
    cfg_path.write_text(json.dumps(cfg, indent=4))


# ---- llama.cpp GGUF ----


def gguf_f16(ckpt: str, out: str, skip: str = "", converter_dir: str = "") -> None:
    """Checkpoint → f16 GGUF with llama.cpp's converter (as DeciLM when layers are skipped)."""
    src = Path(ckpt)
    dst = Path(out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    stage = dst.with_name(dst.name + ".stage")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    skipped = set(parse_layers(skip))
    cfg = json.loads((src / "config.json").read_text())
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copyfile(f, stage / f.name)
    if skipped:
        _decilm_stage(src, stage, cfg, skipped)
    else:
        for f in src.glob("*.safetensors"):
            (stage / f.name).symlink_to(f.resolve())
        if (src / "model.safetensors.index.json").exists():
            shutil.copyfile(src / "model.safetensors.index.json", stage / "model.safetensors.index.json")
        (stage / "config.json").write_text(json.dumps(cfg))

    sys.path.insert(0, converter_dir)
    import convert_hf_to_gguf as conv
    from conversion import deci

    if skipped:
        inter = cfg["intermediate_size"]
        # DeciLM derives each layer's FFN width from a multiplier rounded up to 256; give the exact one.
        deci.DeciModel._ffn_mult_to_intermediate_size = staticmethod(lambda mult, n_embd: inter)
        # DeciLM reads the vocabulary as a HF Llama tokenizer; the sentencepiece path pads it to vocab_size.
        deci.DeciModel.set_vocab = lambda self: self._set_vocab_sentencepiece()
    sys.argv = ["convert_hf_to_gguf.py", str(stage), "--outtype", "f16", "--outfile", str(dst)]
    conv.main()
    shutil.rmtree(stage, ignore_errors=True)


def gguf_quant(f16: str, out: str, qtype: str) -> None:
    """f16 GGUF → Q8_0/Q4_0 with llama.cpp's own quantizer (llama_model_quantize, as llama-quantize does)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[qtype]
    params.nthread = 2
    params.allow_requantize = True  # a shipped Q4_1 file is dequantized, then quantized again
    rc = llama_cpp.llama_model_quantize(f16.encode(), out.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed: {rc}")


def _decilm_stage(src: Path, stage: Path, cfg: dict, skipped: set[int]) -> None:
    """A DeciLM (Nemotron-NAS) copy of a Llama checkpoint: skipped layers are attention-free blocks
    (n_heads_in_group None, not replaced by a linear), and their attention weights are left out."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                parts = name.split(".")
                attention = len(parts) > 3 and parts[1] == "layers" and parts[3] in ("self_attn", "input_layernorm")
                if attention and int(parts[2]) in skipped:
                    continue
                tensors[name] = sf.get_tensor(name)
    if "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # DeciLM has no tying flag
    save_file(tensors, str(stage / "model.safetensors"), metadata={"format": "pt"})
    heads = cfg["num_attention_heads"]
    group = heads // cfg.get("num_key_value_heads", heads)
    ffn_mult = 3 * cfg["intermediate_size"] / (2 * cfg["hidden_size"])
    blocks = []
    for i in range(cfg["num_hidden_layers"]):
        attn = {"n_heads_in_group": None if i in skipped else group, "no_op": i in skipped}
        attn["replace_with_linear"] = False
        blocks.append({"attention": attn, "ffn": {"ffn_mult": ffn_mult, "no_op": False}})
    deci_cfg = {**cfg, "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas"}
    deci_cfg["block_configs"] = blocks
    deci_cfg["tie_word_embeddings"] = False
    (stage / "config.json").write_text(json.dumps(deci_cfg, indent=2))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {
        "optimum-export": optimum_export,
        "optimum-quant": optimum_quant,
        "genai": genai,
        "gguf-f16": gguf_f16,
        "gguf-quant": gguf_quant,
    }[cmd](*args)
