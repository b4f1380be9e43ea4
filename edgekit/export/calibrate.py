"""Calibration for the quantizers that need data (GPTQ): the Hessian of every MatMul's inputs on `--calib` text.

The inputs are taken from the PyTorch reference with the skip set and its fill already applied: the
bundle's MatMuls see the stream of the skipped model, so that is what their rounding should fit. Keyed by
the graph builder's linear names (graph.py), so the builder finds each weight's Hessian as it emits it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.export.heads import pad_heads, padded_head_dim
from edgekit.export.int4 import InputHessian

# GPTQ's reference setting is 128 sequences of 2,048 tokens. 4,096 tokens (more than the widest K, 1,536 on
# SmolLM2) took 24 s there and gave +7.4% perplexity; more tokens were not measured.
DEFAULT_CALIB_TOKENS = 4096
CALIB_WINDOW = 512


@dataclass
class Calibration:
    hessians: dict[str, np.ndarray]  # graph linear name → [K, K] float32
    text: str
    tokens: int
    seconds: float

    def to_manifest(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "matmuls": len(self.hessians),
            "seconds": round(self.seconds, 1),
        }


def _linear_names(ckpt: Any, i: int) -> dict[str, list[str]]:
    """HF module path → the graph linear names whose input it sees."""
    names, p = ckpt.family.names, f"/model/layers.{i}"

    def module(template: str) -> str:
        return template.format(i=i, p="weight").removesuffix(".weight")

    return {
        # q, k and v read the same input: one Hessian for the packed projection or its q/k and v halves
        module(names.q): [f"{p}/attn/qkv_proj", f"{p}/attn/qk_proj", f"{p}/attn/v_proj"],
        module(names.o): [f"{p}/attn/o_proj"],
        module(names.gate): [f"{p}/mlp/gate_proj", f"{p}/mlp/up_proj"],
        module(names.down): [f"{p}/mlp/down_proj"],
    }


def matmul_hessians(ckpt: Any, skip: Any, calib: Path, tokens: int = DEFAULT_CALIB_TOKENS) -> Calibration:
    """Run the skipped fp32 model over `tokens` of `calib` and collect each MatMul input's Hessian."""
    import torch
    from tokenizers import Tokenizer

    from edgekit.checkpoint.load import load_torch_model
    from edgekit.quality.analyze import calibration_chunks
    from edgekit.quality.streaming import should_stream
    from edgekit.skip.surgery import apply_skip

    if should_stream(ckpt):
        raise EdgekitError(
            f"--int4-algo gptq calibrates on the fp32 model, and {ckpt.source_id} does not fit in memory in fp32; "
            "use --int4-algo hqq (data-free)"
        )
    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_file(str(Path(ckpt.path) / "tokenizer.json"))
    window = min(ckpt.spec.max_context, CALIB_WINDOW)
    chunks, _ = calibration_chunks(lambda s: tokenizer.encode(s).ids, calib, tokens, window)
    model = apply_skip(load_torch_model(ckpt), skip)
    targets: dict[str, list[str]] = {}
    for i in range(ckpt.spec.num_layers):
        for path, graph_names in _linear_names(ckpt, i).items():
            if i in skip.skipped and "/attn/" in graph_names[0]:
                continue
            targets[path] = graph_names
    targets[ckpt.family.names.lm_head.removesuffix(".weight")] = ["/lm_head"]
    sums = {path: InputHessian() for path in targets}
    modules = dict(model.named_modules())
    missing = [p for p in targets if p not in modules]
    if missing:
        raise EdgekitError(f"calibration: the model has no module {missing[0]}")

    def keep(path: str):
        def hook(_mod: Any, args: tuple, _out: Any) -> None:
            # xᵀx in float32 by torch: 4x faster than numpy's float64 here, and the Hessian is damped by 1%
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            x = x * (x.shape[1] ** 0.5 / x.norm(dim=1, keepdim=True).clamp_min(1e-30))  # InputHessian.per_token
            sums[path].add_gram((x.T @ x).double().numpy())

        return hook

    handles = [modules[p].register_forward_hook(keep(p)) for p in targets]
    try:
        with torch.no_grad():
            for chunk in chunks:
                model(input_ids=torch.tensor([chunk]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    del model
    spec, hd = ckpt.spec, padded_head_dim(ckpt.spec.head_dim)
    hessians: dict[str, np.ndarray] = {}
    for path, graph_names in targets.items():
        # kept in float32 until used: 1.1B-shaped Hessians take 3.3 GB so, 6.5 GB in float64
        h = sums.pop(path).value.astype(np.float32)
        if graph_names[0].endswith("/o_proj") and hd != spec.head_dim:  # the graph's o_proj reads padded heads
            h = pad_heads(pad_heads(h, spec.heads, spec.head_dim, 0), spec.heads, spec.head_dim, 1)
        for name in graph_names:
            hessians[name] = h
    return Calibration(hessians, Path(calib).name, sum(len(c) for c in chunks), time.perf_counter() - t0)
