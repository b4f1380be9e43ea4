"""ORT Mobile format and fixed-shape variants, for the phone and NPU recipes.

`.ort` is onnxruntime's flatbuffer model format, the one its mobile packages (and reduced builds) load;
converting also writes `required_operators.config`, the operator list a custom reduced onnxruntime
build takes (`build.py --include_ops_by_config required_operators.config --minimal_build`). The format
has no external-data side file, so a model over flatbuffers' 2 GB cannot be converted.

Fixed shapes. NNAPI, CoreML's Neural Engine and QNN compile for static shapes. The standard graph is
dynamic; a fixed variant pins every named dimension:

    prefill.onnx   input_ids [1, P]   past [1, kv, C-P, hd]   attention_mask [1, C]   present [1, kv, C, hd]
    decode.onnx    input_ids [1, 1]   past [1, kv, C-1, hd]   attention_mask [1, C]   present [1, kv, C, hd]

The caller keeps a C-slot, left-padded window: padding slots have attention_mask 0 (the graph derives
positions from the mask's cumulative sum and masks padding out), and after each call it drops the
oldest slots of `present` to get the next `past` (`fixed_greedy` below is the reference loop). The
trade-off: every decode step attends over all C slots (cost of the full context from token one), a
prompt is processed in chunks of P with padding, generation stops at C-1 tokens, and the bundle holds
two more graphs (they share `model.onnx.data` when the weights are external, else they are copies).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from edgekit.errors import EdgekitError

ORT_FORMAT_LIMIT = 2 * 1024**3
# The fixed pair sits next to model.onnx and shares its model.onnx.data: onnxruntime refuses external data
# outside a model's own folder ("External data path escapes model directory"), so a fixed/ folder pointing
# at ../model.onnx.data loaded only for models small enough to embed their weights.
FIXED_FILES = {"prefill": "fixed-prefill.onnx", "decode": "fixed-decode.onnx"}
OPS_CONFIG = "required_operators.config"


def check_ort_size(nbytes: int, what: str) -> None:
    if nbytes >= ORT_FORMAT_LIMIT:
        raise EdgekitError(
            f"{what} is {nbytes / 1024**3:.2f} GB; the ORT mobile format (one flatbuffer, no external data) "
            "holds at most 2 GB: quantize further, skip more layers, or use a recipe without emit_ort"
        )


def graph_bytes(path: Path) -> int:
    """A graph file's size plus its external data files', each file once (its tensors share it)."""
    model = onnx.load(str(path), load_external_data=False)
    files = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files)


def make_fixed_variants(model_path: Path, prefill: int, context: int) -> dict[str, str]:
    """Write prefill/decode variants of a dynamic standard graph with every dimension pinned, beside it."""
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    written = {}
    for name, seq in (("prefill", prefill), ("decode", 1)):
        model = onnx.load(str(model_path), load_external_data=False)
        if any(op.domain not in ("", "ai.onnx") for op in model.opset_import):
            raise EdgekitError("fixed-shape variants need the standard graph flavour (no contrib ops)")
        for dim, value in (
            ("batch_size", 1),
            ("sequence_length", seq),
            ("past_sequence_length", context - seq),
            ("total_sequence_length", context),
        ):
            make_dim_param_fixed(model.graph, dim, value)
        onnx.save_model(model, str(model_path.parent / FIXED_FILES[name]))
        written[name] = FIXED_FILES[name]
    return written


def convert_to_ort(folder: Path, models: list[str], runtime_optimizations: bool) -> dict[str, str]:
    """Convert bundle-relative ONNX files to .ort next to them and write the reduced-build operator config.

    `runtime_optimizations`: onnxruntime's advice for NNAPI/CoreML (and other EPs that claim nodes first)
    is the "Runtime" style: only basic optimizations are applied, the rest are saved and replayed at load
    if the CPU EP ends up with the nodes; "Fixed" bakes all CPU optimizations in.
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    for rel in models:
        check_ort_size(graph_bytes(folder / rel), rel)
    style = OptimizationStyle.Runtime if runtime_optimizations else OptimizationStyle.Fixed
    suffix = ".with_runtime_opt" if runtime_optimizations else ""
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=folder, prefix=".ort-") as tmp_name:
        tmp = Path(tmp_name)
        stage = tmp / "in"
        for rel in models:  # stage only the graphs to convert; external data is hard-linked, not copied
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / rel, stage / rel)
        for data in folder.glob("*.onnx.data"):
            # not a symlink: onnxruntime 1.32 resolves it and refuses data outside the model's folder
            try:
                os.link(data, stage / data.name)
            except OSError:  # a filesystem without hard links
                shutil.copyfile(data, stage / data.name)
        log = io.StringIO()
        logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # it logs every config it writes
        try:
            with contextlib.redirect_stdout(log):
                convert_onnx_models_to_ort(
                    stage, output_dir=tmp / "out", optimization_styles=[style], target_platform="arm"
                )
        except Exception as e:
            raise EdgekitError(f"ORT format conversion failed: {str(e).splitlines()[0]}") from e
        for rel in models:
            src = (tmp / "out" / rel).with_suffix(f"{suffix}.ort")
            dst = (folder / rel).with_suffix(".ort")
            shutil.move(src, dst)
            out[rel] = dst.relative_to(folder).as_posix()
        shutil.move(tmp / "out" / f"required_operators{suffix}.config", folder / OPS_CONFIG)
    out["operators_config"] = OPS_CONFIG
    return out


def fixed_greedy(
    prefill_path: Path | str, decode_path: Path | str, prompt: list[int], steps: int, providers: list | None = None
) -> list[int]:
    """Greedy tokens through the fixed-shape pair: the reference for how an app drives them."""
    import onnxruntime as ort

    opts = {"providers": providers or ["CPUExecutionProvider"]}
    pre, dec = ort.InferenceSession(str(prefill_path), **opts), ort.InferenceSession(str(decode_path), **opts)
    ins = {i.name: i for i in pre.get_inputs()}
    p_len, context = int(ins["input_ids"].shape[1]), int(ins["attention_mask"].shape[1])
    past_names = [n for n in ins if n.startswith("past_key_values.")]
    present_names = [n.replace("past_key_values.", "present.") for n in past_names]
    dtype = np.float16 if past_names and ins[past_names[0]].type == "tensor(float16)" else np.float32

    def keep_last(present: list[np.ndarray], full_mask: np.ndarray, n: int) -> tuple[dict, np.ndarray]:
        if full_mask[:, :-n].any():  # a real token would fall out of the window
            raise EdgekitError(f"{len(prompt)} + {steps} tokens do not fit the fixed context of {context}")
        return {k: t[:, :, -n:] for k, t in zip(past_names, present, strict=True)}, full_mask[:, -n:]

    shape = {n: (1, int(ins[n].shape[1]), context - p_len, int(ins[n].shape[3])) for n in past_names}
    kv, mask = {n: np.zeros(shape[n], dtype) for n in past_names}, np.zeros((1, context - p_len), np.int64)
    for start in range(0, len(prompt), p_len):
        chunk = prompt[start : start + p_len]
        ids = np.zeros((1, p_len), np.int64)
        ids[0, p_len - len(chunk) :] = chunk
        full = np.concatenate([mask, (np.arange(p_len) >= p_len - len(chunk))[None].astype(np.int64)], axis=1)
        outs = pre.run(["logits", *present_names], {"input_ids": ids, "attention_mask": full, **kv})
        logits, present = outs[0], outs[1:]
        kv, mask = keep_last(present, full, context - p_len)
    kv, mask = keep_last(present, full, context - 1)
    out = []
    for _ in range(steps):
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        full = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        outs = dec.run(["logits", *present_names], {"input_ids": np.array([[tok]]), "attention_mask": full, **kv})
        logits, present = outs[0], outs[1:]
        kv, mask = keep_last(present, full, context - 1)
    return out
