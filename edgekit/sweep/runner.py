"""Skip × quantization sweeps: export → eval → profile for every combination, then a Pareto report.

Every step of every configuration runs as its own `edgekit ... --json` process, so a crash or an
out-of-memory kill costs one configuration, not the sweep. Each finished configuration leaves
`results/NAME.json`; a rerun skips those and redoes only what is missing or failed. `--jobs` runs
exports and evaluations in parallel; profiling always runs afterwards, one bundle at a time with
nothing else of the sweep running, because timings taken beside another job's export are noise.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.export.quantize import QUANT_MODES
from edgekit.export.verify import DEFAULT_TEXT
from edgekit.sweep.report import write_report

EDGEKIT = [sys.executable, "-m", "edgekit"]
_live: set[subprocess.Popen] = set()  # running steps, killed (with their children) if the sweep is stopped
_live_lock = threading.Lock()
_stopping = threading.Event()  # set once the sweep is interrupted: killed steps are not failures


@dataclass(frozen=True)
class SweepConfig:
    skip: str  # "2" (last 2) or "auto:2"
    quant: str

    @property
    def rule(self) -> str:
        if self.n == 0:
            return "none"
        return "auto" if self.skip.startswith("auto:") else "last"

    @property
    def n(self) -> int:
        return int(self.skip.split(":")[-1])

    @property
    def name(self) -> str:
        return f"{self.rule}{self.n}-{self.quant}" if self.n else f"skip0-{self.quant}"


@dataclass
class SweepRequest:
    model: str
    skips: list[int]
    quants: list[str]
    output: Path
    auto: bool = False
    jobs: int = 1
    text: Path | None = None  # eval text [default: the shipped TinyStories sample]
    max_tokens: int | None = None  # eval token budget
    calib: Path | None = None  # ranks layers for auto:N
    verify: bool = True
    keep_bundles: bool = False
    prompt_len: int = 128
    gen_len: int = 32
    runs: int = 3
    threads: int | None = None
    export_args: list[str] = field(default_factory=list)  # extra, e.g. ["--lm-head-bits", "8"]
    command: str = ""

    def settings(self) -> dict[str, Any]:
        """What a stored result depends on besides its configuration: a rerun with other settings redoes it."""
        return {
            "model": self.model,
            "text": str(self.text or DEFAULT_TEXT),
            "max_tokens": self.max_tokens,
            "calib": str(self.calib) if self.calib else None,
            "verify": self.verify,
            "profile": [self.prompt_len, self.gen_len, self.runs, self.threads],
            "export_args": self.export_args,
        }

    def configs(self) -> list[SweepConfig]:
        out = []
        for q in dict.fromkeys(self.quants):
            for n in dict.fromkeys(self.skips):
                out.append(SweepConfig(str(n), q))
                if self.auto and n > 0:
                    out.append(SweepConfig(f"auto:{n}", q))
        return out


@dataclass
class SweepResult:
    output: Path
    rows: list[dict[str, Any]]
    ran: list[str]  # configurations done (or retried) in this invocation
    reused: list[str]  # configurations whose earlier result was kept
    report: Path


class StepFailed(Exception):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


def parse_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise EdgekitError(f"--{what}: empty list")
    return items


def validate(req: SweepRequest) -> None:
    bad = [q for q in req.quants if q not in QUANT_MODES]
    if bad:
        raise EdgekitError(f"--quant {bad[0]}: not one of {', '.join(QUANT_MODES)}")
    if any(n < 0 for n in req.skips):
        raise EdgekitError("--skip: counts must not be negative")
    if req.jobs < 1:
        raise EdgekitError("--jobs must be at least 1")


def _run_step(stage: str, args: list[str], log: Path) -> dict[str, Any]:
    """One edgekit command in its own process (its own process group, so a kill takes its children too)."""
    with open(log, "a", encoding="utf-8") as err:
        err.write(f"$ edgekit {' '.join(args)}\n")
        err.flush()
        proc = subprocess.Popen(
            [*EDGEKIT, *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
        with _live_lock:
            _live.add(proc)
        try:
            out, _ = proc.communicate()
        except BaseException:  # Ctrl-C or SIGTERM in this thread: the step (and its children) go too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            raise
        finally:
            with _live_lock:
                _live.discard(proc)
    if proc.returncode != 0:
        lines = [ln for ln in log.read_text(encoding="utf-8").splitlines() if ln.strip()]
        msg = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")
        raise StepFailed(stage, f"{stage} exited {proc.returncode}: {msg.strip()}")
    try:
        return json.loads(out)
    except json.JSONDecodeError as e:
        raise StepFailed(stage, f"{stage} printed no JSON: {e}") from e


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)  # atomic: a killed sweep never leaves half a result


def _export_and_eval(req: SweepRequest, cfg: SweepConfig, partial: Path) -> dict[str, Any]:
    bundle = req.output / "bundles" / cfg.name
    log = req.output / "logs" / f"{cfg.name}.log"
    rec: dict[str, Any] = {"name": cfg.name, "skip": cfg.skip, "quant": cfg.quant, "rule": cfg.rule, "n": cfg.n}
    rec["settings"] = req.settings()
    t = time.perf_counter()
    args = ["export", req.model, "--skip", cfg.skip, "--quant", cfg.quant, "-o", str(bundle), "--force", "--json"]
    args += (["--calib", str(req.calib)] if req.calib else []) + ([] if req.verify else ["--no-verify"])
    m = _run_step("export", args + req.export_args, log)
    rec["export_s"] = round(time.perf_counter() - t, 2)
    v = m.get("verification") or {}
    rec.update(
        bundle=str(bundle),
        skipped=m["skip"]["skipped"],
        ranking=m["skip"].get("ranking"),
        bundle_bytes=sum(f["bytes"] for f in m["files"].values()),
        kv_bytes_per_token=m["graph"].get("kv_bytes_per_token"),
        parity_max_abs_logit_diff=v.get("max_abs_logit_diff"),
        parity_top1=v.get("top1_agreement"),
    )
    t = time.perf_counter()
    args = ["eval", str(bundle), "--json", "--text", str(req.text or DEFAULT_TEXT)]
    args += ["--max-tokens", str(req.max_tokens)] if req.max_tokens else []
    e = _run_step("eval", args, log)
    rec["eval_s"] = round(time.perf_counter() - t, 2)
    p = e["perplexity"]
    rec.update(
        perplexity=p["perplexity"],
        ppl_ci95=p["ci95"],
        ppl_tokens=p["tokens"],
        eval_text=Path(e["text"]["path"]).name,
    )
    _write_json(partial, rec)
    return rec


def _profile(req: SweepRequest, rec: dict[str, Any]) -> dict[str, Any]:
    log = req.output / "logs" / f"{rec['name']}.log"
    args = ["profile", rec["bundle"], "--json", "--runs", str(req.runs), "--gen-len", str(req.gen_len)]
    args += ["--prompt-len", str(req.prompt_len)] + (["--threads", str(req.threads)] if req.threads else [])
    t = time.perf_counter()
    r = _run_step("profile", args, log)
    b = r["bundles"][0]
    s = b["settings"][0]
    rec.update(
        profile_s=round(time.perf_counter() - t, 2),
        decode_ms=s["decode_ms_median"]["median"],
        decode_ms_min=s["decode_ms_median"]["min"],
        decode_ms_max=s["decode_ms_median"]["max"],
        decode_ms_p90=s["decode_ms_p90"]["median"],
        # CPU time per step: what waiting for a busy core does not inflate (single-threaded it is the work).
        decode_cpu_ms=(s.get("decode_cpu_ms_median") or {}).get("median"),
        ttft_ms=s["ttft_ms"]["median"],
        prefill_tokens_per_s=s["prefill_tokens_per_s"]["median"],
        model_bytes=b["model_bytes"],
        peak_rss_bytes=b["peak_rss_bytes"]["median"],
        machine=r.get("machine", {}).get("cpu"),
        load_average=(r.get("machine", {}).get("load_average") or [None])[0],  # other work on the machine
    )
    return rec


def _resume(req: SweepRequest, configs: list[SweepConfig]) -> tuple[list[str], list[SweepConfig]]:
    """The configurations an earlier run finished with the same settings, and those still to (re)do."""
    reused: list[str] = []
    todo: list[SweepConfig] = []
    for cfg in configs:
        f = req.output / "results" / f"{cfg.name}.json"
        prev = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
        if prev and prev.get("status") == "ok" and prev.get("settings") == req.settings():
            reused.append(cfg.name)
            if not req.keep_bundles:  # a sweep killed while deleting it may have left the bundle behind
                shutil.rmtree(req.output / "bundles" / cfg.name, ignore_errors=True)
        else:
            todo.append(cfg)  # never run, interrupted, failed, or run with other settings: (re)do it
    return reused, todo


def run_sweep(req: SweepRequest, on_event: Callable[[str], None] | None = None) -> SweepResult:
    validate(req)
    say = on_event or (lambda s: None)
    for sub in ("results", "partial", "logs", "bundles"):
        (req.output / sub).mkdir(parents=True, exist_ok=True)
    configs = req.configs()
    reused, todo = _resume(req, configs)
    say(f"{len(configs)} configurations: {len(reused)} already done, {len(todo)} to run")

    lock = threading.Lock()
    evaluated: dict[str, dict[str, Any]] = {}

    def stage1(cfg: SweepConfig) -> None:
        partial = req.output / "partial" / f"{cfg.name}.json"
        bundle = req.output / "bundles" / cfg.name
        prev = json.loads(partial.read_text(encoding="utf-8")) if partial.is_file() else None
        if prev and prev.get("settings") == req.settings() and (bundle / "edgekit.json").is_file():
            rec = prev  # exported and evaluated before an interruption; only profiling is missing
        else:
            try:
                rec = _export_and_eval(req, cfg, partial)
            except StepFailed as e:
                if _stopping.is_set():
                    return
                _fail(req, cfg, e.stage, str(e))
                say(f"{cfg.name}: FAILED in {e.stage}: {e}")
                return
            except Exception as e:  # a sweep bug must not stop the other configurations either
                _fail(req, cfg, "sweep", f"{type(e).__name__}: {e}")
                say(f"{cfg.name}: FAILED: {e}")
                return
        with lock:
            evaluated[cfg.name] = rec
        say(f"{cfg.name}: perplexity {rec['perplexity']:.3f}, skipped {rec['skipped']}")

    pool = ThreadPoolExecutor(max_workers=req.jobs)
    try:
        list(pool.map(stage1, todo))
    except BaseException:
        # Ctrl-C or SIGTERM: stop the running steps too, or they would outlive the sweep.
        _kill_live()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()

    for cfg in todo:  # profiling alone, in the configurations' order
        rec = evaluated.get(cfg.name)
        if rec is None:
            continue
        try:
            rec = _profile(req, rec)
        except StepFailed as e:
            _fail(req, cfg, e.stage, str(e), rec)
            say(f"{cfg.name}: FAILED in profile: {e}")
            continue
        except BaseException:
            _kill_live()
            raise
        rec["status"] = "ok"
        _write_json(req.output / "results" / f"{cfg.name}.json", rec)
        (req.output / "partial" / f"{cfg.name}.json").unlink(missing_ok=True)
        if not req.keep_bundles:
            shutil.rmtree(rec["bundle"], ignore_errors=True)
        say(f"{cfg.name}: decode {rec['decode_ms']:.3f} ms/token")

    rows = []
    for cfg in configs:
        f = req.output / "results" / f"{cfg.name}.json"
        if f.is_file():
            rows.append(json.loads(f.read_text(encoding="utf-8")))
    report = write_report(req, rows)
    return SweepResult(req.output, rows, [c.name for c in todo], reused, report)


def _kill_live() -> None:
    _stopping.set()
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)


def _fail(req: SweepRequest, cfg: SweepConfig, stage: str, error: str, rec: dict[str, Any] | None = None) -> None:
    base = rec or {"name": cfg.name, "skip": cfg.skip, "quant": cfg.quant, "rule": cfg.rule, "n": cfg.n}
    failed = {**base, "status": "failed", "stage": stage, "error": error}
    _write_json(req.output / "results" / f"{cfg.name}.json", failed)
    if not req.keep_bundles:
        shutil.rmtree(req.output / "bundles" / cfg.name, ignore_errors=True)
