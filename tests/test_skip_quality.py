"""Skipping on the real 30-layer model (SmolLM2-135M-Instruct): the ranking beats the paper's last-N rule,
and an export of the last N says so when it wrecks the model.

The measured auto:8 ranking runs once (about two minutes on two cores) and lands in edgekit's ranking
cache; auto:4 is its first four picks. Perplexity is PyTorch fp32 on 2,048 tokens of WikiText-2's first half,
which the calibration excerpt (second half) does not contain.
"""

from __future__ import annotations

import json

import pytest

from edgekit.export.pipeline import ExportRequest, export
from edgekit.export.quantize import QuantConfig
from edgekit.quality.evaluate import EvalRequest, evaluate


def _ppl(gguf, corpora, **skip):
    text = corpora / "wikitext-2-valid.txt"
    req = EvalRequest(target=str(gguf), text=text, separator=None, max_tokens=2048, threads=2, **skip)
    return evaluate(req).perplexity


@pytest.mark.parametrize("n", [8, 4])
def test_auto_is_never_worse_than_last_n_beyond_the_interval(smollm2_gguf, corpora, n):
    """Both with the defaults (fill mean). Measured: BENCHMARKS.md, "Skipping attention on SmolLM2"."""
    auto = _ppl(smollm2_gguf, corpora, skip=f"auto:{n}")
    last = _ppl(smollm2_gguf, corpora, skip=n)
    assert auto.perplexity <= last.ci95[1], (auto.perplexity, last.ci95)
    if n == 8:  # where the last-N rule removes a critical layer (24), the ranking is far better
        assert auto.perplexity < last.ci95[0], (auto.perplexity, last.ci95)


def test_skip_8_warns_with_both_numbers_and_a_better_set(smollm2_gguf, tmp_path):
    req = ExportRequest(
        model=str(smollm2_gguf), skip=8, fill="zero", quant=QuantConfig(mode="int8"), output=tmp_path / "last8"
    )
    m = export(req).manifest
    v, skip = m["verification"], m["skip"]
    assert skip["skipped"] == list(range(22, 30)) and skip["fill"] == {"kind": "zero"}
    assert v["ppl_onnx"] > 5 * v["ppl_unskipped_fp32"], v  # the paper's rule wrecks this model
    (warning,) = m["warnings"]
    assert f"{v['ppl_onnx']:.2f} vs {v['ppl_unskipped_fp32']:.2f}" in warning
    assert "instead costs" in warning and "--skip auto:8" in warning, warning
    suggested = warning.split("removing ")[2].split(" instead")[0]
    assert len(suggested.split(",")) == 8 and suggested != ",".join(map(str, range(22, 30)))
    assert json.loads((tmp_path / "last8" / "edgekit.json").read_text())["warnings"] == [warning]
