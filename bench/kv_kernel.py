"""GroupQueryAttention alone, one decode step, per KV cache type: what `--kv-cache` changes per layer.

    python bench/kv_kernel.py --shape smollm2      # 9 query / 3 KV heads of 64
    python bench/kv_kernel.py --shape llama2-7b    # 32 / 32 heads of 128

One node, shared past/present buffer (IO binding, as edgekit's runtime and onnxruntime-genai run it),
float32 activations, the cache filled to N positions; per cache type the median over 200 calls after 5
warm-up ones, microseconds. int8/int4 take per-channel scales (their values don't change the speed).
The fp16 row is a float16 cache under float32 activations, which `--kv-cache` refuses because of it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

SHAPES = {"smollm2": (9, 3, 64), "llama2-7b": (32, 32, 128)}  # query heads, KV heads, head_dim
CACHES = {  # name: (ONNX type, numpy type, quant type, bits)
    "fp32": (TensorProto.FLOAT, np.float32, None, 32),
    "fp16": (TensorProto.FLOAT16, np.float16, None, 16),
    "int8": (TensorProto.INT8, np.int8, "PER_CHANNEL", 8),
    "int4": (TensorProto.UINT8, np.uint8, "PER_CHANNEL", 4),
}


def session(heads: int, kv: int, d: int, capacity: int, cache: str, threads: int) -> ort.InferenceSession:
    elem, _, quant, bits = CACHES[cache]
    last = d // 2 if bits == 4 else d
    ins = [
        helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, None, (heads + 2 * kv) * d]),
        helper.make_tensor_value_info("past_k", elem, [1, kv, capacity, last]),
        helper.make_tensor_value_info("past_v", elem, [1, kv, capacity, last]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    attrs: dict = {"num_heads": heads, "kv_num_heads": kv}
    inits, scales = [], []
    if quant:
        attrs |= {"k_quant_type": quant, "v_quant_type": quant, "kv_cache_bit_width": bits}
        inits = [helper.make_tensor(n, TensorProto.FLOAT, [kv * d], np.full(kv * d, 0.05, np.float32)) for n in "kv"]
        scales = ["", "", "", "", "", "k", "v"]  # after cos, sin, position_ids, attention_bias, head_sink
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "past_k", "past_v", "seqlens_k", "total", *scales],
        ["out", "present_k", "present_v"],
        domain="com.microsoft",
        **attrs,
    )
    outs = [
        helper.make_tensor_value_info(n, t, None) for n, t in (("out", 1), ("present_k", elem), ("present_v", elem))
    ]
    model = helper.make_model(
        helper.make_graph([node], "gqa", ins, outs, inits),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    model.ir_version = 9
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def measure(shape: str, contexts: list[int], threads: int) -> dict[str, dict[int, float]]:
    heads, kv, d = SHAPES[shape]
    capacity = max(contexts) + 1
    x = np.random.default_rng(0).standard_normal((1, 1, (heads + 2 * kv) * d)).astype(np.float32)
    out: dict[str, dict[int, float]] = {}
    for cache, (_, np_type, _, bits) in CACHES.items():
        s = session(heads, kv, d, capacity, cache, threads)
        buf = [np.zeros((1, kv, capacity, d // 2 if bits == 4 else d), np_type) for _ in range(2)]
        io = s.io_binding()
        for name, b in zip(("k", "v"), buf, strict=True):
            value = ort.OrtValue.ortvalue_from_numpy(b)
            io.bind_ortvalue_input(f"past_{name}", value)
            io.bind_ortvalue_output(f"present_{name}", value)
        out[cache] = {}
        for n in contexts:
            io.bind_cpu_input("qkv", x)
            io.bind_cpu_input("seqlens_k", np.array([n], np.int32))
            io.bind_cpu_input("total", np.array(n + 1, np.int32))
            io.bind_output("out", "cpu")
            times = []
            for k in range(205):
                t = time.perf_counter()
                s.run_with_iobinding(io)
                if k >= 5:
                    times.append(time.perf_counter() - t)
            out[cache][n] = 1e6 * statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--contexts", default="128,1024,4096")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    res = measure(a.shape, contexts, a.threads)
    print(f"| cache ({a.shape}, {a.threads} threads) | " + " | ".join(f"µs at {n} (vs fp32)" for n in contexts) + " |")
    print("|---|" + "---|" * len(contexts))
    for cache, row in res.items():
        cells = [f"{row[n]:.0f} ({row[n] / res['fp32'][n]:.2f}x)" for n in contexts]
        print(f"| {cache} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
