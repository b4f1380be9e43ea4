"""Profile bundles: load time, time to first token, prefill and decode speed, peak memory, sizes.

Each run of each bundle is a fresh child process (this module's `_child_main`), for two reasons: peak
resident memory is a per-process figure (a second model loaded into the same process would inherit the
first one's peak), and a fresh process also pays the real session load time. With several bundles the
runs are interleaved (A B A B …), so a machine that gets busier or cooler halfway affects every bundle
alike; ratios are taken between runs that were adjacent in time (A₁/B₁, A₂/B₂ …) and reported as their
median with the min–max spread.

Inside a run: load the session, warm up once (a short prompt and a few steps, so thread pools and
allocator arenas exist), then for each prompt length prefill the prompt (the time to first token is
that forward pass plus sampling the token), and decode `warmup + gen_len` tokens greedily with EOS
ignored; the first `warmup` decode steps are dropped and median/p90 are over the rest. The decode path
is exactly `edgekit run`'s (`runtime.Generator`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgekit import CALIB_TEXT
from edgekit.bundle.folder import Bundle, open_bundle
from edgekit.errors import EdgekitError
from edgekit.runtime.generator import GenerationConfig, Generator
from edgekit.runtime.machine import machine_facts, peak_rss_bytes
from edgekit.runtime.providers import RuntimeOptions, resolve

PROMPT_TEXT = CALIB_TEXT


@dataclass(frozen=True)
class ProfileRequest:
    bundles: tuple[Path, ...]
    prompt_lens: tuple[int, ...] = (128,)
    gen_len: int = 64
    runs: int = 3
    warmup: int = 2  # decode steps dropped before timing
    provider: str = "cpu"
    threads: int | None = None
    affinity: str | None = None
    spin: bool = True
    check_integrity: bool = True
    timeout_s: float = 3600.0  # per child run


@dataclass
class Stat:
    """Median over runs, with the min and max."""

    median: float
    min: float
    max: float
    runs: list[float]

    @staticmethod
    def of(values: list[float]) -> Stat:
        return Stat(statistics.median(values), min(values), max(values), list(values))

    @property
    def spread(self) -> float:
        """(max - min) / median: the run-to-run noise, as a fraction."""
        return (self.max - self.min) / self.median if self.median else 0.0


@dataclass
class SettingResult:
    prompt_len: int
    gen_len: int
    ttft_ms: Stat
    prefill_tokens_per_s: Stat
    decode_ms_median: Stat
    decode_ms_p90: Stat
    decode_tokens_per_s: Stat
    ttft_cpu_ms: Stat  # process CPU time (all threads): steadier than wall time on a shared machine
    decode_cpu_ms_median: Stat


@dataclass
class BundleResult:
    bundle: str
    label: str
    provider: str
    threads: int | str
    quant: str
    kept_layers: int
    num_layers: int
    max_context: int
    model_bytes: int
    kv_bytes_per_token: int
    kv_bytes_max_context: int
    load_s: Stat
    peak_rss_bytes: Stat
    placement: dict[str, Any]
    settings: list[SettingResult]


@dataclass
class Ratio:
    """other vs baseline at one prompt length; every value is a median over paired runs [min, max]."""

    baseline: str
    other: str
    prompt_len: int
    ttft_speedup: Stat  # baseline time / other time: > 1 means the other is faster
    prefill_speedup: Stat
    decode_speedup: Stat
    decode_p90_speedup: Stat
    ttft_cpu_speedup: Stat  # the same speedups in CPU time per token
    decode_cpu_speedup: Stat
    peak_rss_ratio: Stat  # other / baseline: < 1 means the other needs less
    model_bytes_ratio: float
    kv_bytes_ratio: float


@dataclass
class ProfileReport:
    bundles: list[BundleResult]
    ratios: list[Ratio]
    machine: dict[str, Any]
    settings: dict[str, Any]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _model_bytes(bundle: Bundle) -> int:
    files = bundle.manifest["files"]
    graph = bundle.manifest["graph"]
    names = [graph["file"], *([graph["external_data"]] if graph.get("external_data") else [])]
    return sum(int(files[n]["bytes"]) for n in names if n in files)


def profile(req: ProfileRequest) -> ProfileReport:
    if not req.bundles:
        raise EdgekitError("give at least one bundle to profile")
    if req.runs < 1 or req.gen_len < 1 or not req.prompt_lens or min(req.prompt_lens) < 1:
        raise EdgekitError("--runs, --gen-len and every --prompt-len must be at least 1")
    resolve(req.provider)  # a missing provider fails here once, not in every child
    bundles = [open_bundle(b, req.check_integrity) for b in req.bundles]
    longest = max(req.prompt_lens) + req.warmup + req.gen_len
    for b in bundles:
        ctx = int(b.manifest["architecture"]["max_context"])
        if longest > ctx:
            raise EdgekitError(
                f"{b.path.name}: prompt {max(req.prompt_lens)} + {req.warmup} warm-up + {req.gen_len} generated "
                f"tokens exceed its context of {ctx}"
            )

    samples: list[list[dict[str, Any]]] = [[] for _ in bundles]
    for _ in range(req.runs):
        for k, b in enumerate(bundles):  # interleaved: A B A B …
            samples[k].append(_run_child(b, req))

    labels = _labels(bundles)
    results = [_summarize(b, labels[k], samples[k], req) for k, b in enumerate(bundles)]
    ratios = [
        _ratio(results[0], samples[0], results[k], samples[k], p)
        for k in range(1, len(results))
        for p in req.prompt_lens
    ]
    settings = {
        "prompt_lens": list(req.prompt_lens),
        "gen_len": req.gen_len,
        "warmup_steps": req.warmup,
        "runs": req.runs,
        "provider": req.provider,
        "threads": req.threads,
        "affinity": req.affinity,
        "spin": req.spin,
        "order": "interleaved" if len(bundles) > 1 else "sequential",
        "process": "one child process per bundle and run",
    }
    return ProfileReport(results, ratios, machine_facts(), settings, _twin_notes(bundles, labels))


def _twin_notes(bundles: list[Bundle], labels: list[str]) -> list[str]:
    """A ratio means 'what skipping buys' only between twins: same source model, same weight format."""
    notes = []
    base = bundles[0].manifest
    for b, label in zip(bundles[1:], labels[1:], strict=True):
        m = b.manifest
        if m["source"].get("config_sha256") != base["source"].get("config_sha256"):
            notes.append(f"{label} comes from a different model than {labels[0]}: its ratios are not skip-only")
        if m["quantization"].get("mode") != base["quantization"].get("mode"):
            notes.append(
                f"{label} is {m['quantization'].get('mode')}, {labels[0]} is {base['quantization'].get('mode')}: "
                "the ratios mix skipping with quantization"
            )
    return notes


def _labels(bundles: list[Bundle]) -> list[str]:
    names = [b.path.name for b in bundles]
    if len(set(names)) < len(names):
        names = [str(b.path) for b in bundles]
    return names


def _run_child(bundle: Bundle, req: ProfileRequest) -> dict[str, Any]:
    spec = {
        "bundle": str(bundle.path),
        "prompt_lens": list(req.prompt_lens),
        "gen_len": req.gen_len,
        "warmup": req.warmup,
        "provider": req.provider,
        "threads": req.threads,
        "affinity": req.affinity,
        "spin": req.spin,
    }
    cmd = [sys.executable, "-c", "from edgekit.runtime.profile import _child_main; _child_main()"]
    try:
        proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=req.timeout_s)
    except subprocess.TimeoutExpired as e:
        raise EdgekitError(f"profiling {bundle.path.name} took longer than {req.timeout_s:.0f} s") from e
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines() if ln.strip()]
        raise EdgekitError(f"profiling {bundle.path.name} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _prompt_ids(gen: Any, n: int) -> list[int]:
    """n tokens of real text (repeated if the sample is short)."""
    ids = gen.encode(PROMPT_TEXT.read_text(encoding="utf-8")[:200_000])
    vocab = gen.engine.vocab
    ids = [i for i in ids if i < vocab] or [0]
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One run in this process: what the child does. Returns plain numbers (seconds, bytes)."""
    import numpy as np
    import psutil

    options = RuntimeOptions(
        provider=spec["provider"], threads=spec["threads"], affinity=spec["affinity"], spin=spec["spin"]
    )
    longest = max(spec["prompt_lens"]) + spec["warmup"] + spec["gen_len"]
    gen = Generator(spec["bundle"], options, check_integrity=False, kv_capacity=longest)
    rss_loaded = psutil.Process().memory_info().rss
    prompt = _prompt_ids(gen, max(spec["prompt_lens"]))
    gen.generate(prompt[:16], GenerationConfig(max_new_tokens=4, stop_on_eos=False))  # warm-up
    settings = []
    for n in spec["prompt_lens"]:
        cfg = GenerationConfig(max_new_tokens=spec["warmup"] + spec["gen_len"] + 1, stop_on_eos=False)
        g = gen.generate(prompt[:n], cfg)
        steps = np.asarray(g.step_s[spec["warmup"] :]) * 1000
        cpu_steps = np.asarray(g.step_cpu_s[spec["warmup"] :]) * 1000
        settings.append(
            {
                "prompt_len": n,
                "ttft_s": g.prefill_s,
                "decode_ms_median": float(np.median(steps)),
                "decode_ms_p90": float(np.percentile(steps, 90)),
                "decode_steps": len(steps),
                "ttft_cpu_s": g.prefill_cpu_s,
                "decode_cpu_ms_median": float(np.median(cpu_steps)),
            }
        )
    threads = gen.session.get_session_options().intra_op_num_threads
    return {
        "load_s": gen.load_s,
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": peak_rss_bytes(),
        "placement": gen.placement.to_dict(),
        "threads": threads,
        "settings": settings,
        "torch_loaded": "torch" in sys.modules,
    }


def _child_main() -> None:
    spec = json.loads(sys.stdin.read())
    try:
        out = measure(spec)
    except EdgekitError as e:
        print(f"edgekit: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(out))


def _summarize(b: Bundle, label: str, runs: list[dict[str, Any]], req: ProfileRequest) -> BundleResult:
    m = b.manifest
    settings = []
    for k, n in enumerate(req.prompt_lens):
        per = [r["settings"][k] for r in runs]
        settings.append(
            SettingResult(
                prompt_len=n,
                gen_len=req.gen_len,
                ttft_ms=Stat.of([1000 * s["ttft_s"] for s in per]),
                prefill_tokens_per_s=Stat.of([n / s["ttft_s"] for s in per]),
                decode_ms_median=Stat.of([s["decode_ms_median"] for s in per]),
                decode_ms_p90=Stat.of([s["decode_ms_p90"] for s in per]),
                decode_tokens_per_s=Stat.of([1000 / s["decode_ms_median"] for s in per]),
                ttft_cpu_ms=Stat.of([1000 * s["ttft_cpu_s"] for s in per]),
                decode_cpu_ms_median=Stat.of([s["decode_cpu_ms_median"] for s in per]),
            )
        )
    per_token = int(m["graph"].get("kv_bytes_per_token", 0))
    ctx = int(m["architecture"]["max_context"])
    threads = runs[0]["threads"]
    return BundleResult(
        bundle=str(b.path),
        label=label,
        provider=req.provider,
        threads=threads if threads else f"default ({os.cpu_count()} logical CPUs)",
        quant=m["quantization"].get("mode", "?"),
        kept_layers=len(m["skip"]["kept"]),
        num_layers=int(m["architecture"]["num_layers"]),
        max_context=ctx,
        model_bytes=_model_bytes(b),
        kv_bytes_per_token=per_token,
        kv_bytes_max_context=per_token * ctx,
        load_s=Stat.of([r["load_s"] for r in runs]),
        peak_rss_bytes=Stat.of([float(r["peak_rss_bytes"]) for r in runs]),
        placement=runs[0]["placement"],
        settings=settings,
    )


def _paired(base: list[float], other: list[float]) -> Stat:
    return Stat.of([a / b for a, b in zip(base, other, strict=True) if b])


def _ratio(
    base: BundleResult, base_runs: list[dict], other: BundleResult, other_runs: list[dict], prompt_len: int
) -> Ratio:
    k = next(i for i, s in enumerate(base.settings) if s.prompt_len == prompt_len)
    bs, os_ = base.settings[k], other.settings[k]
    return Ratio(
        baseline=base.label,
        other=other.label,
        prompt_len=prompt_len,
        ttft_speedup=_paired(bs.ttft_ms.runs, os_.ttft_ms.runs),
        prefill_speedup=_paired(os_.prefill_tokens_per_s.runs, bs.prefill_tokens_per_s.runs),
        decode_speedup=_paired(bs.decode_ms_median.runs, os_.decode_ms_median.runs),
        decode_p90_speedup=_paired(bs.decode_ms_p90.runs, os_.decode_ms_p90.runs),
        ttft_cpu_speedup=_paired(bs.ttft_cpu_ms.runs, os_.ttft_cpu_ms.runs),
        decode_cpu_speedup=_paired(bs.decode_cpu_ms_median.runs, os_.decode_cpu_ms_median.runs),
        peak_rss_ratio=_paired(other.peak_rss_bytes.runs, base.peak_rss_bytes.runs),
        model_bytes_ratio=other.model_bytes / base.model_bytes if base.model_bytes else float("nan"),
        kv_bytes_ratio=other.kv_bytes_per_token / base.kv_bytes_per_token if base.kv_bytes_per_token else float("nan"),
    )


__all__ = ["BundleResult", "ProfileReport", "ProfileRequest", "Ratio", "SettingResult", "profile"]
