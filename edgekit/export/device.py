"""The device-target steps of an export: the memory budget before building, and after it the files a
device needs (genai_config.json, .ort + operator config, fixed-shape variants) plus their manifest
entries. `pipeline.py` calls `plan_target` and `finish_target`; everything here reads the request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.bundle.genai_config import genai_config, write_genai_config
from edgekit.checkpoint.load import Checkpoint
from edgekit.errors import EdgekitError
from edgekit.export.attention_inputs import window_slots
from edgekit.export.budget import MemoryEstimate, check_or_estimate
from edgekit.export.graph import FLAVOURS
from edgekit.export.heads import padded_head_dim
from edgekit.export.mobile import check_ort_size, convert_to_ort, make_fixed_variants
from edgekit.export.onnx_writer import GraphContract
from edgekit.skip.skipset import SkipSet

GIB = 1024**3


def graph_head_dim(flavour: str, head_dim: int) -> int:
    return padded_head_dim(head_dim) if flavour == "fused" else head_dim


def recipe_context(req: Any, model_max: int) -> int:
    """--max-context if given (checked against the model later), else the recipe's clamped to the model's."""
    if req.max_context:
        return req.max_context
    return min(model_max, req.recipe.max_context) if req.recipe is not None else model_max


def plan_target(req: Any, ckpt: Checkpoint, skip: SkipSet, context: int) -> MemoryEstimate:
    """Estimate memory; refuse (EdgekitError with what would fit) when over the device's budget."""
    recipe = req.recipe
    if req.flavour not in FLAVOURS:
        raise EdgekitError(f"--flavour {req.flavour}: choose one of {', '.join(FLAVOURS)}")
    if recipe is not None and recipe.fixed_shapes and req.flavour != "standard":
        raise EdgekitError(
            f"recipe {recipe.name} emits fixed-shape variants, which need --flavour standard (its mobile EPs do "
            "not run the fused graph's contrib ops)"
        )
    usable, device = None, "device"
    if req.device_memory_gb is not None:
        usable, device = int(req.device_memory_gb * GIB), f"--device-memory {req.device_memory_gb:g} GB"
    elif recipe is not None:
        usable = recipe.usable_memory_bytes
        device = f"recipe {recipe.name} ({recipe.memory_gb:g} GB, {recipe.reserved_gb:g} GB reserved)"
    if req.quant.kv_window and skip.kept:
        window_slots(ckpt, skip, context)  # refuses a model with no sliding window, before anything is written
    hd = graph_head_dim(req.flavour, ckpt.spec.head_dim)
    est = check_or_estimate(ckpt.spec, len(skip.skipped), req.quant, context, hd, usable, device)
    if recipe is not None and recipe.emit_ort:
        check_ort_size(est.weights_bytes, f"{ckpt.source_id}'s weights ({req.quant.mode}, estimated)")
    return est


def finish_target(
    folder: Path, req: Any, ckpt: Checkpoint, skip: SkipSet, contract: GraphContract, context: int
) -> dict[str, Any]:
    """Write the device files into the bundle folder; return their manifest entries."""
    recipe, spec = req.recipe, ckpt.spec
    cfg = genai_config(
        num_layers_kept=len(skip.kept),
        kv_heads=contract.kv_heads,
        heads=spec.heads,
        head_dim=contract.head_dim,
        hidden=spec.hidden,
        vocab=spec.vocab,
        context=context,
        bos_token_id=spec.bos_token_id,
        eos_token_ids=list(spec.eos_token_ids),
        flavour=req.flavour,
        providers=list(recipe.providers) if recipe else None,
        threads=recipe.threads if recipe else None,
    )
    # onnxruntime-genai sizes every cache slot alike and feeds no window_attention_mask: a --kv-window bundle
    # is edgekit's runtime's only (export without --kv-window for genai)
    out: dict[str, Any] = {}
    if not contract.window_slots:
        out["genai"] = {"config": write_genai_config(folder, cfg), "onnxruntime_genai": ">=0.18"}
    if recipe is None:
        return out
    fixed: dict[str, str] = {}
    if recipe.fixed_shapes:
        prefill, fixed_context = recipe.fixed_shapes["prefill"], min(recipe.fixed_shapes["context"], context)
        if prefill >= fixed_context:
            raise EdgekitError(
                f"recipe {recipe.name}: fixed prefill {prefill} must be below the context {fixed_context}"
            )
        fixed = make_fixed_variants(folder / "model.onnx", prefill, fixed_context)
        out["fixed_shapes"] = {"prefill_tokens": prefill, "context": fixed_context, "files": fixed}
        if recipe.qdq:
            out["fixed_shapes"]["qdq"] = _qdq(folder, req, ckpt, fixed, recipe.qdq)
    if recipe.emit_ort:
        runtime_opt = recipe.provider != "CPUExecutionProvider"
        out["ort_format"] = {
            "files": convert_to_ort(folder, ["model.onnx", *fixed.values()], runtime_opt),
            "optimization_style": "Runtime" if runtime_opt else "Fixed",
        }
    return out


def _qdq(folder: Path, req: Any, ckpt: Checkpoint, fixed: dict[str, str], qdq: dict[str, str]) -> dict[str, Any]:
    if req.quant.mode != "fp32":
        raise EdgekitError(f"recipe {req.recipe.name}: QDQ quantizes an fp32 graph; --quant {req.quant.mode} conflicts")
    from tokenizers import Tokenizer

    from edgekit.export.qdq import quantize_fixed_pair
    from edgekit.quality.analyze import default_calib

    calib = req.calib or default_calib(ckpt)
    try:
        text = Path(calib).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgekitError(f"cannot read the calibration text {calib}: {e}") from e
    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    result = quantize_fixed_pair(folder, fixed, ids, qdq["activations"], qdq["weights"])
    return {**result.to_manifest(), "calib": Path(calib).name}


def add_target(
    manifest: dict[str, Any],
    req: Any,
    contract: GraphContract,
    memory: MemoryEstimate,
    device_files: dict[str, Any],
    model_bytes: int,
) -> dict[str, Any]:
    """Manifest entries: the graph flavour actually built, memory estimate next to the real weight bytes,
    and the recipe's runtime settings (providers, threads) for the app that loads the bundle."""
    graph = dict(manifest["graph"])
    if req.flavour == "standard":
        graph.update(
            flavour="standard",
            contrib_ops=[],
            head_dim_padded=False,
            weights="int8 per-channel DequantizeLinear → MatMul" if req.quant.bits else req.quant.mode,
        )
        if req.quant.bits:  # the standard graph quantizes per output channel, not in MatMulNBits blocks
            q = dict(manifest["quantization"])
            q.update(
                symmetric=True,
                scheme="int8 per output channel, symmetric, DequantizeLinear → MatMul (fp activations); "
                "block_size and accuracy_level apply to the fused graph's MatMulNBits only",
                quantizer="edgekit graph_standard (numpy)",
            )
            manifest = {**manifest, "quantization": q}
    mem = memory.to_manifest()
    mem["model_file_bytes"] = model_bytes
    extra: dict[str, Any] = {"graph": graph, "memory": mem, **device_files}
    if req.recipe is not None:
        extra["target"] = req.recipe.to_manifest()
    return {**manifest, **extra}
