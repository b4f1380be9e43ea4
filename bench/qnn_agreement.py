"""The Qualcomm NPU recipes on QNN's HTP simulator against the CPU: coverage, agreement, perplexity.

    python bench/qnn_agreement.py                 # stories260K, both recipes (fp16 and QDQ)

Per recipe, the bundle `edgekit export stories260k --recipe R` makes; its fixed-shape pair run on QNN
(onnxruntime-qnn's plugin EP, the recipe's soc_model/htp_arch) and on the CPU EP, and the fp32 dynamic
graph of the same model on the CPU: greedy tokens after an 8-token prompt, top-1 and perplexity over
128 tokens of held-out TinyStories (edgekit.runtime.agreement). The simulator's speed is not a device
figure and is not reported.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from edgekit.bundle.folder import open_bundle
from edgekit.runtime.agreement import compare, probe
from edgekit.runtime.providers import RuntimeOptions, short_name
from edgekit.targets.emulate import probe_jobs

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "qnn"
TEXT = ROOT.parent / "shared" / "corpora" / "tinystories-valid-subset.txt"


def main() -> None:
    from edgekit.runtime.fixed_engine import open_fixed

    rows = []
    export = [sys.executable, "-m", "edgekit", "export", "stories260k"]
    fp32 = WORK / "fp32"
    subprocess.run([*export, "--quant", "fp32", "-o", str(fp32), "--force"], check=True, capture_output=True)
    reference_job = probe_jobs(open_bundle(fp32), graphs=["onnx"], text=TEXT, tokens=128, new_tokens=32)[0]
    reference = probe(reference_job)
    for recipe in ("qualcomm-npu", "qualcomm-npu-qdq"):
        out = WORK / recipe
        subprocess.run([*export, "--recipe", recipe, "-o", str(out), "--force"], check=True, capture_output=True)
        bundle = open_bundle(out)
        job = probe_jobs(bundle, graphs=["fixed"], text=TEXT, tokens=128, new_tokens=32)[0]
        on_cpu, on_qnn = probe(job), probe(replace(job, provider="qnn"))
        placement = open_fixed(out, bundle.manifest["fixed_shapes"]["files"], RuntimeOptions(provider="qnn"))[1]
        on = sum(n for ep, n in placement.nodes.items() if short_name(ep) == "qnn")
        pairs = {
            "QNN vs the same pair on CPU": (on_cpu, on_qnn),
            "QNN vs fp32 on CPU": (reference, on_qnn),
            "the pair on CPU vs fp32 on CPU": (reference, on_cpu),
        }
        for label, (first, second) in pairs.items():
            a = compare(first, second, job.text_ids)
            rows.append(
                f"| {recipe} | {on}/{placement.total} | {label} | {a.greedy_same}/{a.greedy_total} | "
                f"{100 * a.top1:.1f}% | {a.max_abs_dlogit:.2g} | {a.other_ppl:.3f} vs {a.host_ppl:.3f} |"
            )
    print(
        "| recipe | nodes on QNN (prefill+decode) | comparison | greedy | top-1 | max abs dlogit | ppl (2nd vs 1st) |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
