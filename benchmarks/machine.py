"""The machine a benchmark ran on, described the same way by every script: CPU, cores, memory bandwidth,
torch, GPU, date and load.

    info = describe()          # at the start of a run (the bandwidth takes about a second)
    info["load_after"] = load_average()
    print(header(info))        # one line, first above every table
"""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

BANDWIDTH_BYTES = 1 << 30  # 1 GiB: well beyond any cache (the shared machine's L3 says 480 MiB)
SMOKE_BANDWIDTH_BYTES = 1 << 24  # 16 MiB for --smoke runs: fast, and the figure means nothing there
BANDWIDTH_SECONDS = 1.0
SMOKE_NOTE = "SMOKE RUN: tiny model, short inputs, the figures mean nothing"


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, or "unknown"."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def memory_bandwidth(nbytes: int = BANDWIDTH_BYTES, seconds: float = BANDWIDTH_SECONDS) -> float:
    """Read bandwidth of one thread, GB/s: the fastest of repeated sums of a `nbytes` float32 buffer
    (far larger than the caches, so every pass streams from memory), within about `seconds`."""
    deadline = time.perf_counter() + seconds
    buffer = np.ones(nbytes // 4, np.float32)  # written: real pages (numpy asks for huge ones)
    best, passes = float("inf"), 0
    while passes < 2 or time.perf_counter() < deadline:
        start = time.perf_counter()
        buffer.sum()
        best, passes = min(best, time.perf_counter() - start), passes + 1
    return nbytes / best / 1e9


def gpu_name() -> str | None:
    """The first CUDA device's name, or None without one."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def describe(smoke: bool = False) -> dict[str, Any]:
    """The machine now: CPU, cores, memory bandwidth, torch, Python, GPU, date and load average.

    `smoke`: a --smoke run; the bandwidth is then measured on a small buffer (fast, meaningless).
    """
    import torch

    nbytes = SMOKE_BANDWIDTH_BYTES if smoke else BANDWIDTH_BYTES
    return {
        "date": datetime.now().astimezone().isoformat(timespec="minutes"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb_s": memory_bandwidth(nbytes, 0.1 if smoke else BANDWIDTH_SECONDS),
        "memory_buffer_mib": nbytes >> 20,
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_before": load_average(),
        "smoke": smoke,
    }


def header(info: dict[str, Any]) -> str:
    """One line naming the machine of `describe()` (and `load_after`, when the script recorded it)."""
    load = f"load average {info['load_before']}"
    if "load_after" in info:
        load = f"load average before {info['load_before']}, after {info['load_after']}"
    line = (
        f"machine: {info['cpu']}, {info['cores']} cores, memory read {info['memory_gb_s']:.1f} GB/s "
        f"(1 thread, {info['memory_buffer_mib']} MiB); GPU: {info['gpu'] or 'none'}; "
        f"torch {info['torch']}, Python {info['python']}; {info['date']}; {load}"
    )
    return f"{line} ({SMOKE_NOTE})" if info["smoke"] else line
