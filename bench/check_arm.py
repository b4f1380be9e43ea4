"""make check-arm: do edgekit's bundles compute on aarch64 onnxruntime what they compute on this x86 host?

    python bench/check_arm.py                       # the matrix on cortex-a53, a72, a76, neoverse-n1
    python bench/check_arm.py --cores cortex-a72 --no-smollm2 --no-install   # a quick look

Exports the matrix into bench/work/check_arm/ (stories260K: fp32 skip 0 and 2, int8, int4 at accuracy
levels 4 and 1, and every arm64 recipe's bundle: the Android one is the standard int8 graph with its .ort
and fixed-shape twins; SmolLM2-135M-Instruct: int4 as the Pi 5 and Pi 4 recipes make it), runs every
graph on every emulated core (edgekit.targets.emulate: the real aarch64 onnxruntime wheel under
qemu-user-static) and compares greedy tokens, top-1 over a text and logits with the host's. Then
installs edgekit's wheel inside the emulated environment with the guest's own pip (no torch in reach)
and runs `edgekit run`, `verify` and `chat` there.

Fails (exit 1) when a probe errors, when an fp32 or accuracy-level-1 graph is not exact on some core, or
when a recipe's `emulated:` record (core -> verdict) no longer holds. What quantized level-4 graphs do on
cores without dot products is reported, not asserted: it is the finding the recipes are chosen from.
Writes bench/work/check_arm.json and prints the markdown table BENCHMARKS.md carries.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arm_install import guest_edgekit, guest_install

from edgekit import DATA_DIR
from edgekit.bundle.folder import open_bundle
from edgekit.checkpoint.fetch import SMOLLM2, fetch
from edgekit.runtime.agreement import VERDICTS, ProbeJob
from edgekit.targets.arm_env import CORES, DEFAULT_CORES, arm_environment
from edgekit.targets.emulate import CoreCheck, check_cores, probe_jobs
from edgekit.targets.recipes import shipped_recipes

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "check_arm"
REPORT = ROOT / "bench" / "work" / "check_arm.json"
WIKI = ROOT.parent / "shared" / "corpora" / "wikitext-2-valid.txt"  # held out: first half of valid

# name -> (model, export flags); "recipe:" rows are every shipped arm64 recipe's bundle.
STORIES = {
    "fp32-skip0": ["--quant", "fp32"],
    "fp32-skip2": ["--skip", "2", "--quant", "fp32"],
    "int8-skip2": ["--skip", "2", "--quant", "int8"],
    "int4-skip2": ["--skip", "2", "--quant", "int4"],
    "int4-skip2-level1": ["--skip", "2", "--quant", "int4", "--accuracy-level", "1"],
}
# SmolLM2 bundles take 45-90 s per emulated core (stories260K: ~1 s), so each runs on its recipe's kind of
# core: the Pi 4 recipe (level 1, fp32 compute) on the cores without dot products, the Pi 5 recipe (level
# 4, int8 dot products) on those with them. Every core still runs one real-model bundle.
SMOLLM2_RECIPES = {"raspberry-pi-4": ("cortex-a53", "cortex-a72"), "raspberry-pi-5": ("cortex-a76", "neoverse-n1")}


def _export(model: str, name: str, flags: list[str]) -> Path:
    out = WORK / name
    cmd = [sys.executable, "-m", "edgekit", "export", model, *flags, "-o", str(out), "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"export {name} failed: {(proc.stderr.strip() or proc.stdout).splitlines()[-1]}")
    return out


def _exact_expected(name: str, manifest: dict) -> bool:
    q = manifest.get("quantization") or {}
    return q.get("mode") == "fp32" or q.get("accuracy_level") == 1 or "fp32" in name


def _row(c: CoreCheck, name: str) -> dict:
    return {**c.to_dict(), "bundle": name, "path": c.job.bundle}


def _table(rows: list[dict], cores: list[str]) -> str:
    lines = [
        "| bundle | graph | " + " | ".join(cores) + " |",
        "|---|---|" + "---|" * len(cores),
    ]
    keys = list(dict.fromkeys((r["bundle"], r["graph"]) for r in rows))
    for bundle, graph in keys:
        cells = []
        for core in cores:
            r = next((r for r in rows if (r["bundle"], r["graph"], r["core"]) == (bundle, graph, core)), None)
            if r is None:
                cells.append("–")  # not run on this core (SMOLLM2_RECIPES)
                continue
            a = r["agreement"]
            if a is None:
                cells.append(f"error: {r['error']}")
                continue
            cells.append(
                f"{a['verdict']} {a['greedy_same']}/{a['greedy_total']}, {100 * a['top1']:.0f}%, "
                f"{a['max_abs_dlogit']:.1g}, ppl {a['other_ppl']:.2f}/{a['host_ppl']:.2f}"
            )
        lines.append(f"| {bundle} | {graph} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cores", default=",".join(DEFAULT_CORES))
    ap.add_argument("--no-smollm2", action="store_true", help="stories260K only")
    ap.add_argument("--no-install", action="store_true", help="skip the device install inside the guest")
    args = ap.parse_args()
    cores = args.cores.split(",")
    start = time.perf_counter()
    env = arm_environment(say=print)
    recipes = [r for r in shipped_recipes() if r.arch == "arm64" and r.emulated]
    bundles: dict[str, tuple[Path, Path | None]] = {}
    for name, flags in STORIES.items():
        bundles[f"stories260k {name}"] = (_export("stories260k", name, flags), None)
    for r in recipes:
        bundles[f"stories260k recipe:{r.name}"] = (
            _export("stories260k", r.name, ["--skip", "2", "--recipe", r.name]),
            None,
        )
    if not args.no_smollm2:
        gguf, wiki = str(fetch(SMOLLM2)), None
        if WIKI.is_file():
            wiki = WORK / "wikitext-2-held-out.txt"
            text = WIKI.read_text(encoding="utf-8")
            wiki.write_text(text[: len(text) // 2], encoding="utf-8")
        for recipe in SMOLLM2_RECIPES:  # the shipped recipes' order: pi4, then pi5
            out = _export(gguf, f"smollm2-{recipe}", ["--skip", "2", "--recipe", recipe])
            bundles[f"smollm2 recipe:{recipe}"] = (out, wiki or DATA_DIR / "calib-wikitext2.txt")
    print(f"exported {len(bundles)} bundles in {time.perf_counter() - start:.0f} s")

    jobs: list[tuple[str, ProbeJob]] = []
    for name, (path, text) in bundles.items():
        small = name.startswith("smollm2")  # ~1 s a token emulated without dot products: keep it short
        for job in probe_jobs(open_bundle(path), text=text, tokens=64 if small else 96, new_tokens=12 if small else 24):
            jobs.append((name, job))
    checks: list[CoreCheck] = []
    names: list[str] = []
    for core in cores:
        mine = [
            (name, job)
            for name, job in jobs
            if not name.startswith("smollm2") or core in SMOLLM2_RECIPES[name.split(":")[1]] or len(cores) == 1
        ]
        checks += check_cores([job for _, job in mine], [core], env=env, say=print)
        names += [name for name, _ in mine]
    rows = [_row(c, name) for c, name in zip(checks, names, strict=True)]

    failures = []
    for r, c in zip(rows, checks, strict=True):
        if c.error:
            failures.append(f"{r['bundle']} {r['graph']} on {r['core']}: {c.error}")
        elif _exact_expected(r["bundle"], open_bundle(c.job.bundle).manifest) and c.agreement.verdict != "exact":
            failures.append(f"{r['bundle']} {r['graph']} on {r['core']}: {c.agreement.summary()} (exact expected)")
    for recipe in recipes:
        for core, promised in recipe.emulated.items():
            if core not in cores:
                continue
            for r in rows:
                if r["bundle"].endswith(f"recipe:{recipe.name}") and r["core"] == core and r["agreement"]:
                    got = r["agreement"]["verdict"]
                    if VERDICTS.index(got) > VERDICTS.index(promised):
                        failures.append(
                            f"recipe {recipe.name} says {promised} on {core}; {r['bundle']} {r['graph']}: {got}"
                        )

    install_core = "cortex-a76" if "cortex-a76" in cores else cores[0]  # dot products: the quick one
    install = None if args.no_install else guest_install(env, install_core, say=print)
    if install is not None:
        stories = bundles["stories260k int4-skip2-level1"][0]
        steps = {
            "run": (["run", str(stories), "Once upon a time", "--max-new-tokens", "16"], ""),
            "verify": (["verify", str(stories)], ""),
        }
        if "smollm2 recipe:raspberry-pi-4" in bundles:
            chat = ["chat", str(bundles["smollm2 recipe:raspberry-pi-4"][0]), "--max-new-tokens", "8"]
            steps["chat"] = (chat, "What is the capital of France? Answer in one word.\n")
        for step, (cli, stdin) in steps.items():
            install[step] = guest_edgekit(env, install, install_core, cli, stdin)
            say = install[step]["tail"].splitlines()[-1] if install[step]["tail"] else ""
            print(f"guest edgekit {step}: rc {install[step]['rc']} in {install[step]['seconds']:.0f} s: {say[:120]}")
            if install[step]["rc"]:
                failures.append(f"guest `edgekit {step}` failed: {install[step]['tail']}")
        if install["torch_importable"]:
            failures.append("the device install can import torch: it should not be there")

    report = {
        "cores": {c: CORES[c].boards for c in cores},
        "rows": rows,
        "install": install,
        "failures": failures,
        "seconds": round(time.perf_counter() - start, 1),
    }
    REPORT.write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(_table(rows, cores))
    if install:
        print(f"\ndevice install in the guest: {install['summary']}")
    print(f"\n{len(rows)} probes, {len(failures)} failures, {report['seconds']:.0f} s; report: {REPORT}")
    for f in failures:
        print(f"FAIL {f}")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
