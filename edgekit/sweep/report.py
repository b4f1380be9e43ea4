"""A sweep's results as CSV, JSON, a Markdown/HTML report and a Pareto plot.

Pareto-optimal means no other configuration is at least as good on both axes and better on one:
lower perplexity and lower decode ms/token (or smaller bundle). Those are the configurations worth
shipping; every other one is beaten by one of them.
"""

from __future__ import annotations

import csv
import html
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

COLUMNS = [
    "name",
    "status",
    "rule",
    "n",
    "quant",
    "skipped",
    "perplexity",
    "ppl_ci95",
    "ppl_tokens",
    "decode_ms",
    "decode_ms_p90",
    "decode_cpu_ms",
    "ttft_ms",
    "prefill_tokens_per_s",
    "bundle_bytes",
    "model_bytes",
    "kv_bytes_per_token",
    "peak_rss_bytes",
    "parity_max_abs_logit_diff",
    "parity_top1",
    "pareto_speed",
    "pareto_size",
    "stage",
    "error",
]


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (x, y), both to be minimized: is no other point at least as good on both and better on one?"""
    out = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def mark_pareto(rows: list[dict[str, Any]]) -> None:
    ok = [r for r in rows if r.get("status") == "ok"]
    for key, flag in (("decode_ms", "pareto_speed"), ("bundle_bytes", "pareto_size")):
        for r, on in zip(ok, pareto_front([(r[key], r["perplexity"]) for r in ok]), strict=True):
            r[flag] = on
    for r in rows:
        if r.get("status") != "ok":
            r["pareto_speed"] = r["pareto_size"] = False


def _cell(v: Any) -> Any:
    if isinstance(v, list):
        return " ".join(str(x) for x in v) if not v or not isinstance(v[0], float) else " ".join(f"{x:.4g}" for x in v)
    return v


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _cell(r.get(k)) for k in COLUMNS})


def plot_pareto(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None
    markers = {"fp32": "o", "fp16": "D", "int8": "s", "int4": "^"}
    colors = {"none": "black", "last": "tab:blue", "auto": "tab:orange"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, flag, label, scale in (
        (axes[0], "decode_ms", "pareto_speed", "decode ms/token (median)", 1.0),
        (axes[1], "bundle_bytes", "pareto_size", "bundle size (KB)", 1 / 1024),
    ):
        for r in ok:
            ax.scatter(
                r[key] * scale,
                r["perplexity"],
                marker=markers.get(r["quant"], "o"),
                c=colors.get(r["rule"], "gray"),
                s=90 if r[flag] else 40,
                edgecolors="red" if r[flag] else "none",
                linewidths=1.6,
                zorder=3,
            )
        # Label only the front (the rest is in the table); configs that removed the same layers share a label.
        labels: dict[tuple, list[str]] = {}
        for r in ok:
            if r[flag]:
                labels.setdefault((r[key] * scale, r["perplexity"]), []).append(r["name"])
        for (x, y), names in labels.items():
            ax.annotate(" = ".join(names), (x, y), fontsize=7, xytext=(5, 4), textcoords="offset points")
        front = sorted((r[key] * scale, r["perplexity"]) for r in ok if r[flag])
        if len(front) > 1:
            ax.step(*zip(*front, strict=True), where="post", color="red", lw=0.8, alpha=0.6, zorder=2)
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    quants = {r["quant"] for r in ok}
    handles = [Line2D([], [], ls="", marker=m, color="gray", label=q) for q, m in markers.items() if q in quants]
    handles += [Line2D([], [], ls="", marker="o", color=c, label=f"skip rule: {k}") for k, c in colors.items()]
    handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="red", label="Pareto-optimal"))
    axes[1].legend(handles=handles, fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curve(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """The paper's curve: perplexity and decode ms/token against the number of attention sublayers removed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = {"last": "-", "auto": "--"}
    colors = {"fp32": "tab:blue", "fp16": "tab:purple", "int8": "tab:green", "int4": "tab:red"}
    for quant in dict.fromkeys(r["quant"] for r in ok):
        for rule, ls in styles.items():
            pts = sorted((r["n"], r) for r in ok if r["quant"] == quant and r["rule"] in (rule, "none"))
            if len(pts) < 2 or not any(r["rule"] == rule for _, r in pts):
                continue
            xs = [n for n, _ in pts]
            label = f"{quant} {rule}-N"
            style = {"ls": ls, "marker": "o" if rule == "last" else "x", "color": colors.get(quant), "label": label}
            axes[0].plot(xs, [r["perplexity"] for _, r in pts], **style)
            axes[1].plot(xs, [r["decode_ms"] for _, r in pts], **style)
    axes[0].set_yscale("log")
    for ax, y in ((axes[0], "perplexity"), (axes[1], "decode ms/token (median)")):
        ax.set_xlabel("attention sublayers removed (N)")
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _comparison(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: last-N against auto:N for the same N and quantization."""
    by = {(r["quant"], r["rule"], r["n"]): r for r in rows if r.get("status") == "ok"}
    out = []
    for (quant, rule, n), auto in by.items():
        last = by.get((quant, "last", n))
        if rule != "auto" or last is None:
            continue
        base = by.get((quant, "none", 0))
        same = auto["skipped"] == last["skipped"]
        change = auto["perplexity"] / last["perplexity"] - 1
        speed = f"{base['decode_ms'] / last['decode_ms']:.2f}×" if base else ""
        out.append(
            f"| {quant} | {n} | {','.join(map(str, last['skipped']))} | {last['perplexity']:.3f} | "
            f"{','.join(map(str, auto['skipped']))} | {auto['perplexity']:.3f} | "
            + ("same layers |" if same else f"{change:+.1%} |")
            + f" {speed} |"
        )
    if not out:
        return []
    return [
        "## last-N against auto:N",
        "",
        "| quant | N | last-N removes | perplexity | auto:N removes | perplexity | auto vs last | "
        "decode speed-up of last-N over skip 0 |",
        "|---|---|---|---|---|---|---|---|",
        *out,
        "",
    ]


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _table(rows: list[dict[str, Any]]) -> list[list[str]]:
    head = ["config", "skipped layers", "quant", "perplexity (95% CI)", "decode ms/token", "CPU ms/token", "bundle KB"]
    head.append("Pareto")
    out = [head]
    for r in rows:
        if r.get("status") != "ok":
            out.append([r["name"], "", r["quant"], f"FAILED ({r.get('stage')}): {r.get('error', '')}", "", "", "", ""])
            continue
        lo, hi = r["ppl_ci95"]
        pareto = [k for k, f in (("speed", "pareto_speed"), ("size", "pareto_size")) if r.get(f)]
        out.append(
            [
                r["name"],
                ",".join(map(str, r["skipped"])) or "-",
                r["quant"],
                f"{r['perplexity']:.3f} ({lo:.2f}-{hi:.2f})",
                f"{r['decode_ms']:.3f} ({r['decode_ms_min']:.3f}-{r['decode_ms_max']:.3f})",
                _fmt(r.get("decode_cpu_ms"), ".3f"),
                f"{r['bundle_bytes'] / 1024:.0f}",
                " + ".join(pareto),
            ]
        )
    return out


def write_report(req: Any, rows: list[dict[str, Any]]) -> Path:
    out = Path(req.output)
    mark_pareto(rows)
    write_csv(rows, out / "results.csv")
    (out / "results.json").write_text(json.dumps(rows, indent=2, default=str), encoding="utf-8")
    ok = [r for r in rows if r.get("status") == "ok"]
    text = ok[0]["eval_text"] if ok else "-"
    title = f"{req.model}: perplexity on {text} vs decode speed and size"
    plot = plot_pareto(rows, out / "pareto.png", title)
    curve = plot_curve(rows, out / "curve.png", f"{req.model}: what removing attention sublayers costs and buys")
    machine = next((r.get("machine") for r in ok if r.get("machine")), None) or platform.processor() or "?"
    table = _table(rows)
    loads = [r["load_average"] for r in ok if r.get("load_average") is not None]
    load = f" Load average while profiling: {min(loads):.1f}-{max(loads):.1f}." if loads else ""
    md = [
        f"# Sweep: {req.model}",
        "",
        f"Command: `{req.command}`" if req.command else "",
        "",
        f"Written {datetime.now(timezone.utc).isoformat(timespec='seconds')} on {machine} "
        f"({platform.machine()}). Perplexity: `edgekit eval` on {text}"
        + (f" (first {req.max_tokens} tokens)" if req.max_tokens else "")
        + f"; speed: `edgekit profile`, prompt {req.prompt_len} tokens, {req.gen_len} decode steps, "
        f"{req.runs} runs (median, with min-max), profiled one at a time. Rule `last` = the last N layers' "
        "attention removed (arXiv 2404.05741), `auto` = the N least important by `edgekit analyze` "
        "(arXiv 2406.15786, greedy). Pareto: no other configuration has both lower perplexity and lower "
        "ms/token (speed) or smaller bundle (size)." + load,
        "",
        "| " + " | ".join(table[0]) + " |",
        "|" + "---|" * len(table[0]),
        *("| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table[1:]),
        "",
        "![Pareto plot](pareto.png)" if plot else "(no configuration finished: no plot)",
        "",
        *_comparison(rows),
        *(["![Perplexity and speed against N](curve.png)", ""] if curve else []),
        "Every number per configuration: `results.csv`, `results.json`, `results/*.json`.",
        "",
    ]
    report = out / "report.md"
    report.write_text("\n".join(md) + "\n", encoding="utf-8")
    cells = "".join(
        "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{html.escape(c)}</{'th' if i == 0 else 'td'}>" for c in row)
        for i, row in enumerate(table)
    )
    (out / "report.html").write_text(
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<h1>{html.escape(title)}</h1><p><code>{html.escape(req.command)}</code></p>"
        f"<table border=1 cellpadding=4>{cells}</table>"
        + ('<p><img src="pareto.png"></p>' if plot else "")
        + ('<p><img src="curve.png"></p>' if curve else ""),
        encoding="utf-8",
    )
    return report
