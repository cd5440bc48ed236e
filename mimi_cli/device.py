"""Device and dtype selection: "auto" | "cpu" | "cuda" | "cuda:N"; float32 unless asked otherwise."""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """A usable torch device; raises ValueError naming the problem (unknown name, CUDA absent, bad index)."""
    if isinstance(device, torch.device):
        return device
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise ValueError(f"unknown device {device!r} (expected auto, cpu, cuda or cuda:N)")
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        return torch.device(name)
    raise ValueError(f"unknown device {device!r} (expected auto, cpu, cuda or cuda:N)")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 by default; bfloat16/float16 only on CUDA (CPU kernels for them are slow or missing)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (expected float32, bfloat16 or float16)")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype} (expected float32, bfloat16 or float16)")
    if dtype != torch.float32 and device.type != "cuda":
        raise ValueError(f"dtype {dtype} is only supported on CUDA; use float32 on {device.type}")
    return dtype
