"""The export pipeline: resolve → open → choose skip set → build graph (quantizing as it goes) →
verify against PyTorch → bundle. Each step is a plain function; this module only sequences them."""

from __future__ import annotations

import contextlib
import gc
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from edgekit import __version__
from edgekit.bundle.folder import SCHEMA_VERSION, bundle_writer, write_manifest
from edgekit.checkpoint.load import Checkpoint, load_torch_model, open_checkpoint
from edgekit.checkpoint.resolve import ResolvedModel, is_gguf, resolve_model
from edgekit.errors import EdgekitError
from edgekit.export.calibrate import matmul_hessians
from edgekit.export.device import add_target, finish_target, plan_target, recipe_context
from edgekit.export.graph import build_decoder, graph_manifest
from edgekit.export.graph_standard import build_standard_decoder
from edgekit.export.int4 import AUTO, NEEDS_CALIBRATION, default_int4_algo
from edgekit.export.kv_cache import calibrate_kv_scales
from edgekit.export.memory import RssWatch, plan_export_memory
from edgekit.export.quantize import QuantConfig, more_bits_layers
from edgekit.export.tied import shares_table
from edgekit.export.verify import DEFAULT_TEXT, VerifyReport, unskipped_perplexity, verify
from edgekit.export.verify_streaming import verify_streaming
from edgekit.quality.analyze import default_calib
from edgekit.quality.choose import select_skip, suggest
from edgekit.quality.gate import quality_gate
from edgekit.quality.streaming import should_stream
from edgekit.skip.skipset import SkipSet

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",  # transformers 5 keeps the chat template here (tokenizer_config.json has a copy)
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "config.json",
)


@dataclass
class ExportRequest:
    model: str
    skip: int | str | None = None  # N (last N) or "auto:N"
    skip_layers: str | None = None  # "20,24-31"
    quant: QuantConfig = field(default_factory=QuantConfig)
    output: Path | None = None
    force: bool = False
    verify: bool = True
    verify_text: Path | None = DEFAULT_TEXT
    max_context: int | None = None
    allow_download: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    command: str = ""
    progress: bool = False
    calib: Path | None = None  # calibration text; ranks layers for auto:N [default: shipped TinyStories]
    max_ppl_increase: float | None = None  # quality gate: bundle ppl on calib vs unskipped fp32, relative
    calib_tokens: int = 16384  # tokens of the calibration text the quality gate scores
    flavour: str = "fused"  # "standard": plain ONNX ops for mobile EPs (graph_standard.py)
    recipe: Any = None  # edgekit.targets.recipes.Recipe: memory budget, providers, .ort, fixed shapes (device.py)
    device_memory_gb: float | None = None  # memory budget without a recipe (overrides the recipe's)
    max_memory: int | None = None  # bytes the export process may use (--max-memory); None: 80% of free RAM
    verify_method: str = "auto"  # "full" (fp32 PyTorch model) | "streaming" (layer by layer) | "auto"
    fill: str | None = None  # what replaces a removed sublayer [default: quality.fill.resolve_fill]


@dataclass
class ExportResult:
    bundle: Path
    manifest: dict[str, Any]
    seconds: dict[str, float]


def default_quant(model: str) -> str:
    """A GGUF's own blocks (no second rounding: +0.3% perplexity on SmolLM2's Q4_1 file, where requantizing
    to int4 costs +19%; BENCHMARKS.md), else fp32."""
    return "keep" if is_gguf(model) else "fp32"


def _resolved_int4(req: ExportRequest, ckpt: Checkpoint, streaming: bool) -> QuantConfig:
    q = req.quant
    if q.mode == "int4" and not q.int8_layers:
        q = replace(q, int8_layers=more_bits_layers(q.int4_mix, ckpt.spec.num_layers))
    if q.int4_algo != AUTO:
        return q
    fits = not streaming and not should_stream(ckpt)
    return replace(q, int4_algo=default_int4_algo(fits, q.symmetric, q.keeps_gguf_blocks))


def default_output(resolved: ResolvedModel, skip: SkipSet, quant: QuantConfig) -> Path:
    name = resolved.source_id.rstrip("/").split("/")[-1].lower().removesuffix(".gguf") or "model"
    return Path("out") / f"{name}-skip{len(skip.skipped)}-{quant.mode}"


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "edgekit": __version__}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "numpy", "tokenizers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if "tokenizer.json" not in copied:
        raise EdgekitError(
            f"{src} has no tokenizer.json; edgekit's runtime reads only the fast-tokenizer format "
            "(save one with transformers' AutoTokenizer.save_pretrained)"
        )
    return copied


def export(req: ExportRequest) -> ExportResult:
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    kv_format = req.quant.kv_format(req.flavour)  # refuses a quantized cache on the standard graph, up front
    resolved = resolve_model(req.model, allow_download=req.allow_download)
    ckpt = open_checkpoint(resolved.path, resolved.source_id, req.trust_remote_code, req.allow_pickle)
    skip = select_skip(ckpt, req.skip, req.skip_layers, req.calib, req.fill)
    context = recipe_context(req, ckpt.spec.max_context)
    if context < 2 or context > ckpt.spec.max_context:
        raise EdgekitError(f"--max-context {context}: must be between 2 and the model's {ckpt.spec.max_context}")
    target = req.output or default_output(resolved, skip, req.quant)
    memory = plan_target(req, ckpt, skip, context)  # refuses what the device's memory cannot hold
    export_memory = plan_export_memory(  # refuses what this machine's budget cannot hold, before writing
        ckpt.spec, skip, req.quant, memory.weights_bytes, req.max_memory, req.verify, req.verify_method
    )
    req = replace(req, quant=_resolved_int4(req, ckpt, export_memory.verify_method == "streaming"))
    seconds["load"] = time.perf_counter() - t0
    calibration = None
    # The standard graph refuses 4-bit weights itself (graph_standard.py): nothing to calibrate for it.
    if req.quant.bits == 4 and req.quant.int4_algo in NEEDS_CALIBRATION and req.flavour != "standard":
        if export_memory.verify_method == "streaming":
            raise EdgekitError(
                "--int4-algo gptq calibrates on the fp32 model, which does not fit this export's memory budget; "
                "use --int4-algo hqq (data-free)"
            )
        calibration = matmul_hessians(ckpt, skip, req.calib or default_calib(ckpt))
        seconds["calibrate"] = calibration.seconds
    kv_scales = None
    if kv_format.quantized and skip.kept:
        streamed = export_memory.verify_method == "streaming"
        kv_scales = calibrate_kv_scales(ckpt, skip, req.calib or default_calib(ckpt), kv_format.bits, streamed)
        seconds["calibrate_kv"] = kv_scales.seconds

    with bundle_writer(target, req.force) as tmp, RssWatch(req.max_memory) as rss:
        t = time.perf_counter()
        progress = _progress(ckpt.spec.num_layers, "export", req.progress)

        def on_layer(i: int) -> None:
            progress.update(1)
            rss.check(f"layer {i}")

        try:
            if req.flavour == "standard":
                contract, data_file = build_standard_decoder(
                    ckpt, skip, req.quant, tmp / "model.onnx", context, on_layer=on_layer
                )
            else:
                hessians = calibration.hessians if calibration else None
                contract, data_file = build_decoder(
                    ckpt,
                    skip,
                    req.quant,
                    tmp / "model.onnx",
                    context,
                    on_layer=on_layer,
                    hessians=hessians,
                    kv_scales=kv_scales,
                )
                del hessians
        finally:
            progress.close()
        rss.phase_done("build")
        seconds["build"] = time.perf_counter() - t
        tokenizer_files = _copy_tokenizer(ckpt.path, tmp)

        report: VerifyReport | None = None
        if req.verify:
            t = time.perf_counter()
            report = _verify(ckpt, skip, tmp, req, context, export_memory.verify_method)
            seconds["verify"] = time.perf_counter() - t
            rss.phase_done("verify")
            if not report.passed:
                raise EdgekitError(
                    f"verification failed: max |Δlogit| {report.max_abs_logit_diff:.3g} > tolerance "
                    f"{report.tolerance:.3g} (top-1 agreement {report.top1_agreement:.3f}); no bundle written"
                )
        # The gate's reference is the unskipped fp32 model: stream it when the memory plan says it won't fit.
        stream = (
            export_memory.verify_method == "streaming" or export_memory.full_verify_bytes > export_memory.budget_bytes
        )
        quality = _quality_gate(req, ckpt, skip, tmp, context, seconds, stream)
        model_bytes = sum(p.stat().st_size for p in tmp.glob("model.onnx*"))
        device_files = finish_target(tmp, req, ckpt, skip, contract, context)  # genai_config, .ort, fixed shapes
        seconds["total"] = time.perf_counter() - t0
        manifest = write_manifest(
            tmp,
            add_target(
                _manifest(req, resolved, ckpt, skip, contract, data_file, context, tokenizer_files, report, seconds)
                | ({"quality": quality} if quality else {})
                | ({"quantization_calibration": calibration.to_manifest()} if calibration else {})
                | ({"kv_cache_calibration": kv_scales.to_manifest()} if kv_scales else {})
                | (
                    {"warnings": warnings}
                    if (warnings := skip_warnings(skip, report, _suggester(ckpt, skip, req)))
                    else {}
                )
                | {
                    "export_memory": export_memory.to_manifest()
                    | {"peak_rss_bytes": rss.peak, "phase_peak_rss_bytes": rss.phases}
                },
                req,
                contract,
                memory,
                device_files,
                model_bytes,
            ),
        )
    return ExportResult(target, manifest, seconds)


# A last-N skip set costing more than this against the intact model gets a warning: on SmolLM2 the last 8
# cost x28 where a ranked 8 costs +40% (BENCHMARKS.md); the paper's rule must be checked per model.
LAST_N_WARN = 0.5
Suggest = Callable[[int], tuple[list[int], float, float]]  # N → (layers, their ppl, intact ppl), calibration text


def skip_warnings(skip: SkipSet, report: VerifyReport | None, suggest: Suggest | None = None) -> list[str]:
    """What the user should hear about the skip set before shipping the bundle."""
    if report is None or not report.ppl_unskipped_fp32 or not report.ppl_onnx or not skip.rule.startswith("last"):
        return []
    cost = report.ppl_onnx / report.ppl_unskipped_fp32 - 1
    if cost <= LAST_N_WARN:
        return []
    n = len(skip.skipped)
    text = (
        f"removing the attention of the last {n} layers costs {cost:+.0%} perplexity against the intact model "
        f"({report.ppl_onnx:.2f} vs {report.ppl_unskipped_fp32:.2f}); the paper's last-N rule does not hold for every "
        "model"
    )
    try:
        layers, ppl, intact = suggest(n) if suggest is not None else (None, 0.0, 0.0)
    except EdgekitError:  # e.g. too big to run in fp32: the warning still stands without a suggestion
        layers = None
    if layers is not None:
        text += (
            f": removing {','.join(map(str, layers))} instead costs {ppl / intact - 1:+.0%} on the calibration text "
            f"({ppl:.2f} vs {intact:.2f}, a quick cosine estimate); `--skip auto:{n}` measures the best set"
        )
    else:
        text += f": `edgekit analyze MODEL --n {n}` measures each layer, `--skip auto:{n}` removes the least important"
    return [text]


def _suggester(ckpt: Checkpoint, skip: SkipSet, req: ExportRequest) -> Suggest:
    return lambda n: suggest(ckpt, n, skip.fill.kind if skip.fill else "zero", req.calib)


def _quality_gate(
    req: ExportRequest,
    ckpt: Checkpoint,
    skip: SkipSet,
    folder: Path,
    context: int,
    seconds: dict[str, float],
    streaming: bool = False,
) -> dict[str, Any] | None:
    """Raises (so bundle_writer removes the folder) when the bundle's perplexity breaks the bound."""
    if req.max_ppl_increase is None:
        return None
    t = time.perf_counter()
    q = quality_gate(
        ckpt,
        list(skip.skipped),
        folder,
        req.calib or default_calib(ckpt),
        req.max_ppl_increase,
        context,
        req.quant.mode,
        max_tokens=req.calib_tokens,
        streaming=streaming,
    )
    seconds["quality"] = time.perf_counter() - t
    if not q.passed:
        raise EdgekitError(
            f"quality gate failed: bundle perplexity {q.ppl_bundle:.3f} is {q.increase:+.1%} over the unskipped fp32 "
            f"model's {q.ppl_reference:.3f} on {q.tokens} tokens of {q.text} (bound {q.max_increase:+.1%}); "
            "no bundle written"
        )
    return q.to_dict()


def _verify(
    ckpt: Checkpoint, skip: SkipSet, folder: Path, req: ExportRequest, context: int, method: str = "full"
) -> VerifyReport:
    from tokenizers import Tokenizer

    from edgekit.skip.surgery import apply_skip

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # verify holds only an all-float graph to PyTorch's logits exactly; a quantized cache is lossy like int8
    lossy_kv = req.quant.kv_format(req.flavour).quantized
    mode = f"{req.quant.mode}+kv-{req.quant.kv_cache}" if lossy_kv else req.quant.mode
    if method == "streaming":  # the fp32 model does not fit the memory budget: one layer at a time
        return verify_streaming(
            folder / "model.onnx",
            ckpt,
            skip,
            lambda s: tokenizer.encode(s).ids,
            mode,
            req.verify_text,
            context=min(context, 512),
        )
    encode = lambda s: tokenizer.encode(s).ids  # noqa: E731
    skipped = bool(skip.skipped)
    model = apply_skip(load_torch_model(ckpt), skip)
    report = verify(
        folder / "model.onnx",
        model,
        encode,
        mode,
        req.verify_text,
        context=min(context, 512),
        score_ppl=mode != "fp32" or skipped,
    )
    if skipped and req.verify_text is not None:  # the same tokens on the whole model, one fp32 model at a time
        del model
        gc.collect()
        report.ppl_unskipped_fp32 = unskipped_perplexity(
            load_torch_model(ckpt), encode, req.verify_text, context=min(context, 512)
        )
    return report


def _manifest(
    req: ExportRequest,
    resolved: ResolvedModel,
    ckpt: Checkpoint,
    skip: SkipSet,
    contract: Any,
    data_file: str | None,
    context: int,
    tokenizer_files: list[str],
    report: VerifyReport | None,
    seconds: dict[str, float],
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": resolved.source_id, "family": ckpt.family.name},
        "source": {
            "id": resolved.source_id,
            "resolved_from": resolved.how,
            "config_sha256": ckpt.config_sha256,
            "architecture": (getattr(ckpt.config, "architectures", None) or ["?"])[0],
            "model_type": ckpt.config.model_type,
            **ckpt.source,
        },
        "architecture": ckpt.spec.to_manifest(context),
        "skip": skip.to_manifest(),
        "graph": graph_manifest(contract, data_file),
        "quantization": req.quant.to_manifest(shares_table(req.quant, ckpt.spec.tie_embeddings, ckpt.spec.hidden)),
        "tokenizer": {"files": tokenizer_files},
        "verification": report.to_dict() if report else None,
        "packages": package_versions(),
        "command": req.command or " ".join(sys.argv),
        "timings_s": {k: round(v, 3) for k, v in seconds.items()},
    }


class _NoProgress:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="layer", file=sys.stderr, leave=False)
