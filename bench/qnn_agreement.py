"""The Qualcomm NPU recipes on QNN's HTP simulator against the CPU: coverage, agreement, perplexity.

    python bench/qnn_agreement.py                 # stories260K, both recipes (fp16 and QDQ)
    python bench/qnn_agreement.py --model smollm2 # SmolLM2-135M, the fp16 recipe, 64 tokens (~4 min)

Per recipe, the bundle `edgekit export stories260k --recipe R` makes; its fixed-shape pair run on QNN
(onnxruntime-qnn's plugin EP, the recipe's soc_model/htp_arch) and on the CPU EP, and the fp32 dynamic
graph of the same model on the CPU: greedy tokens after an 8-token prompt, top-1 and perplexity over
128 tokens of held-out TinyStories (edgekit.runtime.agreement). SmolLM2 (--model smollm2): 64 tokens of
WikiText-2 valid and 16 greedy tokens, the fp16 recipe only: the simulator takes ~2.5 min for them, and the
QDQ recipe's calibration would hold 128 decode feeds of a 1,023-slot KV window (~5.6 GB). The
simulator's speed is not a device figure and is not reported.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from edgekit.bundle.folder import open_bundle
from edgekit.runtime.agreement import compare, probe
from edgekit.runtime.providers import short_name
from edgekit.targets.emulate import probe_jobs

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "qnn"
CORPORA = ROOT.parent / "shared" / "corpora"
# model -> (what `edgekit export` takes, recipes, probe text, text tokens, greedy tokens)
MODELS = {
    "stories260k": ("stories260k", ("qualcomm-npu", "qualcomm-npu-qdq"), "tinystories-valid-subset.txt", 128, 32),
    "smollm2": ("smollm2-135m-instruct", ("qualcomm-npu",), "wikitext-2-valid.txt", 64, 16),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="stories260k")
    model, recipes, text_name, tokens, new_tokens = MODELS[ap.parse_args().model]
    text = CORPORA / text_name
    rows = []
    export = [sys.executable, "-m", "edgekit", "export", model]
    fp32 = WORK / f"{model}-fp32"
    subprocess.run([*export, "--quant", "fp32", "-o", str(fp32), "--force"], check=True, capture_output=True)
    reference_job = probe_jobs(open_bundle(fp32), graphs=["onnx"], text=text, tokens=tokens, new_tokens=new_tokens)[0]
    reference = probe(reference_job)
    for recipe in recipes:
        out = WORK / f"{model}-{recipe}"
        subprocess.run([*export, "--recipe", recipe, "-o", str(out), "--force"], check=True, capture_output=True)
        bundle = open_bundle(out)
        job = probe_jobs(bundle, graphs=["fixed"], text=text, tokens=tokens, new_tokens=new_tokens)[0]
        on_cpu, on_qnn = probe(job), probe(replace(job, provider="qnn"))
        on = sum(n for ep, n in on_qnn.nodes.items() if short_name(ep) == "qnn")
        total = sum(on_qnn.nodes.values())
        pairs = {
            "QNN vs the same pair on CPU": (on_cpu, on_qnn),
            "QNN vs fp32 on CPU": (reference, on_qnn),
            "the pair on CPU vs fp32 on CPU": (reference, on_cpu),
        }
        for label, (first, second) in pairs.items():
            a = compare(first, second, job.text_ids)
            rows.append(
                f"| {model} {recipe} | {on}/{total} | {label} | {a.greedy_same}/{a.greedy_total} | "
                f"{100 * a.top1:.1f}% | {a.max_abs_dlogit:.2g} | {a.other_ppl:.3f} vs {a.host_ppl:.3f} |"
            )
    print(
        "| recipe | nodes on QNN (prefill+decode) | comparison | greedy | top-1 | max abs dlogit | ppl (2nd vs 1st) |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
