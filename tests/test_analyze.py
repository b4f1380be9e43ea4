"""Attention-sublayer importance (analyze), --skip auto:N, and non-contiguous skip sets, on stories260K."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from edgekit.bundle.folder import read_bundle
from edgekit.checkpoint.load import load_torch_model, open_checkpoint
from edgekit.cli import main
from edgekit.export.pipeline import ExportRequest, export
from edgekit.quality.analyze import analyze_checkpoint
from edgekit.quality.perplexity import PerplexityResult, perplexity, split_documents
from edgekit.runtime.session import DecoderSession
from edgekit.skip.skipset import SkipSet
from edgekit.skip.surgery import apply_skip, full_logits


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # A 260K-parameter model gains nothing from a second thread; on a busy 2-core machine the second
    # one's spinning made each forward pass ~10x more expensive.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ckpt(stories_path):
    return open_checkpoint(stories_path, "stories260k")


@pytest.fixture(scope="module")
def model(ckpt):
    return load_torch_model(ckpt)


@pytest.fixture(scope="module")
def analysis(ckpt, model):
    """What `--skip auto:N` sees by default: the shipped calibration text, default budget, every greedy round."""
    return analyze_checkpoint(ckpt, model=model)


def test_one_score_per_layer_in_range_and_deterministic(ckpt, model):
    a = analyze_checkpoint(ckpt, token_budget=512, model=model, rounds=1)
    b = analyze_checkpoint(ckpt, token_budget=512, model=model, rounds=1)
    assert [s.layer for s in a.layers] == list(range(5))
    assert a.tokens == 512
    assert all(0 < s.importance <= 2 for s in a.layers)  # every real attention sublayer turns the stream a bit
    assert [s.importance for s in a.layers] == [s.importance for s in b.layers]
    assert a.ranking() == b.ranking() and sorted(a.ranking()) == list(range(5))


def test_score_is_zero_for_an_attention_sublayer_that_adds_nothing(ckpt, model):
    """Zeroing o_proj makes layer 3's attention output exactly 0: in == out, so 1 − cos must be 0."""
    base = analyze_checkpoint(ckpt, token_budget=256, model=model, rounds=1)
    silent = copy.deepcopy(model)
    with torch.no_grad():
        silent.model.layers[3].self_attn.o_proj.weight.zero_()
    a = analyze_checkpoint(ckpt, token_budget=256, model=silent, rounds=1)
    assert a.layers[3].importance == pytest.approx(0, abs=1e-9)
    # Layers before 3 see the same inputs, so their scores do not move.
    assert [s.importance for s in a.layers[:3]] == pytest.approx([s.importance for s in base.layers[:3]], rel=1e-9)
    assert a.ranking()[0] == 3


def test_auto_picks_distinct_valid_layers_and_leaves_the_model_intact(analysis, model):
    assert analysis.auto_order[0] == analysis.ranking()[0]  # round one is the paper's one-shot ranking
    for n in range(5):
        rec = analysis.recommend(n)
        assert len(rec.auto) == len(set(rec.auto)) == n
        assert all(0 <= i < 5 for i in rec.auto)
        assert rec.last_n == list(range(5 - n, 5))
    # Every greedy round scores only the layers still holding attention.
    for r, scores in enumerate(analysis.auto_scores):
        assert sorted(map(int, scores)) == sorted(set(range(5)) - set(analysis.auto_order[:r]))
    assert all(hasattr(layer, "self_attn") for layer in model.model.layers)


def test_auto_is_never_measurably_worse_than_last_n_on_held_out_tinystories(analysis, ckpt, model, corpora):
    """Perplexity on the whole TinyStories validation subset (15.5K tokens, not the calibration text).

    What was measured (PyTorch fp32, window 512, stride 256, same as `edgekit eval` on the fp32 bundles):
    N=1: auto {2} 6.76 vs last {4} 6.65, 1.7 % worse but inside last-1's 95 % interval (6.45-6.86);
    N=2: auto {2,4} 8.69 vs last {3,4} 9.06, 4.1 % better; N=3, 4: both rules pick the same layers.
    So "no worse than last-N for every N" does not hold strictly at N=1. What this checks instead:
    auto:N is never measurably worse (below the upper end of last-N's interval), it is better beyond
    last-N's interval for some N, and over N=1-4 its mean log-perplexity is no worse than last-N's.
    """
    tok = Tokenizer.from_file(str(ckpt.path / "tokenizer.json"))
    text = (corpora / "tinystories-valid-subset.txt").read_text(encoding="utf-8")
    docs = [tok.encode(d).ids for d in split_documents(text)]
    cache: dict[tuple, PerplexityResult] = {}

    def ppl(layers: list[int]) -> PerplexityResult:
        key = tuple(sorted(layers))
        if key not in cache:
            m = apply_skip(copy.deepcopy(model), SkipSet.explicit(list(key), 5))
            cache[key] = perplexity(lambda ids: full_logits(m, ids).numpy(), docs, window=512)
        return cache[key]

    clearly_better = 0
    log_auto, log_last = [], []
    for n in range(1, 5):
        rec = analysis.recommend(n)
        auto, last = ppl(rec.auto), ppl(rec.last_n)
        assert auto.perplexity <= last.ci95[1], (n, rec.auto, auto.perplexity, rec.last_n, last.ci95)
        clearly_better += auto.perplexity < last.ci95[0]
        log_auto.append(auto.mean_nll)
        log_last.append(last.mean_nll)
    assert clearly_better >= 1
    assert np.mean(log_auto) <= np.mean(log_last)


def test_auto_export_records_ranking_and_passes_parity(tmp_path, analysis):
    result = export(ExportRequest(model="stories260k", skip="auto:2", output=tmp_path / "auto2"))
    sk = result.manifest["skip"]
    assert sk["rule"] == "auto:2"
    assert sk["skipped"] == analysis.recommend(2).auto
    assert len(set(sk["skipped"])) == 2
    assert sk["ranking"]["order"] == analysis.auto_order[:2]
    assert set(sk["ranking"]["importance"]) == {str(i) for i in range(5)}
    v = result.manifest["verification"]
    assert v["passed"] and v["top1_agreement"] == 1.0 and v["greedy_match"]
    slots = result.manifest["graph"]["kv_slots"]
    assert [s["layer"] for s in slots] == sk["kept"]


def test_non_contiguous_skip_set_exports_and_decodes_like_pytorch(bundle_factory, ckpt, model):
    """Skip 1 and 3: three KV slots for layers 0, 2, 4; 24 cached decode steps equal PyTorch."""
    bundle = read_bundle(bundle_factory(skip_layers="1,3", quant="fp32"))
    m = bundle.manifest
    assert m["skip"]["skipped"] == [1, 3] and m["skip"]["kept"] == [0, 2, 4]
    assert [(s["slot"], s["layer"]) for s in m["graph"]["kv_slots"]] == [(0, 0), (1, 2), (2, 4)]
    session = DecoderSession(bundle.model_file)
    assert session.kv_slots == 3
    skipped = apply_skip(copy.deepcopy(model), SkipSet.explicit([1, 3], 5))
    ids = [1, 403, 407, 261, 378]
    logits, cache = session.forward(np.asarray([ids]))
    steps = [logits[0]]
    for _ in range(24):
        tok = int(logits[0, -1].argmax())
        ids.append(tok)
        logits, cache = session.forward(np.asarray([[tok]]), cache)
        steps.append(logits[0])
    got = np.concatenate(steps)  # one row per position of `ids`
    ref = full_logits(skipped, ids).numpy()
    assert cache.length == len(ids)
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_analyze_cli_json_plot_and_bad_n(tmp_path, capsys):
    png = tmp_path / "layers.png"
    with pytest.raises(SystemExit) as e:
        main(["analyze", "stories260k", "--tokens", "256", "--n", "2", "--json", "--plot", str(png)])
    assert e.value.code == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["layers"]) == 5 and data["tokens"] == 256
    assert len(data["recommendation"]["auto"]) == 2 and data["recommendation"]["last_n"] == [3, 4]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as e:
        main(["analyze", "stories260k", "--tokens", "256", "--n", "5"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("edgekit: error: --n 5") and "Traceback" not in err


def test_eval_auto_skip_ranks_on_the_given_calibration_text(corpora, monkeypatch, tmp_path, bundle_factory):
    import edgekit.quality.analyze
    from edgekit.errors import EdgekitError
    from edgekit.quality.evaluate import EvalRequest, evaluate

    seen: list = []
    real = edgekit.quality.analyze.auto_skip

    def spy(ckpt, n, calib=None, **kw):
        seen.append(calib)
        return real(ckpt, n, calib, token_budget=512)

    monkeypatch.setattr(edgekit.quality.analyze, "auto_skip", spy)
    calib = corpora / "tinystories-valid-subset.txt"
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat. The cat liked to play in the sun.\n")
    result = evaluate(EvalRequest(target="stories260k", skip="auto:1", calib=calib, text=text, threads=1))
    assert seen == [calib]
    assert len(result.model["skipped"]) == 1
    with pytest.raises(EdgekitError, match="drop --skip/--skip-layers/--calib"):
        evaluate(EvalRequest(target=str(bundle_factory(skip=0, quant="fp32")), calib=calib, text=text))
