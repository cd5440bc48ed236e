"""Device and dtype selection ("auto" | "cpu" | "cuda" | "cuda:N"; float32 unless asked otherwise),
TF32 and host → device copies."""

from __future__ import annotations

import os

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "tf32": torch.float32,  # float32 tensors, TensorFloat-32 matrix products and convolutions (CUDA)
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
    """float32 by default; bfloat16/float16 only on CUDA (CPU kernels for them are slow or missing).

    "tf32" is float32 (see `set_tf32`), CUDA only too.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (expected float32, tf32, bfloat16 or float16)")
        if dtype.lower() == "tf32" and device.type != "cuda":
            raise ValueError(f"dtype tf32 is only supported on CUDA; use float32 on {device.type}")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype} (expected float32, bfloat16 or float16)")
    if dtype != torch.float32 and device.type != "cuda":
        raise ValueError(f"dtype {dtype} is only supported on CUDA; use float32 on {device.type}")
    return dtype


def set_tf32(enabled: bool) -> None:
    """TensorFloat-32 on or off for float32 matrix products and cuDNN convolutions (torch's process-wide
    flags; for the CLI, which owns its process).

    PyTorch lets cuDNN convolutions use TF32 by default: float32 on CUDA then rounds inputs to 10-bit
    mantissas and its codes drift from the CPU's. Off, float32 is IEEE float32 on every device.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def configure_cuda(dtype: str) -> None:
    """The CLI's process-wide CUDA settings for a `--dtype` name: TF32 for "tf32" only (`set_tf32`), and
    cuDNN's autotuner for IEEE float32.

    In IEEE float32 cuDNN's heuristics picked an FFT plan for some shapes of the decoder (a batch of 32
    one-second clips: the [512 → 256, kernel 3] convolution) that took 74 GiB of workspace and ran at
    230× real time on an H100; autotuned, the same decode ran at 2,330× in 2 GiB, and the other float32
    shapes measured 6–30 % faster. The first call of each new input shape pays the tuning (once per
    shape: the codec's chunks share one). In TF32 and half precision the heuristics were as fast.
    """
    name = dtype.lower()
    set_tf32(name == "tf32")
    torch.backends.cudnn.benchmark = _DTYPES.get(name) == torch.float32 and name != "tf32"


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. To CUDA through pinned memory without waiting: a plain (pageable)
    copy synchronises with the device, so the host could not queue the next chunk's work while
    the device is still busy with this one."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    # contiguous first: a strided source would be copied again into pageable memory by `.to`
    return tensor.contiguous().pin_memory().to(device, non_blocking=True)


def default_workers(device: torch.device, processes: bool = False) -> int:
    """Reading/writing workers for folders and corpora: every core for reader processes beside a GPU
    (the cores only read and resample, and must keep the GPU fed), else up to 4. Threads stay at 4
    beside a GPU too: more of them take the interpreter lock from the thread that drives the GPU."""
    cores = os.cpu_count() or 1
    return cores if device.type == "cuda" and processes else min(4, cores)
