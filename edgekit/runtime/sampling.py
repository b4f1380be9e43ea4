"""Generation settings and the sampler: greedy, or temperature → top-k → top-p from one seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekit.errors import EdgekitError


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise EdgekitError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise EdgekitError(f"--temperature {self.temperature}: must be 0 (greedy) or positive")
        if self.top_k < 0:
            raise EdgekitError(f"--top-k {self.top_k}: must be 0 (off) or positive")
        if not 0 < self.top_p <= 1:
            raise EdgekitError(f"--top-p {self.top_p}: must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """Greedy, or temperature → top-k → top-p sampling from one seeded generator."""

    def __init__(self, config: GenerationConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        c = self.config
        if c.greedy:
            return int(np.argmax(logits))
        x = logits.astype(np.float64) / c.temperature
        ids = np.arange(x.shape[0])
        if 0 < c.top_k < x.shape[0]:
            ids = np.argpartition(-x, c.top_k - 1)[: c.top_k]
        order = ids[np.argsort(-x[ids], kind="stable")]
        p = np.exp(x[order] - x[order[0]])
        p /= p.sum()
        if c.top_p < 1.0:
            # the smallest prefix whose mass reaches top_p (the top token always stays)
            keep = int(np.searchsorted(np.cumsum(p), c.top_p)) + 1
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(order[self.rng.choice(len(order), p=p)])
