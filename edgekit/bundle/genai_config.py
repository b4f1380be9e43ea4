"""`genai_config.json`: what onnxruntime-genai needs to load an edgekit bundle (its apps on Android, iOS,
Windows and Linux generate through it).

genai names the KV inputs from a layer count (`past_key_values.%d.key` for 0..num_hidden_layers-1), so a
bundle with skipped layers declares `num_hidden_layers` = the number of kept KV slots, which edgekit's
graph contract numbers contiguously; `head_size` is the graph's (padded) head_dim. The tokenizer files
genai reads (tokenizer.json, tokenizer_config.json) are already in every bundle.

`past_present_share_buffer`: the fused graph's GroupQueryAttention writes into one max-length buffer, so
genai may share past and present (true: no copy per step; tested). The standard graph concatenates past
and new keys, so its present is a new, longer tensor and sharing must be off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENAI_CONFIG = "genai_config.json"

# onnxruntime provider name → the name genai's provider_options use.
_GENAI_PROVIDERS = {
    "QNNExecutionProvider": "QNN",
    "CoreMLExecutionProvider": "CoreML",
    "XnnpackExecutionProvider": "XNNPACK",
    "NnapiExecutionProvider": "NNAPI",
    "CUDAExecutionProvider": "cuda",
    "DmlExecutionProvider": "dml",
}


def genai_config(
    *,
    num_layers_kept: int,
    kv_heads: int,
    heads: int,
    head_dim: int,
    hidden: int,
    vocab: int,
    context: int,
    bos_token_id: int | None,
    eos_token_ids: list[int],
    flavour: str,
    providers: list[dict[str, Any]] | None = None,
    threads: int | None = None,
    filename: str = "model.onnx",
) -> dict[str, Any]:
    eos: int | list[int] = eos_token_ids[0] if len(eos_token_ids) == 1 else list(eos_token_ids)
    session: dict[str, Any] = {"log_id": "onnxruntime-genai", "provider_options": []}
    for p in providers or []:
        if p["name"] in _GENAI_PROVIDERS:
            opts = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in p.get("options", {}).items()}
            session["provider_options"].append({_GENAI_PROVIDERS[p["name"]]: opts})
    if threads:
        session["intra_op_num_threads"] = threads
    return {
        "model": {
            "bos_token_id": bos_token_id,
            "context_length": context,
            "decoder": {
                "session_options": session,
                "filename": filename,
                "head_size": head_dim,
                "hidden_size": hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": num_layers_kept,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": eos_token_ids[0] if eos_token_ids else 0,
            "type": "llama",
            "vocab_size": vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": flavour == "fused",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_genai_config(folder: Path, config: dict[str, Any]) -> str:
    (folder / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return GENAI_CONFIG
