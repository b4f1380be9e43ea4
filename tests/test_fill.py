"""--fill mean: a removed attention sublayer leaves its mean output in the residual stream.

The fill is measured once, layer by layer in the skipped model, and then applied identically by the PyTorch reference
(surgery) and by both graph flavours, so fp32 parity holds as tightly as without it.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgekit.export.pipeline import ExportRequest, export
from edgekit.export.quantize import QuantConfig
from edgekit.quality.evaluate import EvalRequest, evaluate
from edgekit.runtime.session import DecoderSession


def _export(tmp_path, name, **kw):
    req = ExportRequest(model="stories260k", quant=QuantConfig(mode="fp32"), output=tmp_path / name, **kw)
    return export(req)


@pytest.mark.parametrize(
    ("skip_layers", "flavour"),
    [("3,4", "fused"), ("0,2", "fused"), ("3,4", "standard")],  # layer 0: no earlier MLP output to fuse with
)
def test_mean_fill_matches_the_pytorch_reference(tmp_path, skip_layers, flavour):
    r = _export(tmp_path, "b", skip_layers=skip_layers, fill="mean", flavour=flavour)
    v = r.manifest["verification"]
    assert v["passed"] and v["greedy_match"], v  # fp32 tolerance against surgery with the same fill
    fill = r.manifest["skip"]["fill"]
    assert fill["kind"] == "mean" and fill["layers"] == [int(x) for x in skip_layers.split(",")]
    assert fill["calib"] == "calib-tinystories.txt" and fill["tokens"] > 1000
    names = {t.name for t in onnx.load(str(r.bundle / "model.onnx")).graph.initializer}
    assert {f"/model/layers.{i}/attn_fill" for i in fill["layers"]} <= names


def test_the_fill_changes_the_model_and_eval_of_the_checkpoint_agrees(tmp_path, corpora):
    zero = _export(tmp_path, "zero", skip_layers="3,4", fill="zero")
    mean = _export(tmp_path, "mean", skip_layers="3,4", fill="mean")
    assert zero.manifest["skip"]["fill"] == {"kind": "zero"}
    ids = [1, 403, 407, 261, 378, 285, 306, 264]
    a = DecoderSession(zero.bundle / "model.onnx").logits(ids)
    b = DecoderSession(mean.bundle / "model.onnx").logits(ids)
    assert np.abs(a - b).max() > 1e-2  # the fill is not a no-op
    text = corpora / "tinystories-valid-subset.txt"
    bundle = evaluate(EvalRequest(target=str(mean.bundle), text=text, max_tokens=512)).perplexity.perplexity
    ckpt = evaluate(
        EvalRequest(target="stories260k", skip_layers="3,4", fill="mean", text=text, max_tokens=512)
    ).perplexity.perplexity
    assert abs(bundle - ckpt) < 1e-3 * ckpt, (bundle, ckpt)


def test_fill_is_refused_for_a_bundle(tmp_path, corpora):
    from edgekit.errors import EdgekitError

    b = _export(tmp_path, "b", skip=1)  # the default fill: mean, the model fits in memory
    with pytest.raises(EdgekitError, match="--fill"):
        evaluate(EvalRequest(target=str(b.bundle), fill="zero", text=corpora / "tinystories-valid-subset.txt"))
    assert json.loads((b.bundle / "edgekit.json").read_text())["skip"]["fill"]["kind"] == "mean"


def test_the_default_calibration_text_follows_what_the_model_was_trained_on(tmp_path, stories_path):
    """TinyStories for the TinyStories model, general English (a WikiText-2 excerpt) for every other."""
    from gguf_testing import write_random_gguf

    from edgekit.checkpoint.load import open_checkpoint
    from edgekit.quality.analyze import default_calib

    assert default_calib(open_checkpoint(stories_path, "stories260k")).name == "calib-tinystories.txt"
    assert default_calib(open_checkpoint(stories_path, str(stories_path))).name == "calib-tinystories.txt"
    gguf = tmp_path / "tiny.gguf"
    write_random_gguf(gguf, qtype="Q8_0")
    assert default_calib(open_checkpoint(gguf, str(gguf))).name == "calib-wikitext2.txt"
    r = export(ExportRequest(model=str(gguf), skip_layers="1", fill="mean", output=tmp_path / "b", verify=False))
    assert r.manifest["skip"]["fill"]["calib"] == "calib-wikitext2.txt"
