"""Attention-sublayer importance (analyze), --skip auto:N, and non-contiguous skip sets, on stories260K."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from edgekit.bundle.folder import read_bundle
from edgekit.checkpoint.load import load_torch_model, open_checkpoint
from edgekit.cli import main
from edgekit.export.pipeline import ExportRequest, export
from edgekit.quality.analyze import analyze_checkpoint
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
    """What `--skip auto:N` sees by default: the shipped calibration text, default budget and fill, 4 rounds."""
    return analyze_checkpoint(ckpt, model=model, rounds=4)


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
    assert analysis.cosine.order[0] == analysis.ranking()[0]  # cosine round one is the paper's one-shot ranking
    for n in range(5):
        rec = analysis.recommend(n)
        for rule in (rec.auto, rec.cosine, rec.gatenorm):
            assert len(rule) == len(set(rule)) == n and all(0 <= i < 5 for i in rule)
        assert rec.last_n == list(range(5 - n, 5))
    # Every greedy round scores only the layers still holding attention, and the pick is the cheapest
    # among those measured on every token.
    for greedy in (analysis.auto, analysis.cosine):
        for r, scores in enumerate(greedy.rounds):
            assert sorted(map(int, scores)) == sorted(set(range(5)) - set(greedy.order[:r]))
    for r, scores in enumerate(analysis.auto.rounds):
        assert scores[str(analysis.auto.order[r])] == min(scores.values())
    assert analysis.auto.ppl_after[0] > analysis.baseline_ppl
    assert all(hasattr(layer, "self_attn") for layer in model.model.layers)


def test_measured_greedy_picks_the_removal_closest_to_the_intact_model(ckpt, model, monkeypatch):
    """Round one of auto:N, without successive halving, is the argmin of the KL from the intact model,
    each candidate removed with its mean fill, computed here directly; its perplexity is what
    --skip-measure reports for that layer removed alone."""
    import edgekit.quality.select as select
    from edgekit.quality.analyze import open_layerwise

    monkeypatch.setattr(select, "RACE_STAGES", 1)
    a = analyze_checkpoint(ckpt, token_budget=1024, model=model, rounds=1, measure=True)
    lw, _, _ = open_layerwise(ckpt, None, 1024, model)
    intact = lw.trace({}, "mean")
    kl = {}
    for i in range(5):
        parts = [lw.chunk_kl_from(i, h, c, {i: intact.attention_mean[i]}) for c, h in enumerate(intact.inputs[i])]
        kl[i] = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    assert a.auto.order == [min(kl, key=kl.get)]
    assert a.auto.rounds[0] == pytest.approx({str(i): v for i, v in kl.items()}, rel=1e-4)
    pick = a.layers[a.auto.order[0]]
    assert a.auto.ppl_after[0] == pytest.approx(pick.ppl_mean, rel=1e-5)
    assert all(s.ppl_zero > a.baseline_ppl and s.ppl_mean > 0 for s in a.layers)
    # The fill is not a no-op: on layer 0 (the largest mean output) it changes the cost a lot.
    assert abs(a.layers[0].ppl_mean - a.layers[0].ppl_zero) > 0.1 * a.baseline_ppl


def test_gate_norm_reads_only_the_weights(ckpt, model):
    """Data-free: the same numbers from the checkpoint's arrays as from the loaded model's q/k/norm."""
    from edgekit.quality.select import gate_norm_scores

    scores = gate_norm_scores(ckpt)
    layer = model.model.layers[2]
    g = layer.input_layernorm.weight.detach().double()
    q = (layer.self_attn.q_proj.weight.detach().double() * g).reshape(ckpt.spec.heads, ckpt.spec.head_dim, -1)
    k = (layer.self_attn.k_proj.weight.detach().double() * g).reshape(ckpt.spec.kv_heads, ckpt.spec.head_dim, -1)
    k = k.repeat_interleave(ckpt.spec.heads // ckpt.spec.kv_heads, dim=0)
    direct = torch.linalg.matrix_norm(q.transpose(1, 2) @ k).mean() / ckpt.spec.head_dim**0.5
    assert scores[2] == pytest.approx(float(direct), rel=1e-9)
    assert scores.shape == (5,) and (scores > 0).all()


def test_auto_is_never_measurably_worse_than_last_n_on_held_out_tinystories(ckpt, corpora):
    """Both with the default fill, through eval's real path, on the TinyStories validation subset (15.5K
    tokens, not the calibration text): auto:N is never above the upper end of last-N's 95 % interval,
    and over N=1-3 its mean log-perplexity is no worse. Measured numbers: BENCHMARKS.md."""
    from edgekit.quality.evaluate import EvalRequest, evaluate

    text = corpora / "tinystories-valid-subset.txt"
    log_auto, log_last = [], []
    for n in range(1, 4):
        auto = evaluate(EvalRequest(target="stories260k", skip=f"auto:{n}", text=text, threads=1)).perplexity
        last = evaluate(EvalRequest(target="stories260k", skip=n, text=text, threads=1)).perplexity
        assert auto.perplexity <= last.ci95[1], (n, auto.perplexity, last.ci95)
        log_auto.append(auto.mean_nll)
        log_last.append(last.mean_nll)
    assert np.mean(log_auto) <= np.mean(log_last)


def test_auto_export_records_ranking_and_passes_parity(tmp_path, analysis):
    result = export(ExportRequest(model="stories260k", skip="auto:2", output=tmp_path / "auto2"))
    sk = result.manifest["skip"]
    assert sk["rule"] == "auto:2"
    assert sk["skipped"] == analysis.recommend(2).auto
    assert len(set(sk["skipped"])) == 2
    assert sk["ranking"]["order"] == analysis.auto.order[:2]
    assert sk["ranking"]["method"].startswith("measured greedy") and len(sk["ranking"]["rounds"]) == 2
    assert sk["fill"]["kind"] == "mean" and sk["fill"]["layers"] == sk["skipped"]
    v = result.manifest["verification"]
    assert v["passed"] and v["top1_agreement"] == 1.0 and v["greedy_match"]
    slots = result.manifest["graph"]["kv_slots"]
    assert [s["layer"] for s in slots] == sk["kept"]


def test_non_contiguous_skip_set_exports_and_decodes_like_pytorch(bundle_factory, ckpt, model):
    """Skip 1 and 3: three KV slots for layers 0, 2, 4; 24 cached decode steps equal PyTorch."""
    bundle = read_bundle(bundle_factory(skip_layers="1,3", quant="fp32", fill="zero"))
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
    import edgekit.quality.choose
    from edgekit.errors import EdgekitError
    from edgekit.quality.evaluate import EvalRequest, evaluate

    seen: list = []
    real = edgekit.quality.choose.auto_skip

    def spy(ckpt, rule, n, fill, calib=None, **kw):
        seen.append(calib)
        return real(ckpt, rule, n, fill, calib, token_budget=512)

    monkeypatch.setattr(edgekit.quality.choose, "auto_skip", spy)
    calib = corpora / "tinystories-valid-subset.txt"
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat. The cat liked to play in the sun.\n")
    result = evaluate(EvalRequest(target="stories260k", skip="auto:1", calib=calib, text=text, threads=1))
    assert seen == [calib]
    assert len(result.model["skipped"]) == 1
    with pytest.raises(EdgekitError, match="drop --skip/--skip-layers/--calib"):
        evaluate(EvalRequest(target=str(bundle_factory(skip=0, quant="fp32")), calib=calib, text=text))


def test_rankings_are_cached_and_a_longer_one_answers_a_shorter_n(ckpt, monkeypatch, tmp_path):
    import edgekit.quality.choose as choose

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path))
    three = choose.rank(ckpt, "auto", 3, "mean", token_budget=512)
    assert len(list((tmp_path / "skip-rankings").glob("*.json"))) == 1

    def no_measuring(*args, **kwargs):
        raise AssertionError("ranked again instead of reading the cache")

    monkeypatch.setattr(choose, "measured_greedy", no_measuring)
    assert choose.rank(ckpt, "auto", 3, "mean", token_budget=512) == three
    two = choose.rank(ckpt, "auto", 2, "mean", token_budget=512)
    assert two["order"] == three["order"][:2] and two["ppl_after"] == three["ppl_after"][:2]
    with pytest.raises(AssertionError, match="ranked again"):  # another fill is another ranking
        choose.rank(ckpt, "auto", 2, "zero", token_budget=512)
    other = tmp_path / "other.txt"
    other.write_text("Once upon a time there was a little dog. The dog liked to run in the park.\n" * 20)
    with pytest.raises(AssertionError, match="ranked again"):  # so is another calibration text
        choose.rank(ckpt, "auto", 2, "mean", calib=other, token_budget=512)


def test_gatenorm_needs_no_calibration_text_and_cosine_matches_analyze(ckpt, model, analysis):
    from edgekit.quality.choose import auto_skip

    g = auto_skip(ckpt, "gatenorm", 2, "zero", calib=None)
    assert g.rule == "gatenorm:2" and list(g.skipped) == analysis.recommend(2).gatenorm
    c = auto_skip(ckpt, "cosine", 2, "mean", token_budget=analysis.tokens)
    assert list(c.skipped) == analysis.recommend(2).cosine


def test_a_longer_ranking_continues_the_cached_shorter_one(ckpt, monkeypatch, tmp_path):
    import edgekit.quality.choose as choose

    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "a"))
    scratch = choose.rank(ckpt, "auto", 3, "mean", token_budget=512)
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "b"))
    choose.rank(ckpt, "auto", 1, "mean", token_budget=512)
    starts = []
    real = choose.measured_greedy

    def spy(lw, n, fill, prefilter, start=None):
        starts.append(list(start.order))
        return real(lw, n, fill, prefilter, start=start)

    monkeypatch.setattr(choose, "measured_greedy", spy)
    resumed = choose.rank(ckpt, "auto", 3, "mean", token_budget=512)
    assert starts == [scratch["order"][:1]]  # only rounds 2 and 3 were measured
    assert resumed["order"] == scratch["order"]
    assert resumed["ppl_after"] == pytest.approx(scratch["ppl_after"], rel=1e-5)
