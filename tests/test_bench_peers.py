"""The parts of bench/peers.py that need no peer toolchain: the timing child on a real edgekit bundle, its
perplexity mode, the bytes a decode step reads (the roofline's numerator), the KV renumbering of the
patched genai builder and the Pareto front. Building and timing the peers themselves is `make
bench-peers`, not a test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import peers_child  # noqa: E402
import peers_pareto  # noqa: E402
import peers_report  # noqa: E402
import peers_tools  # noqa: E402


def test_child_times_an_edgekit_bundle(bundle_factory):
    bundle = bundle_factory(skip=1, quant="int4")
    spec = {
        "kind": "edgekit",
        "path": str(bundle),
        "threads": 1,
        "prompt_lens": [8, 32],
        "gen_len": 4,
        "warmup": 1,
        "capacity": 64,
        "prompt_ids": list(range(1, 40)),
    }
    proc = subprocess.run(
        [sys.executable, str(BENCH / "peers_child.py")], input=json.dumps(spec), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.splitlines()[-1])
    assert [s["prompt_len"] for s in res["settings"]] == [8, 32]
    assert all(s["ttft_s"] > 0 and 0 < s["decode_ms_median"] <= s["decode_ms_p90"] for s in res["settings"])
    assert res["peak_rss_bytes"] > 10 * 2**20 and res["load_s"] > 0


def test_decode_bytes_leave_out_only_the_embedding_table(bundle_factory):
    bundle = bundle_factory(quant="int8")
    total, embed = peers_report._onnx_bytes(bundle, None)
    model = onnx.load(str(bundle / "model.onnx"))
    sizes = {t.name: numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    assert total == sum(sizes.values())
    assert embed == sum(n for name, n in sizes.items() if "embed_tokens" in name) > 0
    assert embed < total


def test_genai_skip_drops_and_renumbers_the_kv_cache(tmp_path):
    """Layers 0-2 as the builder writes them after layer 1 lost its attention: slot 1's past/present are dead."""
    kv = [1, 2, 0, 4]
    inputs, outputs, nodes = [], [], []
    for i in range(3):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, kv))
            if i != 1:
                nodes.append(helper.make_node("Identity", [f"past_key_values.{i}.{kind}"], [f"present.{i}.{kind}"]))
    graph = helper.make_graph(nodes, "g", inputs, [o for o in outputs if ".1." not in o.name])
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), tmp_path / "model.onnx"
    )
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"decoder": {"num_hidden_layers": 3}}}))

    peers_tools._drop_skipped_kv(tmp_path, {1})

    sess = ort.InferenceSession(str(tmp_path / "model.onnx"))
    names = sorted(i.name for i in sess.get_inputs())
    assert names == [f"past_key_values.{j}.{k}" for j in (0, 1) for k in ("key", "value")]
    feeds = {n: np.full(kv, float(k), np.float32) for k, n in enumerate(names)}
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    # the old layer 2 is slot 1 now, on both sides
    assert np.array_equal(out["present.1.value"], feeds["past_key_values.1.value"])
    assert json.loads((tmp_path / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 2


def test_layer_lists():
    assert peers_tools.parse_layers("16-21") == [16, 17, 18, 19, 20, 21]
    assert peers_tools.parse_layers("4") == [4]
    assert peers_tools.parse_layers("") == []


def _child(spec: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "peers_child.py")], input=json.dumps(spec), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_child_perplexity_is_the_same_through_both_onnx_runners(bundle_factory):
    """The ppl mode scores a bundle through edgekit's runtime and through bare onnxruntime (how genai's
    builder output is scored) alike, and real text scores far better than the same tokens shuffled."""
    from tokenizers import Tokenizer

    bundle = bundle_factory()  # stories260K, fp32
    text = (Path(__file__).resolve().parents[1] / "edgekit" / "data" / "calib-tinystories.txt").read_text()
    ids = Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(text).ids[:300]
    spec = {"mode": "ppl", "path": str(bundle), "threads": 1, "ppl_ids": ids, "chunk": 128}
    ours, bare = _child(spec | {"kind": "edgekit"}), _child(spec | {"kind": "genai"})
    assert ours["scored_tokens"] == 127 + 127 + 43  # each chunk starts afresh: its first token is not scored
    assert abs(ours["perplexity"] - bare["perplexity"]) < 1e-4 * ours["perplexity"]
    shuffled = list(np.random.default_rng(0).permutation(ids))
    worse = _child(spec | {"kind": "edgekit", "ppl_ids": [int(i) for i in shuffled]})
    assert 1 < ours["perplexity"] < 20 < worse["perplexity"]


def test_perplexity_of_known_logits():
    """Uniform logits over V tokens score exactly V; a chunk's first token is never scored."""
    assert abs(peers_child.perplexity(lambda ids: np.zeros((len(ids), 7)), [1, 2, 3, 4, 5], 2)["perplexity"] - 7) < 1e-9
    sure = peers_child.perplexity(lambda ids: np.eye(10)[[*ids[1:], 0]] * 50, [3, 1, 4, 1, 5], 5)
    assert sure["scored_tokens"] == 4 and sure["perplexity"] < 1.001


def test_pareto_front_keeps_what_nothing_beats_on_both():
    pts = [("a", "edgekit", 10.0, 15.0, 1), ("b", "genai", 9.0, 20.0, 1), ("c", "llama.cpp", 12.0, 14.0, 1),
           ("d", "optimum", 11.0, 16.0, 1), ("e", "genai", 13.0, 14.5, 1)]  # fmt: skip
    assert [p[0] for p in peers_pareto.pareto_front(pts)] == ["b", "a", "c"]
