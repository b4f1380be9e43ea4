"""One timed run of one contender, inside that contender's own virtual environment.

bench/peers.py starts this file with each peer's Python (edgekit's .venv, or a venv under
bench/work/peers/) and a JSON spec on stdin; it prints one JSON line with seconds and bytes. It imports
only the standard library and numpy at the top, so the same file runs in every environment.

Every contender gets the same token ids and the same protocol, per prompt length P: a fresh sequence,
P prompt tokens in one call (time to first token = that call + picking the first token), then
`warmup` untimed and `gen_len` timed greedy decode steps (one forward + argmax each; the median is
reported). The ids are taken as given; no tokenizer is involved in the timing.

With `"mode": "ppl"` it scores instead: perplexity of `ppl_ids` in chunks of `chunk` tokens, one
prefill each, no BOS, from each tool's own logits for every position (the same protocol for all, so the
numbers compare; `perplexity` below).
"""

from __future__ import annotations

import itertools
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _peak_rss() -> int:
    """This process's own peak: VmHWM starts afresh at exec, whereas ru_maxrss keeps the parent's peak
    from before the fork (bench/peers.py holds a 1 GiB buffer while measuring bandwidth)."""
    try:
        with open("/proc/self/status") as f:
            status = f.read().splitlines()
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _edgekit(spec: dict[str, Any]) -> tuple[float, Any]:
    from edgekit.runtime.generator import GenerationConfig, Generator
    from edgekit.runtime.providers import RuntimeOptions

    t = time.perf_counter()
    gen = Generator(
        spec["path"], RuntimeOptions(threads=spec["threads"]), check_integrity=False, kv_capacity=spec["capacity"]
    )
    load = time.perf_counter() - t

    def one(ids: list[int], steps: int) -> tuple[float, list[float]]:
        g = gen.generate(ids, GenerationConfig(max_new_tokens=steps + 1, stop_on_eos=False))
        return g.prefill_s, list(g.step_s)

    return load, one


def _genai(spec: dict[str, Any]) -> tuple[float, Any]:
    import onnxruntime_genai as og

    t = time.perf_counter()
    model = og.Model(og.Config(spec["path"]))
    load = time.perf_counter() - t

    def one(ids: list[int], steps: int) -> tuple[float, list[float]]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + steps + 2, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(ids, dtype=np.int32))  # runs the prompt's forward
        gen.generate_next_token()  # picks the first token from the prompt's logits
        gen.get_next_tokens()
        ttft = time.perf_counter() - t0
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            gen.generate_next_token()  # one forward on the last token + argmax
            gen.get_next_tokens()
            out.append(time.perf_counter() - t0)
        del gen
        return ttft, out

    return load, one


def _optimum_model(spec: dict[str, Any]) -> Any:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(spec["threads"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = spec["threads"]
    return ORTModelForCausalLM.from_pretrained(
        spec["path"], file_name=spec.get("file_name"), session_options=so, provider="CPUExecutionProvider"
    )


def _optimum(spec: dict[str, Any]) -> tuple[float, Any]:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    t = time.perf_counter()
    model = _optimum_model(spec)
    load = time.perf_counter() - t

    class Stamp(LogitsProcessor):
        """Called once per forward, right after the logits exist: the step clock."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def one(ids: list[int], steps: int) -> tuple[float, list[float]]:
        stamp = Stamp()
        x = torch.tensor([ids], dtype=torch.int64)
        t0 = time.perf_counter()
        model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=steps + 1,
            min_new_tokens=steps + 1,
            do_sample=False,
            logits_processor=LogitsProcessorList([stamp]),
            pad_token_id=0,
        )
        ts = [t0, *stamp.times]
        return ts[1] - ts[0], [b - a for a, b in itertools.pairwise(ts[1:])]

    return load, one


def _llama(spec: dict[str, Any]) -> tuple[float, Any]:
    from llama_cpp import Llama

    t = time.perf_counter()
    llm = Llama(
        model_path=spec["path"],
        n_ctx=spec["capacity"],
        n_batch=max(512, spec["capacity"]),  # the whole prompt in one call, as the others
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        verbose=False,
    )
    load = time.perf_counter() - t

    def last_logits() -> np.ndarray:
        return llm.scores[llm.n_tokens - 1]

    def one(ids: list[int], steps: int) -> tuple[float, list[float]]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = int(np.argmax(last_logits()))
        ttft = time.perf_counter() - t0
        out = []
        for _ in range(steps):
            t0 = time.perf_counter()
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
            out.append(time.perf_counter() - t0)
        return ttft, out

    return load, one


RUNNERS = {"edgekit": _edgekit, "genai": _genai, "optimum": _optimum, "llama": _llama}


# ---- perplexity: each tool's logits for every position of one chunk ----


def _edgekit_logits(spec: dict[str, Any]) -> Any:
    import onnxruntime as ort

    from edgekit.runtime.session import DecoderSession

    so = ort.SessionOptions()
    so.intra_op_num_threads = spec["threads"]
    so.log_severity_level = 3  # `logits_to_keep` is an input with a default: onnxruntime warns, expectedly
    return DecoderSession(f"{spec['path']}/model.onnx", options=so).logits


def _onnx_logits(spec: dict[str, Any]) -> Any:
    """genai's builder output run by onnxruntime directly: genai's generator keeps only the last position's
    logits, and the model file is the same either way."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = spec["threads"]
    session = ort.InferenceSession(f"{spec['path']}/model.onnx", so, providers=["CPUExecutionProvider"])
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    # genai's builder names the head-size dim ("kv_cache_dim"); its genai_config.json has the number
    decoder = json.loads(Path(spec["path"], "genai_config.json").read_text())["model"]["decoder"]
    shape = (1, decoder["num_key_value_heads"], 0, decoder["head_size"])

    def logits(ids: list[int]) -> np.ndarray:
        feeds = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        feeds |= {p.name: np.zeros(shape, dtypes[p.type]) for p in past}
        return session.run(["logits"], feeds)[0][0]

    return logits


def _optimum_logits(spec: dict[str, Any]) -> Any:
    import torch

    model = _optimum_model(spec)

    def logits(ids: list[int]) -> np.ndarray:
        x = torch.tensor([ids], dtype=torch.int64)
        return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].numpy()

    return logits


def _llama_logits(spec: dict[str, Any]) -> Any:
    from llama_cpp import Llama

    chunk = spec["chunk"]
    llm = Llama(model_path=spec["path"], n_ctx=chunk, n_batch=chunk, n_ubatch=chunk, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], logits_all=True, verbose=False)  # fmt: skip

    def logits(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)])

    return logits


LOGITS = {"edgekit": _edgekit_logits, "genai": _onnx_logits, "optimum": _optimum_logits, "llama": _llama_logits}


def perplexity(logits: Any, ids: list[int], chunk: int) -> dict[str, Any]:
    """exp(mean NLL) of every next token within each chunk of `chunk` ids (each chunk a fresh sequence)."""
    nll, scored = 0.0, 0
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        z = np.asarray(logits(part), np.float64)
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(part) - 1), part[1:]].sum())
        scored += len(part) - 1
    return {"perplexity": float(np.exp(nll / scored)), "scored_tokens": scored, "chunk": chunk}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("mode") == "ppl":
        return perplexity(LOGITS[spec["kind"]](spec), spec["ppl_ids"], spec["chunk"])
    load, one = RUNNERS[spec["kind"]](spec)
    ids = spec["prompt_ids"]
    one(ids[:16], 4)  # warm-up: first-call allocations and kernel selection
    settings = []
    for n in spec["prompt_lens"]:
        ttft, steps = one(ids[:n], spec["warmup"] + spec["gen_len"])
        timed = np.asarray(steps[spec["warmup"] :]) * 1000
        settings.append(
            {
                "prompt_len": n,
                "ttft_s": ttft,
                "decode_ms_median": float(np.median(timed)),
                "decode_ms_p90": float(np.percentile(timed, 90)),
            }
        )
    return {"load_s": load, "peak_rss_bytes": _peak_rss(), "settings": settings}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.stdin.read()))))
