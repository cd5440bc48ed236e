"""The command line's allocator tuning: freed blocks are reused, not faulted in again from the kernel."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mimi_cli.codec import CHUNK_SECONDS
from mimi_cli.config import FRAME_RATE
from mimi_cli.model.mimi import CUDA_SEANET_PIECE_FRAMES, DEFAULT_CHUNK_FRAMES, SEANET_PIECE_FRAMES

ROOT = Path(__file__).resolve().parents[1]

# A pipeline of 40 MB tensors, each step making new ones and freeing the last (as the model's layers
# do); prints whether the tuning was applied and the page faults of each of 6 runs. Above 32 MB glibc
# never adapts by itself: by default every such block is fresh memory from the kernel.
FAULTS = """
import resource, sys
import torch
import torch.nn.functional as F
from mimi_cli.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else None
def pipeline():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(10 << 20)
    for _ in range(6):
        x = F.elu(x) + 1
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, *[pipeline() for _ in range(6)])
"""


def _faults(mode: str) -> tuple[str, list[int]]:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    return out[0], [int(n) for n in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_freed_memory_is_reused_once_tuned():
    applied, tuned = _faults("tuned")
    if applied != "True":
        pytest.skip("not glibc: keep_freed_memory is a no-op here")
    _, default = _faults("default")
    assert min(default[1:]) > 50_000  # each run: ~14 blocks of 40 MB in fresh 4 KiB pages
    assert sum(tuned[1:]) < min(default[1:])  # after the first run, hardly any fresh page


def test_pieces_of_long_inputs_all_have_one_shape():
    """The SEANet piece divides the codec's chunk and the model's default chunk: one shape per layer."""
    for piece in (SEANET_PIECE_FRAMES, CUDA_SEANET_PIECE_FRAMES):
        assert round(CHUNK_SECONDS * FRAME_RATE) % piece == 0
        assert DEFAULT_CHUNK_FRAMES % piece == 0
