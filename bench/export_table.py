"""The export issue's numbers for the embedded model: bundle size, parity and export time per skip × quant.

python bench/export_table.py            # prints a Markdown table (BENCHMARKS.md, "Export")
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from edgekit.export.pipeline import ExportRequest, export
from edgekit.export.quantize import QuantConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="stories260k")
    ap.add_argument("--skips", default="0,2")
    ap.add_argument("--quants", default="fp32,fp16,int8,int4")
    args = ap.parse_args()
    print(
        "| skip | weights | lm_head | model.onnx bytes | max abs Δlogit | top-1 | greedy | ppl bundle | ppl fp32 | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for skip in (int(s) for s in args.skips.split(",")):
            for mode in args.quants.split(","):
                lm_bits_options = [8, 4] if mode == "int4" else [None]
                for lm_bits in lm_bits_options:
                    out = Path(tmp) / f"{skip}-{mode}-{lm_bits}"
                    r = export(
                        ExportRequest(
                            model=args.model, skip=skip, output=out, quant=QuantConfig(mode=mode, lm_head_bits=lm_bits)
                        )
                    )
                    m, v = r.manifest, r.manifest["verification"]
                    ppl = f"{v['ppl_onnx']:.3f}" if v.get("ppl_onnx") else "–"
                    ppl_ref = f"{v['ppl_torch_fp32']:.3f}" if v.get("ppl_torch_fp32") else "–"
                    print(
                        f"| {skip} | {mode} | {m['quantization']['lm_head']} | {m['files']['model.onnx']['bytes']:,} "
                        f"| {v['max_abs_logit_diff']:.2e} | {v['top1_agreement']:.0%} | "
                        f"{'match' if v['greedy_match'] else 'differ'} | {ppl} | {ppl_ref} | {r.seconds['total']:.1f} |"
                    )


if __name__ == "__main__":
    main()
