"""The torch-free runtime on the real stories260K bundles: parity with PyTorch, the shared KV buffer,
sampling, stopping, streaming text, and the errors a user can cause."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgekit.errors import EdgekitError
from edgekit.runtime.generator import Generator
from edgekit.runtime.kv_engine import KVEngine
from edgekit.runtime.sampling import GenerationConfig, Sampler
from edgekit.runtime.session import DecoderSession

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def s0(bundle_factory):
    return bundle_factory(skip=0, quant="fp32")


@pytest.fixture(scope="module")
def s2(bundle_factory):
    return bundle_factory(skip=2, quant="fp32")


@pytest.mark.parametrize("skip", [0, 2])
def test_greedy_tokens_equal_pytorch(bundle_factory, stories_path, skip):
    from edgekit.checkpoint.load import load_torch_model, open_checkpoint
    from edgekit.skip.skipset import last_n
    from edgekit.skip.surgery import apply_skip, full_logits

    gen = Generator(bundle_factory(skip=skip, quant="fp32"))
    result = gen.generate(PROMPT, GenerationConfig(max_new_tokens=40, stop_on_eos=False))
    model = apply_skip(load_torch_model(open_checkpoint(stories_path, "s")), last_n(skip, 5))
    ids = list(result.prompt_ids)
    for _ in range(40):
        ids.append(int(full_logits(model, ids)[-1].argmax()))
    assert result.token_ids == ids[len(result.prompt_ids) :]
    assert result.stop_reason == "length"
    if skip == 0:
        assert "Lily" in result.text  # llama2.c's sample story


def test_shared_buffer_equals_plain_session_logits(bundle_factory):
    """IO binding with one past/present buffer gives the same logits and cache as copying presents back."""
    path = bundle_factory(skip=2, quant="fp32")
    gen = Generator(path)
    engine = KVEngine(gen.session, capacity=64)
    plain = DecoderSession(gen.bundle.model_file)
    ids = gen.encode("Once upon a time, there was a little girl named Lily.")
    got = engine.forward(ids[:6])
    ref, cache = plain.forward(np.asarray([ids[:6]]))
    np.testing.assert_allclose(got, ref[0], rtol=0, atol=1e-5)
    buffer_id = id(engine._buffers[0])
    for tok in ids[6:]:
        got = engine.forward([tok])
        ref, cache = plain.forward(np.asarray([[tok]]), cache)
        np.testing.assert_allclose(got, ref[0], rtol=0, atol=1e-5)
    assert engine.length == cache.length == len(ids)
    assert id(engine._buffers[0]) == buffer_id  # no reallocation between steps
    for slot in range(plain.kv_slots):
        for kind in ("key", "value"):
            np.testing.assert_allclose(
                engine.kv(slot, kind), cache.tensors[f"past_key_values.{slot}.{kind}"], atol=1e-6
            )


@pytest.mark.parametrize("quant", ["fp32", "int4"])
def test_last_position_logits_equal_the_full_prefill(bundle_factory, quant):
    """`logits_to_keep` = 1 runs lm_head on the last position only; that row equals the full prefill's,
    and a following step sees the same cache."""
    gen = Generator(bundle_factory(skip=2, quant=quant))
    assert "logits_to_keep" in gen.bundle.manifest["graph"]["inputs"]
    ids = gen.encode("Once upon a time, there was a little girl named Lily.")
    full = KVEngine(gen.session, capacity=64)
    last = KVEngine(gen.session, capacity=64)
    every = full.forward(ids)
    only = last.forward(ids, all_logits=False)
    assert every.shape == (len(ids), full.vocab) and only.shape == (1, full.vocab)
    scale = float(np.abs(every).max())
    np.testing.assert_allclose(only[0], every[-1], rtol=0, atol=1e-5 * scale)
    # the next step with a cache filled by either prefill, and all logits again afterwards
    np.testing.assert_allclose(last.forward([5]), full.forward([5]), rtol=0, atol=1e-5 * scale)
    assert last.forward([6, 7]).shape == (2, full.vocab)


def test_int4_bundle_runs_and_reports_placement(bundle_factory):
    gen = Generator(bundle_factory(skip=2, quant="int4"))
    result = gen.generate(PROMPT, GenerationConfig(max_new_tokens=12))
    assert len(result.token_ids) == 12 and result.text.strip()
    p = gen.placement
    assert p.total > 0 and p.nodes == {"CPUExecutionProvider": p.total} and p.fallback == 0


def test_seeded_sampling_is_reproducible(s0):
    gen = Generator(s0)
    cfg = GenerationConfig(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.95, seed=7, stop_on_eos=False)
    a = gen.generate(PROMPT, cfg)
    b = gen.generate(PROMPT, cfg)
    c = gen.generate(PROMPT, GenerationConfig(max_new_tokens=30, temperature=1.0, seed=8, stop_on_eos=False))
    greedy = gen.generate(PROMPT, GenerationConfig(max_new_tokens=30, stop_on_eos=False))
    assert a.token_ids == b.token_ids and a.text == b.text
    assert c.token_ids != a.token_ids or c.token_ids != greedy.token_ids  # the seed matters
    top1 = gen.generate(PROMPT, GenerationConfig(max_new_tokens=30, temperature=1.0, top_k=1, seed=3))
    assert top1.token_ids == greedy.token_ids[: len(top1.token_ids)]


def test_sampler_respects_top_k_and_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.1, 0.05, 0.05], np.float32))
    seen_k = {Sampler(GenerationConfig(temperature=1.0, top_k=2, seed=s))(logits) for s in range(200)}
    assert seen_k == {0, 1}
    seen_p = {Sampler(GenerationConfig(temperature=1.0, top_p=0.75, seed=s))(logits) for s in range(200)}
    assert seen_p == {0, 1}  # 0.5 + 0.3 is the smallest prefix reaching 0.75
    assert Sampler(GenerationConfig())(logits) == 0


def test_streamed_text_matches_decoding(s0):
    gen = Generator(s0)
    pieces = list(gen.stream(PROMPT, GenerationConfig(max_new_tokens=50)))
    result = gen.last
    assert [t.id for t in pieces] == result.token_ids
    assert "".join(t.text for t in pieces) == result.text
    assert (PROMPT + result.text).strip() == gen.decode(result.prompt_ids + result.token_ids).strip()
    assert result.prefill_s > 0 and len(result.step_s) == 49 and all(s > 0 for s in result.step_s)


def test_stops_on_eos_and_at_the_context(s0):
    gen = Generator(s0)
    first = gen.generate(PROMPT, GenerationConfig(max_new_tokens=5)).token_ids
    k = next(i for i in range(1, 5) if first[i] not in first[:i])
    gen.eos_ids = frozenset({first[k]})
    result = gen.generate(PROMPT, GenerationConfig(max_new_tokens=5))
    assert result.stop_reason == "eos" and result.token_ids == first[:k]
    gen.eos_ids = frozenset()
    ids = gen.encode("Once upon a time " * 200)[: gen.max_context - 3]
    result = gen.generate(ids, GenerationConfig(max_new_tokens=10))
    # positions max_context-3 .. max_context-1 are fed, the last token is produced but not fed
    assert result.stop_reason == "context" and len(result.token_ids) == 4


def test_over_long_prompt_is_a_clear_error(s0):
    gen = Generator(s0)
    with pytest.raises(EdgekitError, match=r"prompt is 513 tokens; this bundle serves at most 512"):
        gen.generate([1] * 513)
    with pytest.raises(EdgekitError, match="empty"):
        gen.generate([])
    with pytest.raises(EdgekitError, match="top-p"):
        GenerationConfig(top_p=0)


def test_runtime_never_imports_torch(s2):
    code = textwrap.dedent(
        f"""
        import sys
        from edgekit.runtime.generator import GenerationConfig, Generator
        r = Generator({str(s2)!r}).generate("Once upon a time", GenerationConfig(max_new_tokens=8))
        assert len(r.token_ids) == 8
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        print("LOADED", bad)
        sys.exit(1 if bad else 0)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LOADED []" in proc.stdout
