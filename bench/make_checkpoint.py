"""Make a Llama-shaped Hugging Face checkpoint with random fp16 weights, shard by shard, for benchmarks.

No real 7B weights can be downloaded here, and export speed and memory depend only on the shapes, so a
random checkpoint with the real config stands in. Each tensor is drawn with numpy (seeded by its name,
so the same shape always gives the same bytes) and written into ~2 GB safetensors shards plus the
usual `model.safetensors.index.json`; the whole model is never in memory. The tokenizer is
stories260K's (512 ids, all < vocab): its vocabulary does not match, which is irrelevant for speed
and memory, and the random weights make the text meaningless anyway.

The result is cached under bench/work/ and reused when complete (a `.complete` marker is written last).

    python bench/make_checkpoint.py                          # bench/work/ckpt-llama2-7b (13.5 GB)
    python bench/make_checkpoint.py --shape tinyllama-1.1b   # bench/work/ckpt-tinyllama-1.1b
    python bench/make_checkpoint.py --shape llama2-7b --layers 2 --out /tmp/tiny7b   # shape-true, fewer layers
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work"
TOKENIZER_SRC = ROOT / "edgekit" / "data" / "stories260k"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json")
SHARD_BYTES = 2 * 1024**3
INIT_STD = 0.02  # Llama's initializer_range: keeps random activations finite through 32 layers

# The published configs' shapes (meta-llama/Llama-2-7b-hf, TinyLlama/TinyLlama-1.1B-Chat-v1.0).
SHAPES: dict[str, dict] = {
    "llama2-7b": {
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "tinyllama-1.1b": {
        "num_hidden_layers": 22,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
}


def tensor_shapes(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LlamaForCausalLM in the order transformers saves them."""
    h, inter, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * hd
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (inter, h)),
            (f"{p}.mlp.up_proj.weight", (inter, h)),
            (f"{p}.mlp.down_proj.weight", (h, inter)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not shape["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h)))
    return out


def random_tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    if len(shape) == 1:  # RMSNorm gains: around 1, as in a trained model
        return (1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float16)
    out = np.empty(shape, np.float16)
    rows = max(1, (64 * 1024**2) // (4 * shape[1]))  # draw in ~64 MB float32 slabs
    for r in range(0, shape[0], rows):
        slab = rng.standard_normal((min(rows, shape[0] - r), shape[1]), dtype=np.float32)
        slab *= INIT_STD
        out[r : r + rows] = slab
    return out


def write_config(folder: Path, shape: dict) -> None:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "initializer_range": INIT_STD,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "dtype": "float16",
        "use_cache": True,
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "rope_parameters": {"rope_theta": shape["rope_theta"], "rope_type": "default"},
        **{k: v for k, v in shape.items() if k != "rope_theta"},
    }
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def make_checkpoint(shape_name: str, out: Path, layers: int | None = None, force: bool = False) -> Path:
    from safetensors.numpy import save_file

    if (out / ".complete").is_file() and not force:
        return out
    shape = dict(SHAPES[shape_name])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = tensor_shapes(shape)

    # Group tensors into shards by size first, so file names can carry the shard count like HF's.
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in tensors:
        nbytes = 2 * int(np.prod(shp))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        data = {name: random_tensor(name, shp) for name, shp in shard}
        save_file(data, str(tmp / fname), metadata={"format": "pt"})
        total += sum(a.nbytes for a in data.values())
        del data
        weight_map.update({name: fname for name, _ in shard})
        print(f"  {fname}: {len(shard)} tensors", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_config(tmp, shape)
    for f in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_SRC / f, tmp / f)
    (tmp / ".complete").write_text(f"{shape_name} layers={shape['num_hidden_layers']}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--out", type=Path, help="folder [default: bench/work/ckpt-SHAPE]")
    ap.add_argument("--layers", type=int, help="override the layer count (small shape-true test models)")
    ap.add_argument("--force", action="store_true", help="rebuild even if a complete copy exists")
    args = ap.parse_args()
    suffix = f"-{args.layers}l" if args.layers else ""
    out = args.out or WORK / f"ckpt-{args.shape}{suffix}"
    print(make_checkpoint(args.shape, out, args.layers, args.force))


if __name__ == "__main__":
    main()
