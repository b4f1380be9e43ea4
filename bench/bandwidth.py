"""Memory read bandwidth of this machine, the denominator of the decode roofline.

Decoding one token reads every weight once (plus the KV cache), so at batch 1 a decoder cannot be faster
than bytes-read ÷ read-bandwidth. Two measurements, best of several passes over a buffer far larger than
the caches:
- numpy: each thread sums its own half of a 1 GiB float32 array (numpy releases the GIL in reductions);
- C: a STREAM-like read-only sum with AVX-512 loads and OpenMP, compiled here with gcc if it exists.

    python bench/bandwidth.py --threads 2          # prints one JSON line, GB/s = 1e9 bytes/s
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

C_SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    size_t n = (size_t)atol(argv[1]) / sizeof(float);
    int passes = atoi(argv[2]);
    float *a = aligned_alloc(64, n * sizeof(float));
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) a[i] = (float)(i & 1023);
    double best = 1e30, sink = 0;
    for (int p = 0; p < passes; p++) {
        double t = omp_get_wtime();
        double total = 0;
        #pragma omp parallel for schedule(static) reduction(+:total)
        for (size_t i = 0; i < n; i += 64) {
            __m512 s0 = _mm512_load_ps(a + i), s1 = _mm512_load_ps(a + i + 16);
            __m512 s2 = _mm512_load_ps(a + i + 32), s3 = _mm512_load_ps(a + i + 48);
            total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
        }
        t = omp_get_wtime() - t;
        sink += total;
        if (t < best) best = t;
    }
    printf("%.6f %g\n", best, sink);
    return 0;
}
"""


def numpy_read_gbs(threads: int, nbytes: int = 1 << 30, passes: int = 7) -> float:
    a = np.ones(nbytes // 4, np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def c_read_gbs(threads: int, nbytes: int = 1 << 30, passes: int = 7) -> float | None:
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "bw.c", Path(tmp) / "bw"
        src.write_text(C_SOURCE)
        build = subprocess.run(
            [gcc, "-O3", "-mavx512f", "-fopenmp", str(src), "-o", str(exe)], capture_output=True, text=True
        )
        if build.returncode != 0:
            return None
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_PROC_BIND": "spread"}
        out = subprocess.run([str(exe), str(nbytes), str(passes)], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            return None
        return nbytes / float(out.stdout.split()[0]) / 1e9


def measure(threads: int) -> dict:
    res = {"threads": threads, "numpy_gbs": numpy_read_gbs(threads), "c_gbs": c_read_gbs(threads)}
    # The roofline takes the faster reading: the machine can do at least that.
    res["roofline_gbs"] = max(v for v in (res["numpy_gbs"], res["c_gbs"]) if v)
    res["load_average"] = list(os.getloadavg())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    print(json.dumps(measure(ap.parse_args().threads)))


if __name__ == "__main__":
    main()
