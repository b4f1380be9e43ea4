"""Open a checkpoint folder safely: config, family, weights, and (only when asked) a torch model.

Weights are read tensor by tensor from memory-mapped safetensors, so the exporter never needs the
whole model in memory. Pickle checkpoints (`*.bin`) can execute code when loaded and are refused unless
the user opts in, and even then go through torch's weights-only unpickler. Remote code in a config
(`auto_map`) is never run unless the user opts in.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.checkpoint.families import Family, check_supported, family_for
from edgekit.checkpoint.gguf import GGUFWeights
from edgekit.checkpoint.gguf_source import open_gguf
from edgekit.checkpoint.spec import ModelSpec
from edgekit.errors import EdgekitError


@dataclass
class Checkpoint:
    path: Path
    source_id: str
    config: Any
    family: Family
    spec: ModelSpec
    config_sha256: str
    weight_files: list[Path]
    weights: WeightSource | GGUFWeights = field(repr=False)
    source: dict[str, Any] = field(default_factory=dict)  # extra provenance for the manifest (e.g. gguf)

    def norm_weight(self, name: str) -> np.ndarray:
        """An RMSNorm's effective gamma: the stored weight plus the family's offset (Gemma stores w - 1)."""
        w = self.weights.get(name)
        return (w + np.float32(self.family.norm_offset)).astype(np.float32) if self.family.norm_offset else w

    @property
    def from_gguf(self) -> bool:
        return bool(self.weight_files) and self.weight_files[0].suffix.lower() == ".gguf"


class WeightSource:
    """Lazy, name-addressed access to a checkpoint's tensors as float32 numpy arrays."""

    def __init__(self, files: list[Path], pickle_ok: bool = False) -> None:
        self._where: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._pickled: dict[str, Any] = {}
        for f in files:
            if f.suffix == ".safetensors":
                self._index_safetensors(f)
            elif pickle_ok:
                self._load_pickle(f)

    def _index_safetensors(self, f: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(f, framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 - safetensors 0.8 safe_open is not iterable
                    self._where[name] = f
                    self._shapes[name] = tuple(st.get_slice(name).get_shape())
        except Exception as e:  # safetensors raises several types for a damaged header
            # safetensors checks the header and that its offsets cover the file exactly, so a truncated
            # or padded file fails here, up front, not halfway through the export
            raise EdgekitError(
                f"cannot read weights {f.name} (damaged or truncated?): {str(e).splitlines()[0][:200]}"
            ) from e

    def _load_pickle(self, f: Path) -> None:
        import torch

        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols on stderr; the error says it
                warnings.simplefilter("ignore")
                try:
                    state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    # pre-zip (legacy) torch files cannot be memory-mapped; still the weights-only unpickler
                    state = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's text suggests retrying with weights_only=False, which is exactly what must not happen
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            raise EdgekitError(
                f"refusing {f.name}: it holds {found.group(1) if found else 'objects'} besides tensors, which only a "
                "full unpickler would create (and that can run code); convert it to safetensors where you trust it"
            ) from e
        except Exception as e:
            raise EdgekitError(
                f"cannot read weights {f.name} with torch's weights-only loader: {str(e).splitlines()[0][:200]}"
            ) from e
        if not isinstance(state, dict) or not all(hasattr(t, "shape") for t in state.values()):
            raise EdgekitError(f"{f.name} is not a state dict of tensors")
        for name, t in state.items():
            self._pickled[name] = t
            self._shapes[name] = tuple(t.shape)

    def __contains__(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def names(self) -> list[str]:
        return list(self._shapes)

    def get(self, name: str) -> np.ndarray:
        import torch

        if name in self._pickled:
            return self._pickled[name].to(torch.float32).numpy()
        if name not in self._where:
            raise EdgekitError(f"weights: tensor {name} is missing from the checkpoint")
        from safetensors import safe_open

        try:
            with safe_open(self._where[name], framework="pt") as st:
                return st.get_tensor(name).to(torch.float32).numpy()
        except EdgekitError:
            raise
        except Exception as e:
            raise EdgekitError(f"cannot read tensor {name} from {self._where[name].name}: {e}") from e


def _read_config(path: Path, trust_remote_code: bool) -> tuple[Any, str]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise EdgekitError(f"{path} is not a Hugging Face model folder: it has no config.json")
    raw = cfg_file.read_bytes()
    try:
        cfg_json = json.loads(raw)
    except json.JSONDecodeError as e:
        raise EdgekitError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(cfg_json, dict):
        raise EdgekitError(f"{cfg_file} does not hold a JSON object")
    if "auto_map" in cfg_json and not trust_remote_code:
        raise EdgekitError(
            f"{path.name} asks to run its own Python code (auto_map in config.json); edgekit refuses by default. "
            "Pass --trust-remote-code only if you trust its author"
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise EdgekitError(f"cannot read {cfg_file}: {str(e).splitlines()[0]}") from e
    return config, hashlib.sha256(raw).hexdigest()


def _weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        return safetensors
    pickles = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt")) + sorted(path.glob("*.pth"))
    pickles = [p for p in pickles if not p.name.startswith("training_args")]
    if pickles and not allow_pickle:
        raise EdgekitError(
            f"{path.name} has only pickle weights ({pickles[0].name}), which can run code when loaded; convert "
            "them to safetensors or pass --allow-pickle to load them with torch's weights-only loader"
        )
    if not pickles:
        raise EdgekitError(f"{path} has a config.json but no weights (*.safetensors)")
    return pickles


def _expected_shapes(spec: ModelSpec, family: Family) -> Iterator[tuple[str, tuple[int, ...]]]:
    # A generator, so a config claiming 10**9 layers fails at the first missing tensor instead of
    # building a table of billions of names first.
    n = family.names
    q_out, kv_out = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    yield n.embed, (spec.vocab, spec.hidden)
    yield n.final_norm, (spec.hidden,)
    if not spec.tie_embeddings:
        yield n.lm_head, (spec.vocab, spec.hidden)
    for i in range(spec.num_layers):
        f = {"i": i, "p": "weight"}
        yield n.input_norm.format(**f), (spec.hidden,)
        yield n.q.format(**f), (q_out, spec.hidden)
        yield n.k.format(**f), (kv_out, spec.hidden)
        yield n.v.format(**f), (kv_out, spec.hidden)
        yield n.o.format(**f), (spec.hidden, q_out)
        yield n.post_norm.format(**f), (spec.hidden,)
        yield n.gate.format(**f), (spec.intermediate, spec.hidden)
        yield n.up.format(**f), (spec.intermediate, spec.hidden)
        yield n.down.format(**f), (spec.hidden, spec.intermediate)
        if family.qk_norm:
            yield n.q_norm.format(**f), (spec.head_dim,)
            yield n.k_norm.format(**f), (spec.head_dim,)
        for out_norm in (n.attn_out_norm, n.mlp_out_norm):
            if out_norm:
                yield out_norm.format(**f), (spec.hidden,)


_SPEC_FIELDS = {  # ModelSpec field → the config.json key a user would look for; (minimum)
    "num_layers": ("num_hidden_layers", 1),
    "hidden": ("hidden_size", 1),
    "intermediate": ("intermediate_size", 1),
    "heads": ("num_attention_heads", 1),
    "kv_heads": ("num_key_value_heads", 1),
    "head_dim": ("head_dim", 1),
    "vocab": ("vocab_size", 1),
    "max_context": ("max_position_embeddings", 2),
}


def _check_spec(spec: ModelSpec) -> ModelSpec:
    """A stranger's config can say anything; sizes must be whole numbers in range before any arithmetic."""
    for name, (key, minimum) in _SPEC_FIELDS.items():
        v = getattr(spec, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise EdgekitError(f"config.json: {key} must be a whole number of at least {minimum}, not {v!r:.40}")
    if spec.heads % spec.kv_heads:
        raise EdgekitError(f"config.json: {spec.heads} attention heads do not divide into {spec.kv_heads} KV heads")
    return spec


def _check_shapes(weights: WeightSource, spec: ModelSpec, family: Family) -> None:
    for name, shape in _expected_shapes(spec, family):
        if name not in weights:
            raise EdgekitError(f"weights: {name} is missing from the checkpoint")
        if weights.shape(name) != shape:
            raise EdgekitError(
                f"weights: {name} has shape {list(weights.shape(name))} but the config implies {list(shape)}"
            )


def open_checkpoint(
    path: Path, source_id: str, trust_remote_code: bool = False, allow_pickle: bool = False
) -> Checkpoint:
    """A Hugging Face folder, or a GGUF file (its config and tokenizer converted once into the cache)."""
    gguf = open_gguf(path) if path.is_file() else None
    folder = gguf.folder if gguf else path
    config, config_sha = _read_config(folder, trust_remote_code and gguf is None)
    family = family_for(config)
    check_supported(config, family)
    spec = _check_spec(ModelSpec.from_config(config, family))
    if gguf is not None:
        files, weights, source = [path], gguf.weights, {"gguf": gguf.manifest}
    else:
        files, source = _weight_files(path, allow_pickle), {}
        weights = WeightSource(files, pickle_ok=allow_pickle)
    _check_shapes(weights, spec, family)
    return Checkpoint(folder, source_id, config, family, spec, config_sha, files, weights, source)


def _model_from_weights(ckpt: Checkpoint) -> Any:
    """transformers' model for the config, its weights assigned from `ckpt.weights` (a GGUF's, dequantized)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(ckpt.config, dtype=torch.float32)
    state = {}
    for name in model.state_dict():
        source = name
        if name not in ckpt.weights and name == ckpt.family.names.lm_head and ckpt.spec.tie_embeddings:
            source = ckpt.family.names.embed
        state[name] = torch.from_numpy(ckpt.weights.get(source))
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    rebuild_computed_buffers(model, ckpt.config)
    return model.eval()


def rebuild_computed_buffers(model: Any, config: Any) -> None:
    """Non-persistent buffers are computed, not loaded, so a model built on the meta device lacks them:
    rotary inverse frequencies, and Gemma's embedding scale. Build them for real; refuse any other."""
    import torch

    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    embed = model.model.embed_tokens
    if hasattr(embed, "scalar_embed_scale"):  # Gemma3TextScaledWordEmbedding: sqrt(hidden)
        embed.embed_scale = torch.tensor(embed.scalar_embed_scale)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise EdgekitError(f"cannot rebuild buffer {left[0]} of {type(model).__name__} outside transformers' loader")


def load_torch_model(ckpt: Checkpoint) -> Any:
    """The full PyTorch model in float32, for verification and evaluation (not for export)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if ckpt.from_gguf:
        return _model_from_weights(ckpt)
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ckpt.path,
            dtype=torch.float32,
            local_files_only=True,
            use_safetensors=ckpt.weight_files[0].suffix == ".safetensors",
        )
    except Exception as e:
        raise EdgekitError(f"cannot load {ckpt.source_id} in PyTorch: {str(e).splitlines()[0]}") from e
    return model.eval()


def rotary_tables(ckpt: Checkpoint, length: int, kind: str = "") -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [length, head_dim/2] exactly as transformers computes them, scaling included.

    `kind`: the layer type whose table this is, where rotary differs per layer type (ModelSpec.rope_kind)."""
    import copy

    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from edgekit.checkpoint.families import rope_parameters

    # Llama's rotary module reads the family-neutral `rope_parameters`, so it serves every family here;
    # a table keyed by layer type (Gemma 3) is handed to it as a config of its own.
    config = ckpt.config
    if kind:
        config = copy.copy(config)
        config.rope_parameters = rope_parameters(ckpt.config, kind)
    rotary = LlamaRotaryEmbedding(config)
    freqs = torch.arange(length, dtype=torch.float32)[:, None] * rotary.inv_freq.float()[None, :]
    scaling = rotary.attention_scaling
    return (freqs.cos() * scaling).numpy(), (freqs.sin() * scaling).numpy()
