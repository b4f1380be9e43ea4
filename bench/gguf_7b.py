"""Write a random GGUF with the Llama 2 7B shape, export it with edgekit under a memory plan, and record
wall time, peak RSS of the process tree and the manifest's export_memory section.

No real 7B GGUF can be downloaded here; export speed and memory depend only on shapes and tensor types,
so a random file stands in. It is written with gguf-py's GGUFWriter in streaming fashion (tensor infos
first, then each tensor generated, quantized, written and freed), so writing it never holds more than
one tensor. gguf-py quantizes only Q4_0/Q4_1/Q5_x/Q8_0 (and a few others) in numpy, not the K-quants, so
the matrices are Q4_0 and token_embd/output Q8_0 (a Q4_K_M stand-in of about the same size, ~3.9 GB);
norms stay F32. The tokenizer is tests/gguf_testing.py's byte-level BPE with ChatML specials, padded to
32000 entries with "<dummy_N>" tokens typed UNUSED. The file is cached in bench/work/ and reused when
its tensor table matches and it is complete.

    python bench/gguf_7b.py                               # write (or reuse) the GGUF, export int4 skip 8 at 8GB
    python bench/gguf_7b.py --no-export                   # only write the GGUF
    python bench/gguf_7b.py --layers 1 --no-export        # shape-true, 1 layer (tokenizer/reader smoke test)
    python bench/gguf_7b.py --timeout 1500 --extra "--no-verify"

The export runs as `edgekit export FILE.gguf --quant int4 --skip 8 --max-memory 8GB -o
bench/work/bundles/gguf7b-skip8-int4 --force` under `timeout`; when it runs past --timeout the run is
repeated with --no-verify (unless --no-fallback). Results are appended as JSON lines to
bench/work/gguf-7b.jsonl; the bundle is deleted afterwards unless --keep-bundle.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from export_7b import manifest_record  # noqa: E402
from make_checkpoint import INIT_STD, SHAPES, WORK  # noqa: E402
from peak_rss import run  # noqa: E402

MATRIX_QTYPE = "Q4_0"
TABLE_QTYPE = "Q8_0"  # token_embd and output, as llama.cpp keeps them at higher precision
FILE_TYPE_Q4_0 = 2  # llama_ftype MOSTLY_Q4_0
SLAB_ELEMS = 16 * 1024**2  # generate and quantize ~64 MB of float32 at a time
TOKEN_UNUSED = 5


def gguf_tensors(shape: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(GGUF name, PyTorch-order shape, GGML type) in the order convert_hf_to_gguf.py writes them."""
    h, inter, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * hd
    out = [("token_embd.weight", (v, h), TABLE_QTYPE)]
    for i in range(shape["num_hidden_layers"]):
        p = f"blk.{i}"
        out += [
            (f"{p}.attn_norm.weight", (h,), "F32"),
            (f"{p}.attn_q.weight", (h, h), MATRIX_QTYPE),
            (f"{p}.attn_k.weight", (kv, h), MATRIX_QTYPE),
            (f"{p}.attn_v.weight", (kv, h), MATRIX_QTYPE),
            (f"{p}.attn_output.weight", (h, h), MATRIX_QTYPE),
            (f"{p}.ffn_norm.weight", (h,), "F32"),
            (f"{p}.ffn_gate.weight", (inter, h), MATRIX_QTYPE),
            (f"{p}.ffn_up.weight", (inter, h), MATRIX_QTYPE),
            (f"{p}.ffn_down.weight", (h, inter), MATRIX_QTYPE),
        ]
    out.append(("output_norm.weight", (h,), "F32"))
    if not shape["tie_word_embeddings"]:
        out.append(("output.weight", (v, h), TABLE_QTYPE))
    return out


def _byte_shape(shp: tuple[int, ...], qtype: str) -> tuple[tuple[int, ...], np.dtype]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if qtype == "F32":
        return shp, np.dtype(np.float32)
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return (*shp[:-1], shp[-1] // block * nbytes), np.dtype(np.uint8)


def _tensor_data(name: str, shp: tuple[int, ...], qtype: str) -> np.ndarray:
    """One tensor, drawn float32 (seeded by its name) and quantized slab by slab."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    if len(shp) == 1:  # RMSNorm gains: around 1, as in a trained model
        return 1.0 + 0.1 * rng.standard_normal(shp, dtype=np.float32)
    bshape, dtype = _byte_shape(shp, qtype)
    out = np.empty(bshape, dtype)
    rows = max(1, SLAB_ELEMS // shp[1])
    qt = GGMLQuantizationType[qtype]
    for r in range(0, shp[0], rows):
        slab = rng.standard_normal((min(rows, shp[0] - r), shp[1]), dtype=np.float32)
        slab *= INIT_STD
        out[r : r + rows] = quantize(slab, qt)
        del slab
    return out


def tokenizer_metadata(vocab_size: int) -> tuple[list[str], list[int]]:
    from gguf_testing import SPECIAL_TOKENS, tokenizer_tokens

    tokens = tokenizer_tokens()
    types = [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS))
    if len(tokens) > vocab_size:
        raise SystemExit(f"vocab {vocab_size} is smaller than the test tokenizer's {len(tokens)} tokens")
    n = vocab_size - len(tokens)
    tokens += [f"<dummy_{i}>" for i in range(n)]
    types += [TOKEN_UNUSED] * n
    return tokens, types


def _complete(path: Path, tensors: list[tuple[str, tuple[int, ...], str]]) -> bool:
    """The file holds exactly these tensors (names, shapes, types) and ends where the last one does."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
    except Exception:
        return False
    found = {t.name: t for t in reader.tensors}
    if len(found) != len(tensors):
        return False
    end = 0
    for name, shp, qtype in tensors:
        t = found.get(name)
        if t is None or t.tensor_type.name != qtype or tuple(int(d) for d in reversed(t.shape.tolist())) != shp:
            return False
        end = max(end, t.data_offset + t.n_bytes)
    size = path.stat().st_size
    return end <= size <= end + 64  # the writer pads the last tensor to the 32-byte alignment


def write_gguf(shape_name: str, path: Path, layers: int | None = None, force: bool = False) -> Path:
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf_testing import CHATML_TEMPLATE, MERGES

    shape = dict(SHAPES[shape_name])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    tensors = gguf_tensors(shape)
    if path.is_file() and not force and _complete(path, tensors):
        print(f"reusing {path} ({path.stat().st_size / 1e9:.2f} GB)", file=sys.stderr)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    h, heads = shape["hidden_size"], shape["num_attention_heads"]

    w = GGUFWriter(str(tmp), "llama")
    w.add_name(f"random-{shape_name}")
    w.add_block_count(shape["num_hidden_layers"])
    w.add_context_length(shape["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(shape["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(shape["num_key_value_heads"])
    w.add_layer_norm_rms_eps(shape["rms_norm_eps"])
    w.add_rope_freq_base(shape["rope_theta"])
    w.add_rope_dimension_count(h // heads)
    w.add_vocab_size(shape["vocab_size"])
    w.add_file_type(FILE_TYPE_Q4_0)
    tokens, types = tokenizer_metadata(shape["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML_TEMPLATE)

    # Streaming: declare every tensor (name, shape, type, size) so the header and tensor table can be
    # written first, then generate and write the data one tensor at a time in the declared order.
    for name, shp, qtype in tensors:
        bshape, dtype = _byte_shape(shp, qtype)
        nbytes = int(np.prod(bshape)) * dtype.itemsize
        raw = None if qtype == "F32" else GGMLQuantizationType[qtype]
        w.add_tensor_info(name, bshape, dtype, nbytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    t0 = time.perf_counter()
    for k, (name, shp, qtype) in enumerate(tensors, 1):
        data = _tensor_data(name, shp, qtype)
        w.write_tensor_data(data)
        del data
        if name.endswith("ffn_down.weight") or k == len(tensors):
            print(f"  {k}/{len(tensors)} tensors, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    w.close()
    if not _complete(tmp, tensors):
        raise SystemExit(f"{tmp} is not what was declared")
    os.replace(tmp, path)
    return path


def tensor_type_counts(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path), "r").tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def export_once(gguf: Path, out: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    edgekit = str(Path(sys.executable).with_name("edgekit"))
    cmd = [edgekit, "export", str(gguf), "--quant", args.quant, "--skip", str(args.skip)]
    if args.max_memory:
        cmd += ["--max-memory", args.max_memory]
    cmd += ["-o", str(out), "--force", *extra]
    # coreutils timeout: kills the export past --timeout and exits 124; its own RSS (~1 MB) is in the tree.
    wrapped = ["timeout", "-s", "TERM", "-k", "30", str(args.timeout), *cmd]
    load_before = os.getloadavg()
    res = run(wrapped)
    res["command"] = " ".join(cmd)
    res["timed_out"] = res["returncode"] == 124
    res["loadavg_before"] = load_before
    res["loadavg_after"] = os.getloadavg()
    if res["returncode"] == 0:
        res |= manifest_record(out)
    return res


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024**3:.2f} GiB"


def print_table(res: dict, budget: str | None) -> None:
    em = res.get("export_memory") or {}
    rows = [
        ("command", res["command"]),
        ("exit", res["returncode"]),
        ("GGUF", f"{res['gguf_bytes'] / 1e9:.2f} GB, {res['gguf_tensor_types']}"),
        ("GGUF write", f"{res['gguf_write_s']} s" if res.get("gguf_write_s") is not None else "reused"),
        ("export wall", f"{res['wall_s']} s"),
        ("peak RSS (tree)", f"{res['peak_rss_gib']} GiB vs --max-memory {budget}"),
        ("plan build / session", f"{_gib(em.get('build_bytes'))} / {_gib(em.get('session_bytes'))}"),
        (
            "plan verify",
            f"{em.get('verify_method', '-')}: streaming {_gib(em.get('streaming_verify_bytes'))}, "
            f"full {_gib(em.get('full_verify_bytes'))}",
        ),
        ("manifest peak RSS", _gib(em.get("peak_rss_bytes"))),
        ("phase peaks", ", ".join(f"{k} {_gib(v)}" for k, v in (em.get("phase_peak_rss_bytes") or {}).items()) or "-"),
        ("timings", res.get("timings_s", "-")),
        ("load avg before/after", f"{res['loadavg_before']} / {res['loadavg_after']}"),
    ]
    for k, v in rows:
        print(f"{k:24s} {v}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    ap.add_argument("--layers", type=int, help="override the layer count (small shape-true test files)")
    ap.add_argument("--gguf", type=Path, help="file [default: bench/work/gguf-SHAPE[-Nl]-q4_0.gguf]")
    ap.add_argument("--force", action="store_true", help="rewrite the GGUF even if a complete one exists")
    ap.add_argument("--no-export", action="store_true", help="only write the GGUF")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--skip", type=int, default=8)
    ap.add_argument("--max-memory", default="8GB", help="passed to edgekit export ('' for none)")
    ap.add_argument("--extra", default="", help="more edgekit export arguments")
    ap.add_argument("--timeout", type=int, default=1500, help="seconds before the export is killed")
    ap.add_argument("--no-fallback", action="store_true", help="do not rerun with --no-verify after a timeout")
    ap.add_argument("--keep-bundle", action="store_true")
    args = ap.parse_args()

    suffix = f"-{args.layers}l" if args.layers else ""
    gguf = args.gguf or WORK / f"gguf-{args.shape}{suffix}-q4_0.gguf"
    t0 = time.perf_counter()
    existed = gguf.is_file()
    write_gguf(args.shape, gguf, args.layers, args.force)
    write_s = None if existed and not args.force else round(time.perf_counter() - t0, 1)
    print(gguf, f"{gguf.stat().st_size} bytes", tensor_type_counts(gguf))
    if args.no_export:
        return

    out = WORK / "bundles" / f"gguf7b{suffix}-skip{args.skip}-{args.quant}"
    extra = args.extra.split()
    results = [export_once(gguf, out, args, extra)]
    if results[-1]["timed_out"] and not args.no_fallback and "--no-verify" not in extra:
        print(f"export ran past {args.timeout} s; rerunning with --no-verify", file=sys.stderr)
        results.append(export_once(gguf, out, args, [*extra, "--no-verify"]))
    for res in results:
        res.update(
            gguf=str(gguf.relative_to(ROOT)) if gguf.is_relative_to(ROOT) else str(gguf),
            gguf_bytes=gguf.stat().st_size,
            gguf_tensor_types=tensor_type_counts(gguf),
            gguf_write_s=write_s,
            max_memory=args.max_memory or None,
            machine=f"{platform.machine()}, {os.cpu_count()} cores, shared",
            time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        print_table(res, args.max_memory or None)
        print(json.dumps(res), flush=True)
        with open(WORK / "gguf-7b.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")
    if not args.keep_bundle:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
