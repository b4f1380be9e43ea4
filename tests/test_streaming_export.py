"""The 7B path on a model small enough to check exhaustively.

1. The streaming export (one weight at a time from safetensors, quantized as emitted) writes the same
   bundle as the in-memory way: the whole fp32 graph quantized afterwards by onnxruntime's
   MatMulNBitsQuantizer. Same initializer bytes, same logits.
2. The streaming PyTorch reference (one layer in memory at a time) computes what the full model does,
   and the streaming verification reports what the full verification reports.
3. The memory plan refuses budgets that cannot hold one layer, and picks the streaming check for a
   7B model under 8 GB.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import SMALL_SHAPE, save_random_model
from onnx import numpy_helper

from edgekit.checkpoint.load import ModelSpec, load_torch_model, open_checkpoint
from edgekit.errors import EdgekitError
from edgekit.export.graph import build_decoder
from edgekit.export.memory import GIB, parse_size, plan_export_memory
from edgekit.export.pipeline import ExportRequest, export
from edgekit.export.quantize import QuantConfig
from edgekit.export.verify import verify
from edgekit.export.verify_streaming import verify_streaming
from edgekit.runtime.session import DecoderSession
from edgekit.skip.skipset import SkipSet, last_n
from edgekit.skip.streaming import StreamingModel
from edgekit.skip.surgery import apply_skip, full_logits

PROMPT = [1, 403, 17, 250, 99, 3, 77, 412, 5, 8, 300]


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory, stories_path):
    """A random untied Llama saved as fp16 safetensors, as 7B checkpoints ship."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("small-llama")
    config = LlamaConfig(**{**SMALL_SHAPE, "intermediate_size": 352, "num_key_value_heads": 4, "head_dim": 32})
    torch.manual_seed(0)
    return save_random_model(AutoModelForCausalLM.from_config(config).half(), folder)


def _in_memory_bundle(ckpt, skip: SkipSet, quant: QuantConfig, folder):
    """The non-streaming way: the fp32 graph first, then MatMulNBitsQuantizer over the whole model."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    folder.mkdir()
    build_decoder(ckpt, skip, QuantConfig(mode="fp32"), folder / "fp32.onnx", 256)
    model = onnx.load(folder / "fp32.onnx")
    q = MatMulNBitsQuantizer(
        model,
        bits=quant.bits,
        block_size=quant.block_size,
        is_symmetric=quant.symmetric,
        accuracy_level=quant.accuracy_level,
        op_types_to_quantize=("MatMul", "Gather") if quant.embedding_quantized else ("MatMul",),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    q.process()
    onnx.save_model(q.model.model, folder / "model.onnx")
    return folder / "model.onnx"


def _initializers(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t, base_dir=str(path.parent)) for t in onnx.load(path).graph.initializer}


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_streaming_bundle_matches_in_memory_quantization(small_llama, tmp_path, mode):
    # every MatMul at the same bits, as one quantizer pass produces
    quant = QuantConfig(mode=mode, int4_algo="rtn", int4_mix="none")
    streamed = export(
        ExportRequest(
            model=str(small_llama),
            skip=1,
            fill="zero",  # the reference below is built without a fill
            quant=quant,
            output=tmp_path / "streamed",
            max_context=256,
            verify=False,
        )
    ).bundle
    ckpt = open_checkpoint(small_llama, "small")
    reference = _in_memory_bundle(ckpt, last_n(1, 4), quant, tmp_path / "in-memory")

    ours, theirs = _initializers(streamed / "model.onnx"), _initializers(reference)
    assert set(ours) == set(theirs)
    assert any(name.endswith(f"_Q{quant.bits}") for name in ours)
    for name, array in ours.items():
        assert array.dtype == theirs[name].dtype and np.array_equal(array, theirs[name]), name
    assert sum(a.nbytes for a in ours.values()) == sum(a.nbytes for a in theirs.values())

    ids = np.asarray([PROMPT])
    a_logits, a_cache = DecoderSession(streamed / "model.onnx").forward(ids)
    b_logits, b_cache = DecoderSession(reference).forward(ids)
    np.testing.assert_array_equal(a_logits, b_logits)
    for name, t in a_cache.tensors.items():
        np.testing.assert_array_equal(t, b_cache.tensors[name])


def test_streaming_reference_equals_full_model(small_llama):
    ckpt = open_checkpoint(small_llama, "small")
    skip = last_n(2, 4)
    full = apply_skip(load_torch_model(ckpt), skip)
    stream = StreamingModel(ckpt, skip)
    sequences = [PROMPT, PROMPT[:4], list(range(1, 40))]
    # One sequence alone runs exactly the full model's computation.
    np.testing.assert_array_equal(stream.logits([PROMPT])[0], full_logits(full, PROMPT).numpy())
    # A padded batch (one pass over the weights for all of them) agrees to float rounding.
    for seq, got in zip(sequences, stream.logits(sequences), strict=True):
        np.testing.assert_allclose(got, full_logits(full, seq).numpy(), rtol=0, atol=1e-5)
    # Weights are loaded per module and released: never more than one layer's (or the lm_head's) at once.
    layer = 4 * sum(p.numel() for p in full.model.layers[0].parameters())  # layer 0 keeps attention
    assert stream.loaded_bytes == max(layer, 4 * 512 * 128)
    assert all(p.is_meta for p in stream.model.parameters())


def test_streaming_verification_agrees_with_full(small_llama, tmp_path):
    """With the default mean fill: the streamed reference applies it exactly as the loaded one does."""
    from tokenizers import Tokenizer

    from edgekit.quality.choose import select_skip

    ckpt = open_checkpoint(small_llama, "small")
    skip = select_skip(ckpt, 1, None)
    assert skip.fill is not None and skip.fill.kind == "mean"
    tok = Tokenizer.from_file(str(small_llama / "tokenizer.json"))
    encode = lambda s: tok.encode(s).ids  # noqa: E731
    bundle = export(
        ExportRequest(
            model=str(small_llama), skip=1, output=tmp_path / "fp32", max_context=256, verify_method="streaming"
        )
    )
    assert bundle.manifest["verification"]["method"] == "streaming"
    assert bundle.manifest["export_memory"]["verify_method"] == "streaming"
    model_path = bundle.bundle / "model.onnx"
    full = verify(model_path, apply_skip(load_torch_model(ckpt), skip), encode, "fp32", None, context=256)
    stream = verify_streaming(model_path, ckpt, skip, encode, "fp32", None, context=256)
    assert full.passed and stream.passed and full.method == "full" and stream.method == "streaming"
    assert stream.greedy_tokens_onnx == full.greedy_tokens_onnx
    assert stream.greedy_tokens_torch == full.greedy_tokens_torch and stream.greedy_match == full.greedy_match
    assert stream.top1_agreement == full.top1_agreement == 1.0
    assert abs(stream.max_abs_logit_diff - full.max_abs_logit_diff) < 1e-5
    assert stream.max_abs_logit == pytest.approx(full.max_abs_logit, rel=1e-6)

    # Perplexity: the same documents give the same PyTorch figure whichever reference scored them.
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a cat. It liked to play in the sun with its friend the dog.")
    full_q = verify(model_path, apply_skip(load_torch_model(ckpt), skip), encode, "int4", text, context=16)
    stream_q = verify_streaming(model_path, ckpt, skip, encode, "int4", text, context=16, ppl_token_budget=10_000)
    assert stream_q.ppl_tokens == full_q.ppl_tokens
    assert stream_q.ppl_torch_fp32 == pytest.approx(full_q.ppl_torch_fp32, rel=1e-5)
    assert stream_q.ppl_onnx == pytest.approx(full_q.ppl_onnx, rel=1e-6)


LLAMA2_7B = ModelSpec(32, 4096, 11008, 32, 32, 128, 32000, 4096, 1e-5, False, None, 1, (2,))


def test_memory_plan_for_7b():
    skip, quant = last_n(8, 32), QuantConfig(mode="int4", lm_head_bits=8)
    weights = 4 * GIB
    plan = plan_export_memory(LLAMA2_7B, skip, quant, weights, parse_size("8GB"), verify=True)
    assert plan.verify_method == "streaming" and plan.build_bytes < 8 * GIB
    assert plan.full_verify_bytes > 24 * GIB  # the fp32 model alone is 27 GB
    big = plan_export_memory(LLAMA2_7B, skip, quant, weights, parse_size("64GiB"), verify=True)
    assert big.verify_method == "full"
    with pytest.raises(EdgekitError, match="one layer's working set"):
        plan_export_memory(LLAMA2_7B, skip, quant, weights, parse_size("2GB"), verify=False)
    with pytest.raises(EdgekitError, match="full verification"):
        plan_export_memory(LLAMA2_7B, skip, quant, weights, parse_size("8GB"), verify=True, method="full")
    assert parse_size("6000MB") == 6000 * 1024**2 and parse_size("7.5GiB") == int(7.5 * GIB)
    with pytest.raises(EdgekitError, match="expected a size"):
        parse_size("eight")


def test_max_memory_refused_before_writing(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(EdgekitError, match="cannot hold even one layer"):
        export(ExportRequest(model="stories260k", output=out, max_memory=parse_size("200MB")))
    assert not out.exists()
