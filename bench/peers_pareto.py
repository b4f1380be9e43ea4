"""Speed against quality for the peers measured on real weights (bench/peers.py, SmolLM2): decode ms/token
against WikiText-2 perplexity, one panel per context length, the Pareto front drawn through the contenders
nothing else beats on both (faster and lower perplexity). File size is the marker's area.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers_report import ppl as perplexity_of

OFF_CHART = 1.6  # perplexity beyond this multiple of the best is listed, not plotted
COLORS = {"edgekit": "#1f77b4", "optimum": "#7f7f7f", "genai": "#ff7f0e", "llama.cpp": "#2ca02c"}


def points(m: dict[str, Any], prompt_len: int) -> list[tuple[str, str, float, float, int]]:
    """(name, tool, decode ms, perplexity, file bytes) of every contender timed and scored."""
    out = []
    for c in m["contenders"]:
        ppl = perplexity_of(c)
        at = next((s for s in c.get("summary", []) if s["prompt_len"] == prompt_len), None)
        if ppl and at:
            out.append((c["name"], c["tool"], at["decode_ms"], ppl, c["build"].get("file_bytes", 0)))
    return out


def pareto_front(pts: list[tuple[str, str, float, float, int]]) -> list[tuple[str, str, float, float, int]]:
    """The points no other point beats on both speed and perplexity, fastest first."""
    front, best = [], float("inf")
    for p in sorted(pts, key=lambda p: (p[2], p[3])):
        if p[3] < best:
            front.append(p)
            best = p[3]
    return front


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [(k, m) for k, m in results["models"].items() if points(m, m["prompt_lens"][0])]
    if not models:
        return
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 5.5 * len(models)), squeeze=False)
    for row, (model, m) in enumerate(models):
        for col, n in enumerate((m["prompt_lens"][0], m["prompt_lens"][-1])):
            ax, pts = axes[row][col], points(m, n)
            # a far outlier (optimum's dynamic int8 on SmolLM2) would squash every other point into one line
            best = min(p[3] for p in pts)
            shown = [p for p in pts if p[3] <= OFF_CHART * best]
            for k, (name, tool, ms, ppl, size) in enumerate(sorted(shown, key=lambda p: (p[3], p[2]))):
                ax.scatter(ms, ppl, s=max(size / 1e6, 8), color=COLORS[tool], alpha=0.6, edgecolor="black")
                label = name.replace(" skip0", "").replace(" (the shipped GGUF)", " (shipped)")
                ax.annotate(label, (ms, ppl), fontsize=7, xytext=(5, -9 if k % 2 else 4), textcoords="offset points")
            front = pareto_front(shown)
            ax.step([p[2] for p in front], [p[3] for p in front], where="post", color="black", linewidth=0.8,
                    linestyle="--", label="Pareto front")  # fmt: skip
            for tool, color in COLORS.items():
                ax.scatter([], [], color=color, label=tool)
            off = [f"{p[0]} ({p[3]:.0f})" for p in pts if p not in shown]
            if off:
                ax.text(0.99, 0.02, "off the chart: " + ", ".join(off), transform=ax.transAxes, ha="right",
                        va="bottom", fontsize=7)  # fmt: skip
            ax.set_xlabel(f"decode ms/token after {n} tokens (lower is better)")
            ax.set_ylabel("WikiText-2 perplexity, 4 × 1,024 held-out tokens (lower is better)")
            ax.set_title(f"{model}: speed vs quality, {results['settings']['threads']} threads (area: file size)")
            ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
