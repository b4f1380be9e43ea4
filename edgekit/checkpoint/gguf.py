"""Read a llama.cpp GGUF file as a Hugging Face-style checkpoint: a config.json dict plus weights by HF name.

The file is parsed with llama.cpp's own reader (`gguf.GGUFReader`, a memory map) and each tensor is
dequantized only when asked for, so converting a model never holds more than one float32 tensor at a time.
"""

from __future__ import annotations

import contextlib
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from edgekit.checkpoint.gguf_arch import ARCHITECTURES as _ARCHITECTURES
from edgekit.errors import EdgekitError

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")

# Rows dequantized per step; bounds the temporaries gguf.quants allocates (several x the chunk) so the
# peak stays near one float32 output tensor even for a large token embedding.
_DEQUANT_CHUNK_ROWS = 2048


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class GGUFWeights:
    """HF-named, lazily dequantized view of a GGUF's tensors (HF/PyTorch shapes, e.g. q_proj is (out, in))."""

    def __init__(
        self,
        reader: GGUFReader,
        tensors: dict[str, ReaderTensor],
        *,
        num_heads: int,
        num_kv_heads: int,
        permuted_qk: bool,
        norm_shift: float = 0.0,
    ) -> None:
        self._reader = reader
        self._norm_shift = np.float32(norm_shift)
        self._tensors = tensors
        self._heads = {"self_attn.q_proj.": num_heads, "self_attn.k_proj.": num_kv_heads}
        self._permuted_qk = permuted_qk

    def __contains__(self, hf_name: object) -> bool:
        return hf_name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, hf_name: str) -> tuple[int, ...]:
        # GGUF stores dims fastest-first (ne[0] = input features); PyTorch order is the reverse.
        return tuple(int(d) for d in reversed(self._tensor(hf_name).shape.tolist()))

    def type_name(self, hf_name: str) -> str:
        return self._tensor(hf_name).tensor_type.name

    def get(self, hf_name: str) -> np.ndarray:
        """Dequantize one tensor to a fresh float32 array in HF layout (Q/K rows un-permuted)."""
        tensor = self._tensor(hf_name)
        shape = self.shape(hf_name)
        data = tensor.data
        out = np.empty(shape, dtype=np.float32)
        if data.ndim >= 2:
            flat_out = out.reshape(-1, shape[-1])
            flat_in = data.reshape(-1, data.shape[-1])
            for start in range(0, flat_in.shape[0], _DEQUANT_CHUNK_ROWS):
                stop = start + _DEQUANT_CHUNK_ROWS
                flat_out[start:stop] = dequantize(flat_in[start:stop], tensor.tensor_type)
        else:
            out[...] = dequantize(data, tensor.tensor_type).reshape(shape)
        self._release_pages(tensor)
        if self._norm_shift and hf_name.endswith("norm.weight"):
            out -= self._norm_shift
        return self._unpermute(hf_name, out)

    def raw(self, hf_name: str) -> tuple[str, np.ndarray, tuple[int, ...]]:
        """The GGUF's own storage for a tensor: (type name, array, HF shape).

        For block-quantized types the array is uint8 with one row of blocks per output row
        (shape (out, bytes_per_row)); for F32/F16 it is the typed values. Q/K rows are put back in HF
        order: llama.cpp's permutation moves whole rows and blocks never cross rows, so this is exact.
        The array is a read-only view into the memory map unless rows had to be reordered.
        """
        tensor = self._tensor(hf_name)
        return tensor.tensor_type.name, self._unpermute(hf_name, tensor.data), self.shape(hf_name)

    def _tensor(self, hf_name: str) -> ReaderTensor:
        try:
            return self._tensors[hf_name]
        except KeyError:
            raise EdgekitError(f"GGUF checkpoint has no tensor {hf_name!r}") from None

    def _unpermute(self, hf_name: str, rows: np.ndarray) -> np.ndarray:
        if not self._permuted_qk:
            return rows
        n_head = next((n for key, n in self._heads.items() if key in hf_name), None)
        if n_head is None:
            return rows
        # Inverse of convert_hf_to_gguf.py's permute(): (head, 2, half, ...) -> (head, half, 2, ...).
        half = rows.shape[0] // n_head // 2
        return rows.reshape(n_head, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)

    def _release_pages(self, tensor: ReaderTensor) -> None:
        # Touched pages of the file mapping count towards RSS (and a container's memory limit) until the
        # kernel reclaims them; dropping them after use keeps a multi-GB GGUF from looking resident. The
        # mapping is read-only and file-backed, so a later access simply faults the pages back in.
        mm = getattr(self._reader.data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        length = tensor.data_offset + tensor.n_bytes - start
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_DONTNEED, start, length)


@dataclass
class GGUFModel:
    config: dict[str, Any]
    architecture: str
    weights: GGUFWeights
    tensor_types: dict[str, str]
    metadata_summary: dict[str, Any] = field(default_factory=dict)


def open_reader(path: Path) -> GGUFReader:
    """Open a GGUF, turning every way a bad file can fail inside gguf-py into one EdgekitError line."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise EdgekitError(f"cannot read {path}: {exc.strerror or one_line(exc)}") from None
    if magic != b"GGUF":
        raise EdgekitError(f"{path.name} is not a GGUF file (bad magic {magic!r})")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf-py reports truncation as assorted ValueError/IndexError/struct errors
        raise EdgekitError(
            f"{path.name} is truncated or corrupt ({size} bytes; gguf reader: {one_line(exc)})"
        ) from None
    # GGUFReader slices a memory map, so a tensor running past EOF could come back short instead of
    # failing; check every extent against the real size now rather than crash on first use.
    for tensor in reader.tensors:
        end = tensor.data_offset + tensor.n_bytes
        if end > size or tensor.data.nbytes != tensor.n_bytes:
            raise EdgekitError(
                f"{path.name} is truncated: tensor {tensor.name} ends at byte {end} but the file has {size}"
            )
    return reader


def metadata_field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as exc:
        raise EdgekitError(f"GGUF metadata {key!r} is unreadable: {one_line(exc)}") from None


def _required(reader: GGUFReader, key: str) -> Any:
    value = metadata_field(reader, key)
    if value is None:
        raise EdgekitError(f"GGUF metadata is missing {key!r}")
    return value


def _f32(value: Any) -> float:
    # GGUF stores these as float32; widening 1e-5 gives 9.999999747378752e-06. The shortest float32
    # repr restores the value the original config.json held.
    return float(str(np.float32(value)))


def _can_dequantize(tensor: ReaderTensor) -> bool:
    # Probe with one row: the public dequantize() is the authority on what gguf.quants supports
    # (integer and F64 tensors, and newer quant types without a numpy kernel, raise NotImplementedError).
    data = tensor.data
    probe = data.reshape(-1, data.shape[-1])[:1] if data.ndim else data
    try:
        dequantize(probe, tensor.tensor_type)
    except NotImplementedError:
        return False
    return True


def _rope_parameters(reader: GGUFReader, arch: str, theta: float) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling = metadata_field(reader, f"{arch}.rope.scaling.type", "none")
    factor = metadata_field(reader, f"{arch}.rope.scaling.factor")
    if scaling == "none" or (factor is not None and float(factor) == 1.0):
        return params
    if scaling == "linear":
        return {"rope_type": "linear", "rope_theta": theta, "factor": _f32(factor)}
    if scaling == "yarn":
        original = _required(reader, f"{arch}.rope.scaling.original_context_length")
        return {
            "rope_type": "yarn",
            "rope_theta": theta,
            "factor": _f32(factor),
            "original_max_position_embeddings": int(original),
        }
    raise EdgekitError(f"GGUF rope scaling {scaling!r} is not supported (edgekit reads none, linear, yarn)")


def _build_config(
    reader: GGUFReader, arch: str, tensors: dict[str, ReaderTensor], weights: GGUFWeights
) -> dict[str, Any]:
    spec = _ARCHITECTURES[arch]
    hf_arch, model_type = spec.hf_architecture, spec.model_type
    hidden = int(_required(reader, f"{arch}.embedding_length"))
    heads = int(_required(reader, f"{arch}.attention.head_count"))
    kv_heads = int(metadata_field(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(metadata_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = metadata_field(reader, f"{arch}.rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise EdgekitError(
            f"GGUF partial rotary embedding (rope dim {rope_dim} of head dim {head_dim}) is not supported"
        )
    theta = _f32(metadata_field(reader, f"{arch}.rope.freq_base", 10000.0))
    # The embedding matrix is the ground truth for vocab size: the metadata key is optional and the
    # token list can be padded differently.
    vocab_size = weights.shape("model.embed_tokens.weight")[0]
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_required(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_required(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": int(_required(reader, f"{arch}.context_length")),
        "rms_norm_eps": _f32(_required(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        # transformers 5 keeps rope_theta only inside rope_parameters; a top-level rope_theta is dropped
        # by LlamaConfig, so emitting it would not round-trip.
        "rope_parameters": _rope_parameters(reader, arch, theta),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        # transformers 5 renamed torch_dtype to dtype (to_dict() writes "dtype"); keep both for readers
        # of either generation. LlamaConfig accepts both keys together.
        "dtype": "float32",
        "torch_dtype": "float32",
    }
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = metadata_field(reader, f"tokenizer.ggml.{key}")
        if value is not None:
            config[hf_key] = int(value)
    for key, value in spec.config:
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    if spec.finish_config is not None:
        spec.finish_config(config, lambda key, default: metadata_field(reader, f"{arch}.{key}", default))
    return config


def _layer_names(arch: str) -> dict[str, str]:
    return {**_LAYER_NAMES, **dict(_ARCHITECTURES[arch].extra_layer_names)}


def _map_tensors(reader: GGUFReader, arch: str, path: Path) -> dict[str, ReaderTensor]:
    layer_names = _layer_names(arch)
    mapped: dict[str, ReaderTensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        hf_name = _GLOBAL_NAMES.get(name)
        if hf_name is None and (m := _LAYER_RE.fullmatch(name)) and m.group(2) in layer_names:
            hf_name = f"model.layers.{int(m.group(1))}.{layer_names[m.group(2)]}"
        if hf_name is None:
            if name == "rope_freqs.weight":
                raise EdgekitError(
                    f"{path.name} uses llama3-style rope frequency scaling (rope_freqs.weight), "
                    "which edgekit does not support"
                )
            raise EdgekitError(f"{path.name} has tensor {name!r} that edgekit cannot map for arch {arch!r}")
        if not _can_dequantize(tensor):
            raise EdgekitError(f"GGUF tensor {name} has type {tensor.tensor_type.name}, which gguf cannot dequantize")
        mapped[hf_name] = tensor
    return mapped


def _check_complete(mapped: dict[str, ReaderTensor], arch: str, n_layers: int, path: Path) -> None:
    required = ["model.embed_tokens.weight", "model.norm.weight"]
    per_layer = list(_layer_names(arch).values())
    required += [f"model.layers.{i}.{n}" for i in range(n_layers) for n in per_layer]
    missing = [n for n in required if n not in mapped]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise EdgekitError(f"{path.name} is missing tensor {missing[0]}{more}")


def read_gguf(path: Path) -> GGUFModel:
    """Open a GGUF checkpoint: metadata is parsed now, tensors are dequantized on `weights.get`."""
    path = Path(path)
    reader = open_reader(path)
    arch = metadata_field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise EdgekitError(f"GGUF architecture {arch!r} is not supported (edgekit reads {', '.join(_ARCHITECTURES)})")
    mapped = _map_tensors(reader, arch, path)
    n_layers = int(_required(reader, f"{arch}.block_count"))
    _check_complete(mapped, arch, n_layers, path)

    heads = int(_required(reader, f"{arch}.attention.head_count"))
    kv_heads = int(metadata_field(reader, f"{arch}.attention.head_count_kv", heads))
    weights = GGUFWeights(
        reader,
        mapped,
        num_heads=heads,
        num_kv_heads=kv_heads,
        permuted_qk=_ARCHITECTURES[arch].permuted_qk,
        norm_shift=_ARCHITECTURES[arch].norm_shift,
    )
    config = _build_config(reader, arch, mapped, weights)
    tensor_types = {name: t.tensor_type.name for name, t in mapped.items()}

    type_counts: dict[str, int] = {}
    for type_name in tensor_types.values():
        type_counts[type_name] = type_counts.get(type_name, 0) + 1
    file_type = metadata_field(reader, "general.file_type")
    summary: dict[str, Any] = {
        "file": path.name,
        "size_bytes": path.stat().st_size,
        "gguf_version": int(metadata_field(reader, "GGUF.version", 0)),
        "architecture": arch,
        "tensor_count": len(mapped),
        "tensor_types": type_counts,
    }
    for key in ("name", "basename", "finetune", "size_label", "organization", "license", "quantized_by"):
        value = metadata_field(reader, f"general.{key}")
        if value is not None:
            summary[f"general.{key}"] = value
    if file_type is not None:
        summary["general.file_type"] = int(file_type)
    summary["has_tokenizer"] = reader.get_field("tokenizer.ggml.model") is not None
    summary["has_chat_template"] = reader.get_field("tokenizer.chat_template") is not None
    # gguf-py keeps one numpy view object per vocab entry (~140 MB of Python objects for a 49k vocab,
    # more for 150k vocabs). The weights never need them and write_tokenizer reopens the file.
    for key in [k for k, f in reader.fields.items() if k.startswith("tokenizer.") and len(f.data) > 1]:
        del reader.fields[key]
    return GGUFModel(
        config=config, architecture=arch, weights=weights, tensor_types=tensor_types, metadata_summary=summary
    )
