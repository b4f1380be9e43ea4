"""Every recipe's bundle on the non-CPU execution providers this machine has: coverage and agreement.

    python bench/ep_coverage.py              # make check-eps: every shipped recipe, QNN + OpenVINO
    python bench/ep_coverage.py --recipes qualcomm-npu --providers qnn

Per recipe, the stories260K bundle `edgekit export stories260k --recipe R` makes. Each of its graphs
(model.onnx, the fixed-shape pair) runs on
  qnn       QNN's HTP backend, the x86 simulator in pip onnxruntime-qnn (a plugin EP in this onnxruntime),
            with the recipe's QNN options, else Snapdragon 8 Gen 2's (soc_model 60, htp_arch 73) and fp16
  openvino  OpenVINO's CPU device, pip onnxruntime-openvino in its own environment (edgekit.targets.ep_env)
and on this onnxruntime's CPU EP: nodes each EP took, then greedy tokens after an 8-token prompt, top-1
and perplexity over 96 tokens of the export's verification text (edgekit.runtime.agreement). The .ort
twin is for onnxruntime's CPU mobile builds and is not offered to them. Fails when a recipe's `coverage:`
record (provider -> graph -> "N% verdict") no longer holds: fewer nodes on the EP, or a worse verdict.
Not run here, no build for this machine: XNNPACK, NNAPI, CoreML. The simulator's speed is no device figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from edgekit.bundle.folder import open_bundle
from edgekit.errors import EdgekitError
from edgekit.runtime.agreement import VERDICTS, Probe, ProbeJob, compare, probe
from edgekit.runtime.providers import short_name
from edgekit.targets.emulate import bundle_graphs, probe_jobs
from edgekit.targets.ep_env import provider_environment, run_in_environment
from edgekit.targets.recipes import Recipe, parse_coverage, shipped_recipes

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "eps"
PROVIDERS = ("qnn", "openvino")
QNN_DEFAULTS = {"soc_model": "60", "htp_arch": "73", "enable_htp_fp16_precision": "1"}


def _export(recipe: str) -> Path:
    out = WORK / recipe
    cmd = [sys.executable, "-m", "edgekit", "export", "stories260k", "--recipe", recipe, "-o", str(out), "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"export {recipe} failed: {(proc.stderr.strip() or proc.stdout).splitlines()[-1]}")
    return out


def _run(provider: str, jobs: list[ProbeJob], recipe: Recipe) -> list[Probe | str]:
    if provider == "qnn":
        # a QNN recipe's own options reach the probe through the manifest; the others get 8 Gen 2's
        options = {} if short_name(recipe.provider) == "qnn" else QNN_DEFAULTS
        out: list[Probe | str] = []
        for job in jobs:
            try:
                out.append(probe(replace(job, provider="qnn", provider_options=options)))
            except (EdgekitError, RuntimeError) as e:  # a graph QNN cannot finalize is a result, not a crash
                out.append(" ".join(str(e).split())[:200])
        return out
    return run_in_environment(provider_environment(provider, say=print), [replace(j, provider=provider) for j in jobs])


def _share(nodes: dict[str, int], provider: str) -> tuple[int, int]:
    return sum(n for ep, n in nodes.items() if short_name(ep) == provider), sum(nodes.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", help="comma-separated recipe names (default: every shipped recipe)")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    args = ap.parse_args()
    shipped = {r.name: r for r in shipped_recipes()}
    names = args.recipes.split(",") if args.recipes else list(shipped)
    providers = args.providers.split(",")
    for given, known in ((names, shipped), (providers, PROVIDERS)):
        unknown = [n for n in given if n not in known]
        if unknown:
            raise SystemExit(f"unknown: {', '.join(unknown)} (expected some of {', '.join(known)})")
    recipes = [shipped[n] for n in names]
    rows, failures = [], []
    for recipe in recipes:
        bundle = open_bundle(_export(recipe.name))
        graphs = [g for g in bundle_graphs(bundle) if g != "ort"]
        jobs = probe_jobs(bundle, graphs=graphs)
        host = [probe(job) for job in jobs]
        for provider in providers:
            for job, mine, theirs in zip(jobs, host, _run(provider, jobs, recipe), strict=True):
                row = {"recipe": recipe.name, "provider": provider, "graph": job.graph}
                if isinstance(theirs, str):
                    row["error"] = theirs
                else:
                    on, total = _share(theirs.nodes, provider)
                    a = compare(mine, theirs, job.text_ids)
                    row.update(on=on, total=total, agreement=a.to_dict())
                rows.append(row)
                promised = parse_coverage(recipe.coverage).get(provider, {}).get(job.graph)
                if promised is None:
                    continue
                pct, verdict = promised
                if "error" in row:
                    failures.append(
                        f"{recipe.name} {provider} {job.graph}: recorded {pct}% {verdict}, now {row['error']}"
                    )
                elif (share := 100 * row["on"] // row["total"]) < pct or VERDICTS.index(
                    row["agreement"]["verdict"]
                ) > VERDICTS.index(verdict):  # recorded: the share's floor, the worst verdict allowed
                    now = f"{share}% {row['agreement']['verdict']}"
                    failures.append(f"{recipe.name} {provider} {job.graph}: recorded {pct}% {verdict}, now {now}")
    print("| recipe | provider | graph | nodes on it | verdict | greedy | top-1 | ppl (EP vs CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['recipe']} | {r['provider']} | {r['graph']} | error: {r['error'][:80]} | | | | |")
            continue
        a = r["agreement"]
        print(
            f"| {r['recipe']} | {r['provider']} | {r['graph']} | {r['on']}/{r['total']} | {a['verdict']} | "
            f"{a['greedy_same']}/{a['greedy_total']} | {100 * a['top1']:.1f}% | "
            f"{a['other_ppl']:.3f} vs {a['host_ppl']:.3f} |"
        )
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK.parent / "ep_coverage.json").write_text(json.dumps({"rows": rows, "failures": failures}, indent=1))
    for line in failures:
        print("FAIL", line)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
