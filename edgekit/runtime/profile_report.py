"""The profile report as a table a person reads; bench/ and `edgekit profile` print the same one."""

from __future__ import annotations

from typing import Any

from edgekit.runtime.profile import ProfileReport, Stat


def _mb(n: float) -> str:
    return f"{n / 1024**2:.1f} MB" if n < 1024**3 else f"{n / 1024**3:.2f} GB"


def _pm(s: Stat, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(s.median)} ±{100 * s.spread / 2:.0f}%"


def _x(s: Stat) -> str:
    return f"{s.median:.2f}× [{s.min:.2f}–{s.max:.2f}]"


def format_report(report: ProfileReport) -> str:
    st = report.settings
    lines = [
        f"{report.machine['cpu']}, {report.machine['logical_cpus']} logical CPUs, onnxruntime "
        f"{report.machine['onnxruntime']}; provider {st['provider']}, threads {st['threads'] or 'default'}; "
        f"{st['runs']} runs ({st['order']}, one process each), {st['warmup_steps']} warm-up + {st['gen_len']} "
        "timed decode steps; median ±half the min–max spread",
        "",
    ]
    for k, b in enumerate(report.bundles):
        tag = chr(ord("A") + k) if k < 26 else str(k)
        lines.append(
            f"{tag}: {b.label}  [{b.quant}, attention in {b.kept_layers}/{b.num_layers} layers, threads {b.threads}]"
        )
        lines.append(
            f"   size {_mb(b.model_bytes)}, KV {b.kv_bytes_per_token / 1024:.1f} KB/token = "
            f"{_mb(b.kv_bytes_max_context)} at {b.max_context}, load {_pm(b.load_s)} s, "
            f"peak RSS {_mb(b.peak_rss_bytes.median)}, placement {_placement(b.placement)}"
        )
    header = f"{'':3}{'prompt':>7}  {'first token ms':>16}  {'prefill tok/s':>16}  {'decode ms/tok':>16}  "
    header += f"{'p90 ms':>9}  {'tok/s':>14}  {'CPU ms/tok':>10}"
    lines += ["", header]
    for k, b in enumerate(report.bundles):
        tag = chr(ord("A") + k) if k < 26 else str(k)
        for s in b.settings:
            lines.append(
                f"{tag:3}{s.prompt_len:>7}  {_pm(s.ttft_ms, '{:.1f}'):>16}  "
                f"{_pm(s.prefill_tokens_per_s, '{:.0f}'):>16}  "
                f"{_pm(s.decode_ms_median, '{:.2f}'):>16}  {s.decode_ms_p90.median:>9.2f}  "
                f"{_pm(s.decode_tokens_per_s, '{:.1f}'):>14}  {s.decode_cpu_ms_median.median:>10.2f}"
            )
    if report.ratios:
        lines += [
            "",
            "ratios over paired runs, median [min–max]: speedup > 1 is faster than A; size ratios < 1 are smaller",
            f"{'':7}{'prompt':>7}  {'first-token speedup':>20}  {'decode speedup':>20}  {'p90':>6}  "
            f"{'KV cache':>8}  {'model size':>10}  {'peak RSS':>8}  {'CPU-time: first token':>21}  {'decode':>6}",
        ]
        for r in report.ratios:
            tag = chr(ord("A") + next(i for i, b in enumerate(report.bundles) if b.label == r.other))
            lines.append(
                f"{tag + ' vs A':7}{r.prompt_len:>7}  {_x(r.ttft_speedup):>20}  {_x(r.decode_speedup):>20}  "
                f"{r.decode_p90_speedup.median:>5.2f}×  {r.kv_bytes_ratio:>7.2f}×  {r.model_bytes_ratio:>9.2f}×  "
                f"{r.peak_rss_ratio.median:>7.2f}×  {r.ttft_cpu_speedup.median:>20.2f}×  "
                f"{r.decode_cpu_speedup.median:>5.2f}×"
            )
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def _placement(p: dict[str, Any]) -> str:
    nodes = p.get("nodes") or {}
    if not nodes:
        return "not recorded"
    parts = ", ".join(f"{k.removesuffix('ExecutionProvider')} {v}" for k, v in nodes.items())
    return parts + (f" ({p['cpu_fallback']} fell back to CPU)" if p.get("cpu_fallback") else "")
