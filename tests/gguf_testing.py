"""Test helper: write small random GGUF checkpoints the way llama.cpp's convert_hf_to_gguf.py would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# A few merges over the byte-level alphabet ("Ġ" is the byte-level spelling of a space).
MERGES = ["H i", "Ġ t", "h e", "Ġt he", "l l", "o r"]


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> GGML interleaved rows."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def random_kquant(rows: int, cols: int, qt: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q6_K blocks (gguf.quants dequantizes these but cannot quantize them): random quants
    and sub-scales, with the fp16 super-block scales set to small finite values so no block is inf/NaN."""
    block, size = GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    # weights of about ±0.05, like the other writers': |w| <= d·63·15 (Q4_K), d·32·32 (Q6_K)
    scale = (rng.uniform(0.5, 1.0, (rows, cols // block, 1)) * 5e-5).astype(np.float16).view(np.uint8)
    if qt == GGMLQuantizationType.Q4_K:  # d, dmin, scales[12], qs[128]
        raw[..., 0:2] = scale
        raw[..., 2:4] = (scale.view(np.float16) * 0.5).view(np.uint8)
    elif qt == GGMLQuantizationType.Q6_K:  # ql[128], qh[64], scales[16] (int8), d
        raw[..., 192:208] = rng.integers(-32, 32, (rows, cols // block, 16)).astype(np.int8).view(np.uint8)
        raw[..., 208:210] = scale
    else:
        raise ValueError(f"no random writer for {qt.name}")
    return raw.reshape(rows, -1)


KQUANTS = (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K)

# HF names of the norms a gemma3 GGUF holds (beyond attn_norm and output_norm), by GGUF name
GEMMA3_NORMS = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def _byte_level_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def tokenizer_tokens() -> list[str]:
    tokens = SPECIAL_TOKENS + _byte_level_alphabet()
    tokens += ["".join(m.split(" ")) for m in MERGES]
    return tokens


def write_random_gguf(
    path: Path,
    *,
    arch: str = "llama",
    n_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab_size: int | None = None,
    qtype: str = "F32",
    embed_qtype: str | None = None,
    tie_embeddings: bool = True,
    tokenizer: bool = True,
    context_length: int = 256,
    rope_theta: float = 10000.0,
    rms_eps: float = 1e-5,
    seed: int = 0,
    extra_tensors: dict[str, np.ndarray] | None = None,
    layer_qtypes: dict[str, str] | None = None,
    sliding_window: int = 4,
) -> dict[str, np.ndarray]:
    """Write a random llama/qwen2/qwen3/gemma3-shaped GGUF and return its weights by HF name, in HF layout.

    `qtype` (F32, F16, a type gguf.quants quantizes: Q8_0, Q4_0, Q4_1, Q5_0, or Q4_K/Q6_K, written as random
    blocks since gguf.quants cannot quantize those) applies to the 2-D matrices, `embed_qtype` (default:
    qtype) to the token embedding, as SmolLM2's Q4_1 file keeps it Q8_0, and `layer_qtypes` (GGUF short name
    such as "attn_v" -> type) to one kind of layer matrix, as Q4_K_M files mix Q4_K, Q5_0 and Q6_K. Norms
    and biases stay F32 as in llama.cpp; gemma3 norms are stored as 1 + w, as convert_hf_to_gguf.py does.
    The returned arrays are what a correct reader must produce: for quantized types they are already
    round-tripped through the quantizer, so comparisons can be exact. Q/K rows are permuted for the llama
    arch exactly as llama.cpp does, so a reader's un-permute is tested.
    With `tokenizer=True` a tiny byte-level BPE vocabulary with ChatML specials is embedded and the
    vocab size is the token count (unless given).
    """
    rng = np.random.default_rng(seed)
    tokens = tokenizer_tokens() if tokenizer else None
    if vocab_size is None:
        vocab_size = len(tokens) if tokens else 128
    head_dim = hidden // heads
    qt = GGMLQuantizationType[qtype]

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    writer = GGUFWriter(str(path), arch)
    writer.add_name("random-test-model")
    writer.add_block_count(n_layers)
    writer.add_context_length(context_length)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(rms_eps)
    writer.add_rope_freq_base(rope_theta)
    writer.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(sliding_window)
    writer.add_vocab_size(vocab_size)
    writer.add_file_type({"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q4_K": 15}.get(qtype, 7))
    if tokens is not None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS)))
        writer.add_token_merges(MERGES)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_chat_template(CHATML_TEMPLATE)

    expected: dict[str, np.ndarray] = {}

    def put(gguf_name: str, hf_name: str, value: np.ndarray, *, permute_heads: int | None = None, qt=qt) -> None:
        short = gguf_name.split(".")[-2]
        if layer_qtypes and short in layer_qtypes:
            qt = GGMLQuantizationType[layer_qtypes[short]]
        stored = value
        if value.ndim == 2 and qt in KQUANTS:
            stored = random_kquant(*value.shape, qt, rng)
            value = dequantize(stored, qt).astype(np.float32).reshape(value.shape)
        elif value.ndim == 2 and qt != GGMLQuantizationType.F32:
            # Quantize in HF row order, then dequantize: the permutation moves whole rows and blocks never
            # cross rows, so this is also exactly what the reader must return after un-permuting.
            raw = quantize(value, qt)
            value = dequantize(raw, qt).astype(np.float32).reshape(value.shape)
            stored = raw
        if permute_heads is not None and arch == "llama":
            stored = llama_cpp_permute(stored, permute_heads)
        if stored.dtype == np.uint8:
            writer.add_tensor(gguf_name, np.ascontiguousarray(stored), raw_dtype=qt)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(stored))
        if arch == "gemma3" and gguf_name.endswith("norm.weight"):
            value = value - np.float32(1.0)  # what the GGUF means in HF terms
        expected[hf_name] = value

    embed_qt = GGMLQuantizationType[embed_qtype] if embed_qtype else qt
    put("token_embd.weight", "model.embed_tokens.weight", mat(vocab_size, hidden), qt=embed_qt)
    for i in range(n_layers):
        hf = f"model.layers.{i}"
        put(f"blk.{i}.attn_norm.weight", f"{hf}.input_layernorm.weight", norm(hidden))
        put(
            f"blk.{i}.attn_q.weight",
            f"{hf}.self_attn.q_proj.weight",
            mat(heads * head_dim, hidden),
            permute_heads=heads,
        )
        put(
            f"blk.{i}.attn_k.weight",
            f"{hf}.self_attn.k_proj.weight",
            mat(kv_heads * head_dim, hidden),
            permute_heads=kv_heads,
        )
        put(f"blk.{i}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", mat(kv_heads * head_dim, hidden))
        if arch == "qwen2":
            put(f"blk.{i}.attn_q.bias", f"{hf}.self_attn.q_proj.bias", norm(heads * head_dim) - 1.0)
            put(f"blk.{i}.attn_k.bias", f"{hf}.self_attn.k_proj.bias", norm(kv_heads * head_dim) - 1.0)
            put(f"blk.{i}.attn_v.bias", f"{hf}.self_attn.v_proj.bias", norm(kv_heads * head_dim) - 1.0)
        if arch in ("qwen3", "gemma3"):
            put(f"blk.{i}.attn_q_norm.weight", f"{hf}.self_attn.q_norm.weight", norm(head_dim) + 0.3 * norm(head_dim))
            put(f"blk.{i}.attn_k_norm.weight", f"{hf}.self_attn.k_norm.weight", norm(head_dim) - 0.3 * norm(head_dim))
        put(f"blk.{i}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", mat(hidden, heads * head_dim))
        if arch == "gemma3":
            for gguf_norm, hf_norm in GEMMA3_NORMS.items():
                put(f"blk.{i}.{gguf_norm}.weight", f"{hf}.{hf_norm}.weight", norm(hidden))
        else:
            put(f"blk.{i}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", norm(hidden))
        put(f"blk.{i}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", mat(intermediate, hidden))
        put(f"blk.{i}.ffn_up.weight", f"{hf}.mlp.up_proj.weight", mat(intermediate, hidden))
        put(f"blk.{i}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", mat(hidden, intermediate))
    put("output_norm.weight", "model.norm.weight", norm(hidden))
    if not tie_embeddings:
        put("output.weight", "lm_head.weight", mat(vocab_size, hidden))
    for name, value in (extra_tensors or {}).items():
        writer.add_tensor(name, value)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected
