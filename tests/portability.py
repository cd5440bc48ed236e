"""The numeric tests under the instruction sets other machines have (`make test-portability`).

Each configuration runs the tests whose results depend on floating-point routes (the C kernel, the
model's parts, parity with transformers, the metrics, streaming) in a fresh pytest process with:
the C kernel built for one `-march` (`MIMI_NATIVE_ARCH`), torch's CPU kernels limited to one
capability (`ATEN_CPU_CAPABILITY`), MKL's to one instruction set (`MKL_ENABLE_INSTRUCTIONS`) and
oneDNN's to one ISA (`ONEDNN_MAX_CPU_ISA`). Levels this CPU cannot run are reported as such. Prints
a table and exits 1 if any configuration failed.

    python tests/portability.py [--tests tests/test_native.py ...] [-- extra pytest arguments]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMERIC_TESTS = [
    "tests/test_native.py",
    "tests/test_model_parts.py",
    "tests/test_parity.py",
    "tests/test_metrics.py",
    "tests/test_streaming.py",
    "tests/test_propagation.py",
    "tests/test_ties.py",
    # decodes checked against the rounding bound, codes against near-ties, in other test files
    "tests/test_batch.py::test_batched_codes_equal_one_at_a_time",
    "tests/test_batch.py::test_decode_batches_mix_codebook_counts_and_survive_corrupt_files",
    "tests/test_weights.py::test_original_layout_gives_same_codes_and_audio",
]
# torch's capability -> (MKL's instruction set, oneDNN's ISA, the CPU flag it needs)
TORCH_LEVELS = {
    "default": ("SSE4_2", "SSE41", "sse4_2"),
    "avx2": ("AVX2", "AVX2", "avx2"),
    "avx512": ("AVX512", "AVX512_CORE", "avx512bw"),
}
# the kernel's -march -> the CPU flag it needs (native: whatever this CPU has)
KERNEL_ARCHES = {"x86-64-v2": "sse4_2", "x86-64-v3": "avx2", "x86-64-v4": "avx512bw", "native": None}


def cpu_flags() -> set[str]:
    """The flags /proc/cpuinfo lists for this CPU (empty where it can't be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def run(arch: str, level: str, tests: list[str], extra: list[str]) -> tuple[str, str]:
    """One configuration's pytest run: (outcome, pytest's summary line)."""
    mkl, onednn, _ = TORCH_LEVELS[level]
    env = {
        **os.environ,
        "MIMI_NATIVE_ARCH": arch,
        "ATEN_CPU_CAPABILITY": level,
        "MKL_ENABLE_INSTRUCTIONS": mkl,
        "ONEDNN_MAX_CPU_ISA": onednn,
        "COLUMNS": "300",  # wide enough that pytest's summary keeps each failure's message
    }
    check = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    seen = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True
    ).stdout.strip()
    if seen.lower() != level.lower():
        return "error", f"torch reports capability {seen!r}, not {level!r}"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests, *extra],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    summary = lines[-1].strip("= ") if lines else result.stdout[-500:] + result.stderr[-500:]
    failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return ("passed" if result.returncode == 0 else "FAILED"), "; ".join([summary, *failed])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tests", nargs="+", default=NUMERIC_TESTS)
    parser.add_argument("--arches", nargs="+", default=list(KERNEL_ARCHES), choices=list(KERNEL_ARCHES))
    parser.add_argument("--levels", nargs="+", default=list(TORCH_LEVELS), choices=list(TORCH_LEVELS))
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    flags = cpu_flags()
    print(f"CPU flags: {' '.join(sorted(f for f in flags if f.startswith(('avx', 'sse4'))))}")
    print(f"{'kernel -march':<14} {'torch / MKL / oneDNN':<32} {'seconds':>8}  result")
    failures = 0
    for arch in args.arches:
        for level in args.levels:
            label = f"{level} / {TORCH_LEVELS[level][0]} / {TORCH_LEVELS[level][1]}"
            needs = {KERNEL_ARCHES[arch], TORCH_LEVELS[level][2]} - {None}
            if flags and not needs <= flags:
                lacks = " ".join(sorted(needs - flags))
                print(f"{arch:<14} {label:<32} {'':>8}  not run: this CPU lacks {lacks}")
                continue
            start = time.monotonic()
            outcome, summary = run(arch, level, args.tests, extra)
            failures += outcome != "passed"
            print(f"{arch:<14} {label:<32} {time.monotonic() - start:8.0f}  {outcome}: {summary}", flush=True)
    print("all configurations passed" if not failures else f"{failures} configuration(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
