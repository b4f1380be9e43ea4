"""Summaries of bench/peers.py: medians, the bandwidth roofline, the markdown table, the goal ratios, the plot.

Roofline: at batch 1 a decode step reads every weight once except the embedding table (one row is
gathered) plus the KV cache so far, so its time is at least (weight bytes - embedding bytes + KV bytes at
that context) ÷ read bandwidth. The fraction reported is that bound ÷ the measured median step.
"""

from __future__ import annotations

import contextlib
import json
import platform
import statistics
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The speed issue's bar is set on the 1.1B shape and the real SmolLM2; stories260K fits in cache, so its
# "roofline" means nothing.
GOAL_MODELS = ("tinyllama-1.1b", "smollm2-135m")
DECODE_BAR = 0.90  # edgekit default int4 decode ÷ genai int4 (issue 15)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("onnxruntime", "onnx", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    work = ROOT / "bench" / "work" / "peers"
    for venv, pkgs in {
        "optimum": ("optimum-onnx", "onnxruntime", "transformers"),
        "genai": ("onnxruntime-genai", "onnxruntime"),
        "llama": ("llama_cpp_python",),
    }.items():
        for dist in (work / venv / "lib").glob("python*/site-packages/*.dist-info"):
            name, _, ver = dist.name.removesuffix(".dist-info").rpartition("-")
            if name.lower().replace("_", "-") in {p.replace("_", "-") for p in pkgs}:
                out[f"{venv}:{name}"] = ver
    return out


# ---- bytes a decode step reads ----


def _onnx_bytes(path: Path, file_name: str | None) -> tuple[int, int]:
    """(all initializer bytes, embedding-table bytes) of an ONNX model, without loading external data."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path / (file_name or "model.onnx")), load_external_data=False)
    total = embed = 0
    for t in model.graph.initializer:
        n = int(ExternalDataInfo(t).length) if uses_external_data(t) else len(t.raw_data)
        if not n:  # typed fields (rare: small constants)
            n = onnx.numpy_helper.to_array(t).nbytes
        total += n
        if "embed_tokens" in t.name:
            embed += n
    return total, embed


def _gguf_bytes(path: Path) -> tuple[int, int]:
    src = next((ROOT / "bench" / "work" / "peers" / "src").glob("llama_cpp_python-*/vendor/llama.cpp/gguf-py"), None)
    if src and str(src) not in sys.path:
        sys.path.insert(0, str(src))
    from gguf import GGUFReader

    total = embed = 0
    for t in GGUFReader(str(path)).tensors:
        total += int(t.n_bytes)
        if t.name == "token_embd.weight":
            embed += int(t.n_bytes)
    return total, embed


def _kv_bytes_per_token(c: dict[str, Any], cfg: dict[str, Any]) -> int:
    if c["tool"] == "edgekit":
        return int(json.loads((Path(c["path"]) / "edgekit.json").read_text())["graph"]["kv_bytes_per_token"])
    kept = cfg["num_hidden_layers"] - len(c["skipped"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per = 2 * kept * cfg["num_key_value_heads"] * head_dim
    return per * (2 if c["tool"] == "llama.cpp" else 4)  # llama.cpp keeps an f16 cache; onnxruntime fp32


def add_roofline(results: dict[str, Any]) -> None:
    bw = 1e9 * max(results["bandwidth"]["before"]["roofline_gbs"], results["bandwidth"]["after"]["roofline_gbs"])
    results["bandwidth"]["used_gbs"] = bw / 1e9
    for model, m in results["models"].items():
        ckpt = Path(m["contenders"][0]["path"]).parents[2].parent / ("ckpt-" + model)
        cfg_path = Path(m["config"]) if "config" in m else ckpt / "config.json"
        if not cfg_path.is_file():
            cfg_path = ROOT / "edgekit" / "data" / model / "config.json"
        cfg = json.loads(cfg_path.read_text())
        for c in m["contenders"]:
            if c.get("error") or not c["build"].get("runs"):
                continue
            p = Path(c["path"])
            total, embed = _gguf_bytes(p) if p.suffix == ".gguf" else _onnx_bytes(p, c.get("file_name"))
            kv = _kv_bytes_per_token(c, cfg)
            c["roofline_gbs"] = bw / 1e9
            c["weights_read_bytes"] = total - embed
            c["kv_bytes_per_token"] = kv
            c["summary"] = _summary(c, m["prompt_lens"], results["settings"])
            for s in c["summary"]:
                ctx = s["prompt_len"] + results["settings"]["warmup"] + results["settings"]["gen_len"] / 2
                bound_ms = 1000 * (total - embed + kv * ctx) / bw
                s["roofline_ms"] = bound_ms
                s["roofline_fraction"] = bound_ms / s["decode_ms"]


def _summary(c: dict[str, Any], lens: list[int], settings: dict[str, Any]) -> list[dict[str, Any]]:
    runs = c["build"]["runs"]
    out = []
    for k, n in enumerate(lens):
        per = [r["settings"][k] for r in runs]
        out.append(
            {
                "prompt_len": n,
                "ttft_ms": statistics.median(1000 * s["ttft_s"] for s in per),
                "prefill_tok_s": statistics.median(n / s["ttft_s"] for s in per),
                "decode_ms": statistics.median(s["decode_ms_median"] for s in per),
                "decode_ms_all": [s["decode_ms_median"] for s in per],
            }
        )
    c["peak_rss_bytes"] = statistics.median(r["peak_rss_bytes"] for r in runs)
    c["load_s"] = statistics.median(r["load_s"] for r in runs)
    return out


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`new`'s contenders replace `old`'s of the same name; the others stay, and both runs are listed."""
    out = dict(new)
    out["runs"] = old.get("runs", []) + new["runs"]
    models = {k: dict(v) for k, v in old["models"].items()}
    for model, m in new["models"].items():
        timed = {c["name"]: c for c in m["contenders"] if c["build"].get("runs") or c.get("error")}
        for c in timed.values():
            c["run"] = len(out["runs"])
        kept = [timed.pop(c["name"], c) for c in models.get(model, {"contenders": []})["contenders"]]
        models[model] = {"prompt_lens": m["prompt_lens"], "contenders": kept + list(timed.values())}
    out["models"] = models
    return out


# ---- the table ----


def _mb(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}" if n < 10e6 else f"{n / 1e6:,.0f}"


def markdown(results: dict[str, Any]) -> str:
    st = results["settings"]
    machine = results["machine"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs; {st['threads']} threads for every "
        f"contender; {st['rounds']} interleaved rounds (median of the per-run medians); {st['warmup']} warm-up + "
        f"{st['gen_len']} timed greedy decode steps per prompt length.",
        "",
    ]
    for k, run in enumerate(results.get("runs") or [results], 1):
        bw, m = run["bandwidth"], run["machine"]
        lines.append(
            f"- run {k}: `{run['command']}`; load average (1/5/15 min) before "
            f"{' / '.join(f'{x:.1f}' for x in m['load_average_before'])}, after "
            f"{' / '.join(f'{x:.1f}' for x in m['load_average_after'])}; read bandwidth ({st['threads']} threads, "
            f"numpy / C) {bw['before']['numpy_gbs']:.1f} / {bw['before']['c_gbs'] or 0:.1f} GB/s before, "
            f"{bw['after']['numpy_gbs']:.1f} / {bw['after']['c_gbs'] or 0:.1f} GB/s after; roofline at "
            f"{bw.get('used_gbs', 0):.1f} GB/s"
        )
    lines.append("")
    for model, m in results["models"].items():
        lens = m["prompt_lens"]
        short, mid, long = lens[0], lens[-2] if len(lens) > 2 else lens[0], lens[-1]
        scored = any("ppl" in c["build"] for c in m["contenders"])
        lines += [
            f"### {model}",
            "",
            f"| contender | run | file MB | export s | export peak RSS MB | load s | peak RSS MB "
            f"| prefill tok/s @{mid} "
            f"| prefill tok/s @{long} | TTFT ms @{long} | decode ms @{short} | decode ms @{long} "
            f"| roofline @{short} | roofline @{long} |" + (" WikiText-2 ppl |" if scored else ""),
            "|---|" + "---:|" * (13 + scored),
        ]
        failed = []
        for c in m["contenders"]:
            b = c["build"]
            if c.get("error") or "summary" not in c:
                failed.append(f"- **{c['name']}**: {c.get('error') or 'not timed'}")
                continue
            s = {x["prompt_len"]: x for x in c["summary"]}
            lines.append(
                f"| {c['name']} | {c.get('run', 1)} | {_mb(b.get('file_bytes'))} | {b.get('export_s', 0):.0f} "
                f"| {_mb(b.get('export_peak_rss_bytes'))} | {c['load_s']:.2f} | {_mb(c['peak_rss_bytes'])} "
                f"| {s[mid]['prefill_tok_s']:,.0f} | {s[long]['prefill_tok_s']:,.0f} | {s[long]['ttft_ms']:,.0f} "
                f"| {s[short]['decode_ms']:.2f} | {s[long]['decode_ms']:.2f} "
                f"| {100 * s[short]['roofline_fraction']:.0f}% | {100 * s[long]['roofline_fraction']:.0f}% |"
                + (f" {ppl_cell(c)} |" if scored else "")
            )
        if failed:
            lines += ["", "Not in the table:", *failed]
        lines += ["", *(goal_lines(m) if model in GOAL_MODELS else []), ""]
    return "\n".join(lines)


def ppl(c: dict[str, Any]) -> float | None:
    return c["build"].get("ppl", {}).get("perplexity")


def ppl_cell(c: dict[str, Any]) -> str:
    value = ppl(c)
    return f"{value:.2f}" if value else "–"


def _find(m: dict[str, Any], name: str) -> dict[str, Any] | None:
    c = next((c for c in m["contenders"] if c["name"] == name), None)
    return c if c and "summary" in c else None


def paired_ratio(a: dict[str, Any], b: dict[str, Any], k: int, field: str) -> tuple[float, str]:
    """a's time ÷ b's at prompt length index k, and its spread. Contenders timed in the same run ran next to
    each other in every round, so the ratio is taken per round and its median reported: drift in the
    machine's load (±15% between minutes here) cancels. Across runs only the medians can be divided."""
    ra, rb = a["build"]["runs"], b["build"]["runs"]
    if a.get("run") == b.get("run") and len(ra) == len(rb) > 1:
        q = sorted(x["settings"][k][field] / y["settings"][k][field] for x, y in zip(ra, rb, strict=True))
        return statistics.median(q), f" [{q[0]:.2f}-{q[-1]:.2f} over {len(q)} rounds]"
    med = [statistics.median(r["settings"][k][field] for r in runs) for runs in (ra, rb)]
    return med[0] / med[1], " (different runs: medians)"


def goal_lines(m: dict[str, Any]) -> list[str]:
    """The issue's bar, as ratios (edgekit time ÷ peer time: < 1 means edgekit is faster), for edgekit's
    default int4 layout and, when timed, the block-128 one."""
    out = ["Goal ratios (edgekit ÷ peer; decode time, so < 1 is faster; per-round ratios, median [range]):"]
    for variant in ("int4", "int4-b128"):
        out += _goal_lines_for(m, variant)
    timed = [c for c in m["contenders"] if "summary" in c]
    n, k = m["prompt_lens"][-1], len(m["prompt_lens"]) - 1
    full = [c for c in timed if not c["skipped"]]  # skip 0 against skip 0: removed attention prefills faster
    ours = max((c for c in full if c["tool"] == "edgekit"), key=lambda c: _at(c, n)["prefill_tok_s"], default=None)
    theirs = max((c for c in full if c["tool"] != "edgekit"), key=lambda c: _at(c, n)["prefill_tok_s"], default=None)
    if ours and theirs:
        r, spread = paired_ratio(ours, theirs, k, "ttft_s")
        out.append(
            f"- fastest edgekit prefill of {n} tokens ({ours['name']}) vs fastest peer ({theirs['name']}): "
            f"time {r:.2f}×{spread} (goal ≤ 1) {_mark(r <= 1)}"
        )
    return out if len(out) > 1 else []


def _goal_lines_for(m: dict[str, Any], variant: str) -> list[str]:
    lens = m["prompt_lens"]
    ek0 = _find(m, f"edgekit {variant} skip0")
    ek6 = next((c for c in m["contenders"] if c["name"].startswith(f"edgekit {variant} skip") and c["skipped"]
                and "summary" in c), None)  # fmt: skip
    if not ek0:
        return []
    ga = _find(m, "genai int4 skip0")
    out = []
    ends = [(0, lens[0]), (len(lens) - 1, lens[-1])]
    dec = {x["prompt_len"]: x for x in ek0["summary"]}
    if ga:
        for k, n in ends:
            r, spread = paired_ratio(ek0, ga, k, "decode_ms_median")
            mark = _mark(r <= DECODE_BAR)
            out.append(f"- {variant} skip 0 decode @{n} vs genai int4: {r:.2f}×{spread} (goal ≤ {DECODE_BAR}) {mark}")
        if ppl(ek0) and ppl(ga):
            ok = _mark(ppl(ek0) <= ppl(ga))
            out.append(f"- {variant} skip 0 ppl {ppl(ek0):.2f} vs genai int4 {ppl(ga):.2f} (goal: no worse) {ok}")
    for _, n in ends:
        f = dec[n]["roofline_fraction"]
        out.append(f"- {variant} skip 0 decode @{n}: {100 * f:.0f}% of roofline (goal ≥ 75%) {_mark(f >= 0.75)}")
    peers0 = [c for c in m["contenders"] if c["tool"] != "edgekit" and not c["skipped"] and "summary" in c]
    if ek6:
        peers6 = [c for c in m["contenders"] if c["tool"] != "edgekit" and c["skipped"] and "summary" in c]
        for k, n in ends:
            best = min(peers0, key=lambda c: _at(c, n)["decode_ms"], default=None)
            for peer, label in [(best, "fastest peer at skip 0 "), *((c, "") for c in peers6)]:
                if peer is None:
                    continue
                r, spread = paired_ratio(ek6, peer, k, "decode_ms_median")
                who = f"{label}({peer['name']})" if label else peer["name"]
                out.append(f"- {ek6['name']} decode @{n} vs {who}: {r:.2f}×{spread} {_mark(r < 1)}")
    best = max(peers0, key=lambda c: _at(c, lens[-1])["prefill_tok_s"], default=None)
    if best:
        r, spread = paired_ratio(ek0, best, len(lens) - 1, "ttft_s")
        out.append(
            f"- {variant} skip 0 prefill of {lens[-1]} tokens vs fastest peer ({best['name']}): time {r:.2f}×{spread} "
            f"(goal ≤ 1) {_mark(r <= 1)}"
        )
    return out


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def _at(c: dict[str, Any], n: int) -> dict[str, Any]:
    return next(x for x in c["summary"] if x["prompt_len"] == n)


# ---- the plot ----


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [(k, m) for k, m in results["models"].items() if any("summary" in c for c in m["contenders"])]
    if not models:
        return
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.2 * len(models)), squeeze=False)
    colors = {"edgekit": "#1f77b4", "optimum": "#7f7f7f", "genai": "#ff7f0e", "llama.cpp": "#2ca02c"}
    for row, (model, m) in enumerate(models):
        cs = [c for c in m["contenders"] if "summary" in c]
        lens = m["prompt_lens"]
        names = [c["name"] for c in cs]
        y = range(len(cs))
        ax = axes[row][0]
        for k, (n, hatch) in enumerate(((lens[0], ""), (lens[-1], "//"))):
            vals = [_at(c, n)["decode_ms"] for c in cs]
            ax.barh([i + 0.4 * k for i in y], vals, height=0.4, hatch=hatch, label=f"after {n} tokens",
                    color=[colors[c["tool"]] for c in cs], edgecolor="black", linewidth=0.4)  # fmt: skip
            for c, i, v in zip(cs, y, vals, strict=True):
                roof = _at(c, n)["roofline_ms"]
                ax.plot([roof, roof], [i + 0.4 * k - 0.2, i + 0.4 * k + 0.2], color="red", linewidth=1)
                ax.text(v, i + 0.4 * k, f" {v:.1f}", va="center", fontsize=7)
        ax.set_yticks([i + 0.2 for i in y], names, fontsize=8)
        ax.invert_yaxis()
        every = [_at(c, n)["decode_ms"] for c in cs for n in (lens[0], lens[-1])]
        if max(every) > 30 * min(every):  # python-level overheads next to a tiny model: log scale
            ax.set_xscale("log")
        ax.set_xlabel("decode ms/token (lower is better; red tick: bandwidth roofline)")
        ax.set_title(f"{model}: decode, {results['settings']['threads']} threads")
        ax.legend(fontsize=8)
        ax = axes[row][1]
        vals = [_at(c, lens[-1])["prefill_tok_s"] for c in cs]
        ax.barh(list(y), vals, color=[colors[c["tool"]] for c in cs], edgecolor="black", linewidth=0.4)
        for i, v in zip(y, vals, strict=True):
            ax.text(v, i, f" {v:,.0f}", va="center", fontsize=7)
        ax.set_yticks(list(y), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"prefill tokens/s at {lens[-1]} tokens (higher is better)")
        ax.set_title(f"{model}: prefill")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
