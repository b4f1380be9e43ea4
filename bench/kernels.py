"""What limits decode on this machine: onnxruntime's int4 MatMulNBits kernel and GroupQueryAttention, alone.

A batch-1 decode step reads every weight once, so bytes ÷ read bandwidth is its floor (bench/bandwidth.py).
This measures how close the kernels that do the reading get to that floor, with nothing else in the graph:
- MatMulNBits: a chain of 48 layers of K = N = 2048 random packed int4 weights (~130 MB, far above the
  caches), one row of activations, for each block size / zero-point layout; GB/s = weight bytes ÷ time.
- a prompt's 256 rows at once: MatMulNBits' int8-compute GEMM against MLAS's QGEMM (what
  `--int8-kernel dynamic` and optimum's dynamic int8 run on);
- GroupQueryAttention (1.1B shape: 32 query / 4 KV heads of 64, 22 layers, rotary, shared KV buffer):
  one decode step at several context lengths; the per-position cost is what grows decode with context.

    python bench/kernels.py --threads 2      # prints a table; --json for one JSON object

Random values are fine: these kernels' speed does not depend on the numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import onnxruntime as ort
from bandwidth import measure as measure_bandwidth
from onnx import TensorProto, helper, numpy_helper

HIDDEN, LAYERS_MATMUL = 2048, 48
HEADS, KV_HEADS, HEAD_DIM, LAYERS_ATTN = 32, 4, 64, 22
LAYOUTS = [(32, False), (32, True), (64, False), (64, True), (128, False), (128, True)]  # (block, symmetric)
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]


def _session(model: bytes, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def matmul_chain(block: int, symmetric: bool, accuracy_level: int = 4, bits: int = 4) -> tuple[bytes, int]:
    """A chain of MatMulNBits nodes on random packed weights; (model bytes, weight bytes read per run)."""
    rng = np.random.default_rng(0)
    blocks, blob = HIDDEN // block, block * bits // 8
    nodes, inits, x = [], [], "x"
    for i in range(LAYERS_MATMUL):
        ins = [x, f"w{i}", f"s{i}"]
        inits.append(numpy_helper.from_array(rng.integers(0, 255, (HIDDEN, blocks, blob), dtype=np.uint8), f"w{i}"))
        inits.append(numpy_helper.from_array(rng.random(HIDDEN * blocks, dtype=np.float32) * 0.01, f"s{i}"))
        if not symmetric:
            zp = rng.integers(0, 255, (HIDDEN, (blocks + 1) // 2), dtype=np.uint8)
            inits.append(numpy_helper.from_array(zp, f"z{i}"))
            ins.append(f"z{i}")
        y = "y" if i == LAYERS_MATMUL - 1 else f"y{i}"
        attrs = {"K": HIDDEN, "N": HIDDEN, "bits": bits, "block_size": block, "accuracy_level": accuracy_level}
        nodes.append(helper.make_node("MatMulNBits", ins, [y], domain="com.microsoft", **attrs))
        x = y
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["rows", HIDDEN]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "matmul_chain", io[:1], io[1:], inits)
    weight_bytes = sum(len(t.raw_data) for t in inits)
    return helper.make_model(graph, opset_imports=OPSETS).SerializeToString(), weight_bytes


def best_of(run, repeats: int, rounds: int) -> float:
    """Median over rounds of the best of `repeats` calls: the kernel's speed, not the neighbours' load."""
    run()
    per_round = []
    for _ in range(rounds):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
        per_round.append(min(times))
    return float(np.median(per_round))


def dynamic_int8_chain() -> bytes:
    """The same chain as int8 weights per output channel on QGEMM: DynamicQuantizeLinear + MatMulIntegerToFloat."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(LAYERS_MATMUL):
        inits.append(numpy_helper.from_array(rng.integers(-127, 127, (HIDDEN, HIDDEN), dtype=np.int8), f"w{i}"))
        inits.append(numpy_helper.from_array(rng.random(HIDDEN, dtype=np.float32) * 0.01, f"s{i}"))
        q = [f"x{i}_q", f"x{i}_scale", f"x{i}_zero"]
        nodes.append(helper.make_node("DynamicQuantizeLinear", [x], q))
        y = "y" if i == LAYERS_MATMUL - 1 else f"y{i}"
        ins = [q[0], f"w{i}", q[1], f"s{i}", q[2]]
        nodes.append(helper.make_node("MatMulIntegerToFloat", ins, [y], domain="com.microsoft"))
        x = y
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["rows", HIDDEN]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "dynamic_int8_chain", io[:1], io[1:], inits)
    return helper.make_model(graph, opset_imports=OPSETS).SerializeToString()


def measure_prompt_gemm(threads: int, rounds: int, rows: int = 256) -> list[dict]:
    """Many rows at once (a prompt): MatMulNBits' int8-compute GEMM against MLAS's QGEMM, 48 × 2048×2048."""
    x = np.random.default_rng(1).standard_normal((rows, HIDDEN)).astype(np.float32)
    models = {
        "MatMulNBits int4, block 32, zero points": matmul_chain(32, False)[0],
        "MatMulNBits int8, block 32": matmul_chain(32, True, bits=8)[0],
        "DynamicQuantizeLinear + MatMulIntegerToFloat (int8 per channel)": dynamic_int8_chain(),
    }
    out = []
    for kernel, model in models.items():
        session = _session(model, threads)
        seconds = best_of(lambda s=session: s.run(None, {"x": x}), 2, rounds)
        gmacs = LAYERS_MATMUL * HIDDEN * HIDDEN * rows / 1e9
        out.append({"kernel": kernel, "rows": rows, "ms": 1000 * seconds, "gmac_s": gmacs / seconds})
    return out


def measure_matmul(threads: int, rounds: int) -> list[dict]:
    x = np.random.default_rng(1).standard_normal((1, HIDDEN)).astype(np.float32)
    out = []
    for block, symmetric in LAYOUTS:
        model, nbytes = matmul_chain(block, symmetric)
        session = _session(model, threads)
        seconds = best_of(lambda s=session: s.run(None, {"x": x}), 10, rounds)
        layout = f"block {block}, {'symmetric' if symmetric else 'zero points'}"
        out.append({"layout": layout, "ms": 1000 * seconds, "weight_mb": nbytes / 1e6, "gbs": nbytes / seconds / 1e9})
    return out


def attention_model() -> bytes:
    qkv_width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    nodes, inputs = (
        [],
        [
            helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 1, qkv_width]),
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
            helper.make_tensor_value_info("total_len", TensorProto.INT32, []),
            helper.make_tensor_value_info("cos", TensorProto.FLOAT, ["max_len", HEAD_DIM // 2]),
            helper.make_tensor_value_info("sin", TensorProto.FLOAT, ["max_len", HEAD_DIM // 2]),
        ],
    )
    outputs = []
    for i in range(LAYERS_ATTN):
        kv = [f"past_key_{i}", f"past_value_{i}"]
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, KV_HEADS, "cap", HEAD_DIM]) for n in kv]
        outs = [f"out_{i}", f"present_key_{i}", f"present_value_{i}"]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outs]
        ins = ["qkv", "", "", *kv, "seqlens_k", "total_len", "cos", "sin"]
        attrs = {"num_heads": HEADS, "kv_num_heads": KV_HEADS, "do_rotary": 1}
        nodes.append(helper.make_node("GroupQueryAttention", ins, outs, domain="com.microsoft", **attrs))
    graph = helper.make_graph(nodes, "attention", inputs, outputs)
    return helper.make_model(graph, opset_imports=OPSETS).SerializeToString()


def measure_attention(threads: int, rounds: int, contexts: list[int]) -> list[dict]:
    session = _session(attention_model(), threads)
    rng = np.random.default_rng(2)
    out = []
    for ctx in contexts:
        cap = ctx + 256
        io, buffers = session.io_binding(), []
        for i in range(LAYERS_ATTN):
            for kind in ("key", "value"):
                array = rng.standard_normal((1, KV_HEADS, cap, HEAD_DIM)).astype(np.float32)
                value = ort.OrtValue.ortvalue_from_numpy(array)
                buffers.append(array)  # keeps the memory behind the OrtValue alive
                io.bind_ortvalue_input(f"past_{kind}_{i}", value)
                io.bind_ortvalue_output(f"present_{kind}_{i}", value)  # shared buffer, as the runtime binds it
        io.bind_cpu_input("qkv", rng.standard_normal((1, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(np.float32))
        io.bind_cpu_input("seqlens_k", np.array([ctx], np.int32))
        io.bind_cpu_input("total_len", np.array(ctx + 1, np.int32))
        io.bind_cpu_input("cos", np.ones((cap, HEAD_DIM // 2), np.float32))
        io.bind_cpu_input("sin", np.zeros((cap, HEAD_DIM // 2), np.float32))
        for i in range(LAYERS_ATTN):
            io.bind_output(f"out_{i}", "cpu")
        seconds = best_of(lambda io=io: session.run_with_iobinding(io), 10, rounds)
        kv_bytes = LAYERS_ATTN * 2 * KV_HEADS * (ctx + 1) * HEAD_DIM * 4
        out.append({"context": ctx, "ms": 1000 * seconds, "kv_mb": kv_bytes / 1e6, "gbs": kv_bytes / seconds / 1e9})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--contexts", default="128,1024,2048")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    bandwidth = measure_bandwidth(args.threads)
    result = {
        "threads": args.threads,
        "read_bandwidth_gbs": bandwidth["roofline_gbs"],
        "matmulnbits_int4": measure_matmul(args.threads, args.rounds),
        "group_query_attention": measure_attention(
            args.threads, args.rounds, [int(c) for c in args.contexts.split(",")]
        ),
        "prompt_gemm": measure_prompt_gemm(args.threads, args.rounds),
        "load_average": bandwidth["load_average"],
    }
    if args.json:
        print(json.dumps(result))
        return
    bw = result["read_bandwidth_gbs"]
    print(f"read bandwidth, {args.threads} threads: {bw:.1f} GB/s (load average {result['load_average'][0]:.1f})")
    print("| MatMulNBits int4, accuracy level 4 | ms | weight MB | GB/s | of bandwidth |\n|---|---:|---:|---:|---:|")
    for r in result["matmulnbits_int4"]:
        print(f"| {r['layout']} | {r['ms']:.2f} | {r['weight_mb']:.1f} | {r['gbs']:.1f} | {r['gbs'] / bw:.0%} |")
    print("\n| 256 rows (a prompt), 48 × 2048×2048 | ms | GMAC/s |\n|---|---:|---:|")
    for r in result["prompt_gemm"]:
        print(f"| {r['kernel']} | {r['ms']:.1f} | {r['gmac_s']:.0f} |")
    print("\n| GroupQueryAttention, 22 layers, context | ms | KV MB read | GB/s |\n|---:|---:|---:|---:|")
    for r in result["group_query_attention"]:
        print(f"| {r['context']} | {r['ms']:.2f} | {r['kv_mb']:.1f} | {r['gbs']:.1f} |")


if __name__ == "__main__":
    main()
