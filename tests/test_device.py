"""Device helpers (dtype names, TF32 flags, host → device copies) and dtype placement, checked on CPU.

The CUDA side of the same paths is in test_gpu.py (marker `cuda`, `make test-gpu`).
"""

from __future__ import annotations

import pytest
import torch

from mimi_cli import load_model
from mimi_cli.device import configure_cuda, default_workers, resolve_dtype, set_tf32, to_device
from mimi_cli.model.quantizer import Codebook

CUDA = torch.device("cuda")  # a name only: resolve_dtype does not touch the device


@pytest.mark.parametrize(
    "name, expected",
    [
        pytest.param("float32", torch.float32, id="float32"),
        pytest.param("tf32", torch.float32, id="tf32"),
        pytest.param("TF32", torch.float32, id="tf32-upper"),
        pytest.param("bf16", torch.bfloat16, id="bf16"),
        pytest.param("float16", torch.float16, id="float16"),
    ],
)
def test_dtype_names_on_cuda(name, expected):
    assert resolve_dtype(name, CUDA) == expected


@pytest.mark.parametrize("name", ["tf32", "bfloat16", "fp16"])
def test_cuda_only_dtypes_are_refused_on_cpu(name):
    with pytest.raises(ValueError, match="only supported on CUDA"):
        resolve_dtype(name, torch.device("cpu"))


def test_unknown_dtype_lists_the_choices():
    with pytest.raises(ValueError, match="float32, tf32, bfloat16 or float16"):
        resolve_dtype("float64", CUDA)


@pytest.mark.parametrize("cores, few", [(16, 4), (2, 2), (1, 1)])
def test_default_workers_use_every_core_for_reader_processes_beside_a_gpu(monkeypatch, cores, few):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    assert default_workers(CUDA, processes=True) == cores
    assert default_workers(CUDA, processes=False) == few  # threads would starve the GPU's thread
    assert default_workers(torch.device("cpu"), processes=True) == few
    assert default_workers(torch.device("cpu")) == few


@pytest.mark.parametrize(
    "dtype, tf32, autotune",
    [("float32", False, True), ("fp32", False, True), ("tf32", True, False), ("bfloat16", False, False),
     ("float16", False, False)],
)  # fmt: skip
def test_configure_cuda_autotunes_ieee_float32_only(dtype, tf32, autotune):
    """cuDNN's heuristics gave IEEE float32 plans with 74 GiB of workspace (see `configure_cuda`)."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    try:
        configure_cuda(dtype)
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
        assert torch.backends.cudnn.benchmark is autotune
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
        ) = saved


def test_set_tf32_sets_both_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        set_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_to_device_on_cpu_keeps_values_and_layout():
    codes = torch.arange(24).reshape(4, 6)[:, 1:4][None]  # a strided view, as the decoder gets it
    moved = to_device(codes, torch.device("cpu"))
    assert moved.device.type == "cpu" and torch.equal(moved, codes)


def test_half_precision_model_keeps_exact_float32_centroids(tiny_weights):
    """to_runtime in bfloat16 must not round the centroids through bfloat16 (they decide every code)."""
    exact = load_model(tiny_weights)
    model = load_model(tiny_weights).to_runtime(torch.device("cpu"), torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert model.encoder_transformer.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    pairs = zip(exact.quantizer.modules(), model.quantizer.modules(), strict=True)
    codebooks = [(a, b) for a, b in pairs if isinstance(a, Codebook)]
    assert len(codebooks) == exact.config.num_quantizers
    for a, b in codebooks:
        assert b.centroids().dtype == torch.float32 and b.centroids().numel() > 0
        assert torch.equal(a.centroids(), b.centroids())
        assert torch.equal(a.embed_sum, b.embed_sum)
    # and back to float32: the quantizer is untouched, the rest is float32 again
    model.to_runtime(torch.device("cpu"), torch.float32)
    assert model.dtype == torch.float32
    assert all(torch.equal(a.centroids(), b.centroids()) for a, b in codebooks)
