"""Decode step time: the runtime's shared past/present buffer (IO binding) vs copying presents back.

Two sequences on the same onnxruntime session advance in alternating steps, one through
`runtime.KVEngine` (one KV buffer bound as past and present) and one through `session.DecoderSession`
(presents returned as new arrays and fed back as pasts), so only the cache handling differs and the
machine's load hits both alike. Wall and process-CPU time per step, medians.

    python bench/iobinding.py bench/work/speed/tinyllama-1.1b-skip0-int4 128 16
"""

from __future__ import annotations

import sys
import time

import numpy as np

from edgekit.runtime.kv_engine import KVEngine
from edgekit.runtime.providers import RuntimeOptions, create_session
from edgekit.runtime.session import DecoderSession


def main() -> None:
    path, ctx, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    session, _ = create_session(f"{path}/model.onnx", RuntimeOptions(threads=threads, spin=False))
    engine = KVEngine(session, capacity=ctx + steps + 2)
    plain = DecoderSession(f"{path}/model.onnx")
    plain.session = session
    ids = [1] + [400 + (i % 100) for i in range(ctx - 1)]
    tok_a = int(engine.forward(ids)[-1].argmax())
    logits, cache = plain.forward(np.asarray([ids]))
    tok_b = int(logits[0, -1].argmax())
    wall = {"shared": [], "copied": []}
    cpu = {"shared": [], "copied": []}
    for _ in range(steps + 2):
        t, c = time.perf_counter(), time.process_time()
        tok_a = int(engine.forward([tok_a])[0].argmax())
        wall["shared"].append(time.perf_counter() - t)
        cpu["shared"].append(time.process_time() - c)
        t, c = time.perf_counter(), time.process_time()
        logits, cache = plain.forward(np.asarray([[tok_b]]), cache)
        tok_b = int(logits[0, -1].argmax())
        wall["copied"].append(time.perf_counter() - t)
        cpu["copied"].append(time.process_time() - c)
    med = {k: {"wall": 1000 * float(np.median(wall[k][2:])), "cpu": 1000 * float(np.median(cpu[k][2:]))} for k in wall}
    s, p = med["shared"], med["copied"]
    print(
        f"context {ctx}: shared buffer {s['wall']:.1f} ms/token (CPU {s['cpu']:.1f}), "
        f"copied presents {p['wall']:.1f} (CPU {p['cpu']:.1f}); speedup wall {p['wall'] / s['wall']:.2f}×, "
        f"CPU {p['cpu'] / s['cpu']:.2f}×"
    )


if __name__ == "__main__":
    main()
