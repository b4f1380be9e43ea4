"""What the machine is (for reports) and this process's own peak memory (for measurements)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


def machine_facts() -> dict[str, Any]:
    import platform

    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def peak_rss_bytes() -> int:
    # Linux: VmHWM is this process's own high-water mark. ru_maxrss is not: a child started by fork+exec
    # inherits its parent's maximum, so a profile run from a big parent (pytest, a sweep) over-reports.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere
    except ImportError:  # Windows: psutil reports the peak working set
        import psutil

        return int(getattr(psutil.Process().memory_info(), "peak_wset", psutil.Process().memory_info().rss))
