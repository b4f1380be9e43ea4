"""Open what `eval` and the export's quality gate score: a bundle folder, a graph file in the making, or
a checkpoint (loaded whole, or streamed one layer at a time when its fp32 weights do not fit).

A user judges a skip set on the checkpoint before spending an export on it, then checks the bundle;
the fp32 numbers of the two agree to float rounding because both go through `Scorer.logits`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from edgekit.bundle.folder import MANIFEST, open_bundle
from edgekit.checkpoint.load import load_torch_model, open_checkpoint
from edgekit.checkpoint.resolve import resolve_model
from edgekit.errors import EdgekitError
from edgekit.quality.choose import select_skip
from edgekit.quality.scorers import BundleScorer, Scorer, TorchScorer, load_tokenizer
from edgekit.quality.streaming import StreamingScorer, should_stream
from edgekit.runtime.session import DecoderSession
from edgekit.skip.streaming import StreamingModel

S = TypeVar("S", bound=Scorer)


def is_bundle(target: str | Path) -> bool:
    return (Path(target).expanduser() / MANIFEST).is_file()


def set_threads(threads: int | None) -> Any:
    """onnxruntime session options for `threads` intra-op threads, and the same for torch (process-wide).

    None keeps each library's default (all cores). Small models on a busy machine run several times
    faster on one thread: their matrices are too small to share, and spinning worker threads lose
    their cores to other processes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # onnxruntime warns that `logits_to_keep` (an input with a default) is not a constant: expected
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        import torch

        torch.set_num_threads(threads)
    return options


def _from_spec(
    cls: type[S], name: str, kind: str, folder: Path, spec: Any, context: int, skipped: list[int], quant: str
) -> S:
    """A scorer whose facts come from a checkpoint's ModelSpec (no manifest to read them from)."""
    return cls(
        name=name,
        kind=kind,
        tokenizer=load_tokenizer(folder),
        max_context=context,
        vocab=spec.vocab,
        skipped=skipped,
        num_layers=spec.num_layers,
        quant=quant,
        bos_token_id=spec.bos_token_id,
        eos_token_ids=tuple(spec.eos_token_ids),
    )


def open_bundle_scorer(
    path: str | Path, check_integrity: bool = True, model_file: str | None = None, threads: int | None = None
) -> BundleScorer:
    b = open_bundle(Path(path).expanduser(), check_integrity_first=check_integrity)
    m = b.manifest
    arch = m["architecture"]
    s = BundleScorer(
        name=str(path),
        kind="bundle",
        tokenizer=load_tokenizer(b.path),
        max_context=int(arch["max_context"]),
        vocab=int(arch["vocab_size"]),
        skipped=list(m["skip"]["skipped"]),
        num_layers=int(arch["num_layers"]),
        quant=str(m["quantization"].get("mode", "?")),
        bos_token_id=arch.get("bos_token_id"),
        eos_token_ids=tuple(arch.get("eos_token_ids") or ()),
    )
    s.session = DecoderSession(b.path / (model_file or m["graph"]["file"]), options=set_threads(threads))
    return s


def graph_scorer(
    model_file: Path, tokenizer_folder: Path, spec: Any, context: int, quant: str, skipped: list[int]
) -> BundleScorer:
    """A scorer over a graph file plus the checkpoint's facts (the export's quality gate: no manifest yet)."""
    s = _from_spec(BundleScorer, str(tokenizer_folder), "bundle", tokenizer_folder, spec, context, skipped, quant)
    s.session = DecoderSession(model_file)
    return s


def open_folder_scorer(folder: Path, ckpt: Any, model: Any, name: str, skipped: list[int]) -> TorchScorer:
    """A scorer over an already-loaded torch model (the export's quality gate uses this)."""
    s = _from_spec(TorchScorer, name, "checkpoint", folder, ckpt.spec, ckpt.spec.max_context, skipped, "fp32")
    s.model = model
    return s


def streaming_scorer(ckpt: Any, skipset: Any, name: str) -> StreamingScorer:
    spec = ckpt.spec
    skipped = list(skipset.skipped)
    s = _from_spec(StreamingScorer, name, "checkpoint", ckpt.path, spec, spec.max_context, skipped, "fp32 (streamed)")
    s.model = StreamingModel(ckpt, skipset)
    return s


def open_checkpoint_scorer(
    model: str,
    skip: int | str | None = None,
    skip_layers: str | None = None,
    allow_download: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    threads: int | None = None,
    streaming: bool | None = None,
    calib: Path | None = None,
    fill: str | None = None,
) -> TorchScorer:
    """streaming: hold one layer at a time (see quality/streaming.py); None: when fp32 would not fit in memory."""

    set_threads(threads)
    resolved = resolve_model(model, allow_download=allow_download)
    ckpt = open_checkpoint(resolved.path, resolved.source_id, trust_remote_code, allow_pickle)
    skipset = select_skip(ckpt, skip, skip_layers, calib, fill)
    if streaming or (streaming is None and should_stream(ckpt)):
        return streaming_scorer(ckpt, skipset, resolved.source_id)
    from edgekit.skip.surgery import apply_skip  # imports torch: scoring a bundle must not pay for it

    torch_model = apply_skip(load_torch_model(ckpt), skipset)
    return open_folder_scorer(ckpt.path, ckpt, torch_model, resolved.source_id, list(skipset.skipped))


def open_scorer(
    target: str,
    skip: int | str | None = None,
    skip_layers: str | None = None,
    check_integrity: bool = True,
    threads: int | None = None,
    **checkpoint: Any,
) -> Scorer:
    """A bundle folder (has edgekit.json) or anything `export` accepts as MODEL; `checkpoint` holds
    open_checkpoint_scorer's other options (allow_download, trust_remote_code, allow_pickle, streaming,
    calib, fill), which a bundle refuses where they would change it."""
    if is_bundle(target):
        if skip is not None or skip_layers is not None or checkpoint.get("calib") or checkpoint.get("fill") is not None:
            raise EdgekitError(
                f"{target} is a bundle: its skip set was fixed at export; drop --skip/--skip-layers/--calib/--fill"
            )
        return open_bundle_scorer(target, check_integrity, threads=threads)
    return open_checkpoint_scorer(target, skip, skip_layers, threads=threads, **checkpoint)
