"""What `eval` scores: an exported bundle (onnxruntime) or a PyTorch checkpoint with a skip set applied,
behind one small interface so every metric is computed the same way for both.

A user judges a skip set on the checkpoint before spending an export on it, then checks the bundle;
the fp32 numbers of the two agree to float rounding because both go through `Scorer.logits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.bundle import MANIFEST, open_bundle
from edgekit.errors import EdgekitError


@dataclass
class Scorer:
    """Base: tokenizer plus `logits(ids) → [len, vocab]` for one sequence; subclasses fill `logits`."""

    name: str
    kind: str  # "bundle" | "checkpoint"
    tokenizer: Any = field(repr=False)
    max_context: int
    vocab: int
    skipped: list[int]
    num_layers: int
    quant: str
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def logits(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError

    def generate(self, ids: list[int], max_new_tokens: int, stop: list[str] | None = None) -> list[int]:
        """Greedy continuation, recomputing the window each step (subclasses may use a KV cache)."""
        out: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(self.logits((ids + out)[-self.max_context :])[-1].argmax())
            out.append(tok)
            if self._stops(out, tok, stop):
                break
        return out

    def _stops(self, out: list[int], tok: int, stop: list[str] | None) -> bool:
        if tok in self.eos_token_ids:
            return True
        return bool(stop) and any(s in self.decode(out) for s in stop)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "kind": self.kind,
            "quant": self.quant,
            "skipped": self.skipped,
            "num_layers": self.num_layers,
            "max_context": self.max_context,
        }


class BundleScorer(Scorer):
    session: Any

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.session.logits(ids)

    def generate(self, ids: list[int], max_new_tokens: int, stop: list[str] | None = None) -> list[int]:
        ids = ids[-(self.max_context - max_new_tokens) :] if len(ids) + max_new_tokens > self.max_context else ids
        logits, cache = self.session.forward(np.asarray([ids]))
        out: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            if self._stops(out, tok, stop) or cache.length + 1 >= self.max_context:
                break
            logits, cache = self.session.forward(np.asarray([[tok]]), cache)
        return out


class TorchScorer(Scorer):
    model: Any

    def logits(self, ids: list[int]) -> np.ndarray:
        from edgekit.surgery import full_logits

        return full_logits(self.model, ids).numpy()


def _tokenizer(folder: Path) -> Any:
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise EdgekitError(f"{folder} has no tokenizer.json; edgekit evaluates only fast-tokenizer models")
    return Tokenizer.from_file(str(path))


def is_bundle(target: str | Path) -> bool:
    return (Path(target).expanduser() / MANIFEST).is_file()


def set_threads(threads: int | None) -> Any:
    """onnxruntime session options for `threads` intra-op threads, and the same for torch (process-wide).

    None keeps each library's default (all cores). Small models on a busy machine run several times
    faster on one thread: their matrices are too small to share, and spinning worker threads lose
    their cores to other processes."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        import torch

        torch.set_num_threads(threads)
    return options


def open_bundle_scorer(
    path: str | Path, check_integrity: bool = True, model_file: str | None = None, threads: int | None = None
) -> BundleScorer:
    from edgekit.session import DecoderSession

    b = open_bundle(Path(path).expanduser(), check_integrity_first=check_integrity)
    m = b.manifest
    arch = m["architecture"]
    s = BundleScorer(
        name=str(path),
        kind="bundle",
        tokenizer=_tokenizer(b.path),
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
    from edgekit.session import DecoderSession

    s = BundleScorer(
        name=str(tokenizer_folder),
        kind="bundle",
        tokenizer=_tokenizer(tokenizer_folder),
        max_context=context,
        vocab=spec.vocab,
        skipped=skipped,
        num_layers=spec.num_layers,
        quant=quant,
        bos_token_id=spec.bos_token_id,
        eos_token_ids=tuple(spec.eos_token_ids),
    )
    s.session = DecoderSession(model_file)
    return s


def open_folder_scorer(folder: Path, ckpt: Any, model: Any, name: str, skipped: list[int]) -> TorchScorer:
    """A scorer over an already-loaded torch model (the export's quality gate uses this)."""
    spec = ckpt.spec
    s = TorchScorer(
        name=name,
        kind="checkpoint",
        tokenizer=_tokenizer(folder),
        max_context=spec.max_context,
        vocab=spec.vocab,
        skipped=skipped,
        num_layers=spec.num_layers,
        quant="fp32",
        bos_token_id=spec.bos_token_id,
        eos_token_ids=tuple(spec.eos_token_ids),
    )
    s.model = model
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
) -> TorchScorer:
    """streaming: hold one layer at a time (see eval_streaming); None: when fp32 would not fit in memory."""
    # Lazy: export imports the quality gate, which imports this module.
    from edgekit.export import ExportRequest, choose_skip
    from edgekit.load import load_torch_model, open_checkpoint
    from edgekit.resolve import resolve_model
    from edgekit.surgery import apply_skip

    set_threads(threads)
    resolved = resolve_model(model, allow_download=allow_download)
    ckpt = open_checkpoint(resolved.path, resolved.source_id, trust_remote_code, allow_pickle)
    skipset = choose_skip(ExportRequest(model=model, skip=skip, skip_layers=skip_layers, calib=calib), ckpt)
    from edgekit.eval_streaming import should_stream, streaming_scorer

    if streaming or (streaming is None and should_stream(ckpt)):
        return streaming_scorer(ckpt, skipset, resolved.source_id)
    torch_model = apply_skip(load_torch_model(ckpt), skipset)
    return open_folder_scorer(ckpt.path, ckpt, torch_model, resolved.source_id, list(skipset.skipped))


def open_scorer(
    target: str,
    skip: int | str | None = None,
    skip_layers: str | None = None,
    check_integrity: bool = True,
    allow_download: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    threads: int | None = None,
    streaming: bool | None = None,
    calib: Path | None = None,
) -> Scorer:
    """A bundle folder (has edgekit.json) or anything `export` accepts as MODEL."""
    if is_bundle(target):
        if skip is not None or skip_layers is not None or calib is not None:
            raise EdgekitError(
                f"{target} is a bundle: its skip set was fixed at export; drop --skip/--skip-layers/--calib"
            )
        return open_bundle_scorer(target, check_integrity, threads=threads)
    return open_checkpoint_scorer(
        target, skip, skip_layers, allow_download, trust_remote_code, allow_pickle, threads, streaming, calib
    )
