"""A C kernel for the few-row products of one-frame CPU calls, compiled on first use.

A streamed 80 ms frame puts two rows through each large weight, so the call costs what reading the
weight from memory costs. torch's best route for that (oneDNN with the weight packed once,
`onednn.pack_rows`) reads ~20–26 GB/s on one core of the live benchmark's machine; `one_frame.c`
reads a weight stored in blocks of 32 outputs from start to end with the pages ahead prefetched,
at ~33–35 GB/s, faster than torch's own `sum` of the same weights. It also has the SEANet's ELU in one
vectorized pass (`elu`), which every CPU call takes where `routes` finds it faster than torch's.

The source ships with the package and is compiled once per machine with the system C compiler
(`$CC`, else `cc`, `gcc` or `clang`; -O3, tuned for this CPU or for the `-march` that
`MIMI_NATIVE_ARCH` names) into the cache folder
(`fpcache.cache_dir()/kernels`, keyed by the source, compiler, flags and CPU), then loaded with
ctypes and checked against torch once per process. Where there is no compiler, the build or the
check fails, or `MIMI_NATIVE=0` is set, `pack` returns None and callers keep torch's routes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import fpcache
from . import rounding

SOURCE = Path(__file__).with_name("one_frame.c")
DISABLE_ENV = "MIMI_NATIVE"  # "0": never build or load the kernel
ARCH_ENV = "MIMI_NATIVE_ARCH"  # the -march to build for (default native: x86-64-v3 builds for AVX2 only)
FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-pthread")
COMPILE_TIMEOUT_S = 120
HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # Linux's <sys/mman.h>
SPIN_US = 500  # a helper thread spins this long for the next product (a frame's come ~0.1–0.5 ms apart)

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
_SIGNATURES = {  # the functions of one_frame.c: (result, arguments)
    "mimi_block_size": (_I, []),
    "mimi_set_prefetch": (_I, [_L, _I]),
    "mimi_set_threads": (_I, [_I, _L]),
    "mimi_set_sharing": (None, [_I]),
    "mimi_rows_times_blocks": (None, [_P, _I, _I, _P, _L, _I, _P, _P, _P, _P]),
    "mimi_window_attention": (None, [_P, _L, _L, _P, _P, _L, _I, _I, _I, _I, _I, _I, _F, _P, _P]),
    "mimi_rope_attention": (None, [_P, _P, _P, _P, _P, _L, _I, _I, _I, _I, _I, _F, _P, _P, _P]),
    "mimi_residual_codes": (None, [_P, _I, _I, _P, _P, _L, _I, _P, _P]),
    "mimi_elu": (None, [_P, _P, _L]),
}


_LIBC = None
if platform.system() == "Linux":
    with contextlib.suppress(OSError, AttributeError):
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes, _LIBC.madvise.restype = [_P, ctypes.c_size_t, _I], _I


@dataclass(frozen=True)
class PackedBlocks:
    """A [out, in] float32 weight stored as [ceil(out / block), in, block] for `times_rows`."""

    blocks: torch.Tensor
    out_features: int

    def times_rows(
        self,
        rows: torch.Tensor,
        bias: torch.Tensor | None,
        gain: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """rows [N, in] (rows may be strided, their values contiguous) → residual + gain ⊙ (rows @ weightᵀ
        + bias) [N, out]; bias, gain [out] and residual [N, out] (contiguous) are optional."""
        count, in_features = rows.shape
        if rows.stride(1) != 1 or rows.dtype != torch.float32:
            rows = rows.float().contiguous()
        bias, gain = (None if t is None else t.detach().float().contiguous() for t in (bias, gain))
        residual = None if residual is None else residual.float().contiguous()
        y = rows.new_empty(count, self.out_features)
        library().mimi_rows_times_blocks(
            self.blocks.data_ptr(), in_features, self.out_features, rows.data_ptr(), rows.stride(0), count,
            _address(bias), _address(gain), _address(residual), y.data_ptr(),
        )  # fmt: skip
        return y


def pack(weight: torch.Tensor) -> PackedBlocks | None:
    """weight [out, in] (float32, CPU) in blocks for `PackedBlocks.times_rows`; None where the
    kernel can't be used (another device or dtype, no compiler, a failed check)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    lib = library()
    if lib is None:
        return None
    return _blocks(weight.detach(), lib.mimi_block_size())


def set_prefetch(floats_ahead: int, locality: int) -> None:
    """How far ahead (floats) and into which cache (0 non-temporal, 2 L2, 3 L1) products prefetch the
    weight; `routes` sets what is fastest here. Does nothing where the kernel is not available."""
    lib = library()
    if lib is not None and lib.mimi_set_prefetch(floats_ahead, locality) != 0:
        raise ValueError(f"no such prefetch: {floats_ahead} floats ahead, locality {locality}")


def set_threads(threads: int, spin_us: int = SPIN_US) -> None:
    """How many threads share each product's blocks (1: the calling thread alone), and how long (µs) a
    helper waits, spinning, for the next product before it sleeps; `routes` sets what is fastest here.
    Does nothing where the kernel is not available."""
    lib = library()
    if lib is not None and lib.mimi_set_threads(threads, spin_us) != 0:
        raise ValueError(f"cannot run products on {threads} threads")


def set_sharing(on: bool) -> None:
    """Whether products are shared with the helper threads (as at first) or computed by the calling
    thread alone while the helpers sleep; `routes.Sharing` times both. Nothing where no kernel."""
    lib = library()
    if lib is not None:
        lib.mimi_set_sharing(int(on))


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_past: int, window: int
) -> torch.Tensor | None:
    """`transformer.sliding_window_attention` of a short call, in one pass over the keys and values.

    q: [1, H, T, D]; k, v: [1, H, num_past + T, D] with the same strides, each step's D values
    contiguous. Returns [1, H, T, D], a view of a contiguous [1, T, H, D] (what the output
    projection reads); None where the kernel can't be used.
    """
    lib = library()
    tensors = (q, k, v)
    if (
        lib is None or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors)
        or q.shape[0] != 1 or k.stride() != v.stride() or q.stride(3) != 1 or k.stride(3) != 1
        or k.stride(2) != k.shape[3]
    ):  # fmt: skip
        return None
    _, heads, steps, dim = q.shape
    keys = k.shape[2]
    out, scores = q.new_empty(1, steps, heads, dim), q.new_empty(keys)  # (held until the call returns)
    lib.mimi_window_attention(
        q.data_ptr(), q.stride(1), q.stride(2), k.data_ptr(), v.data_ptr(), k.stride(1),
        heads, steps, keys, dim, num_past, window, 1.0 / math.sqrt(dim), scores.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    return out.transpose(1, 2)


def rope_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_past: int,
    window: int,
) -> torch.Tensor:
    """A streamed call's attention from its stacked projections, before the output projection.

    qkv: [T, 3 · H · D] (q, k, v of each step, contiguous); cos, sin: [T, D] ("rotate half" RoPE
    tables); k, v: [1, H, num_past + T, D], the stream's window (same strides, steps of D contiguous
    values), whose last T steps receive the rotated keys and the values. Returns [T, H · D]: what
    `apply_rope`, then `sliding_window_attention`, give, with the heads side by side.
    """
    _, heads, keys, dim = k.shape
    steps = qkv.shape[0]
    out, q_rotated, scores = (
        qkv.new_empty(steps, heads * dim),
        qkv.new_empty(heads * steps * dim),
        qkv.new_empty(keys),
    )
    library().mimi_rope_attention(
        qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(1),
        heads, steps, dim, num_past, window, 1.0 / math.sqrt(dim),
        q_rotated.data_ptr(), scores.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    return out


def residual_codes(
    residual: torch.Tensor, tables: list[PackedBlocks], centroids: list[torch.Tensor]
) -> torch.Tensor:
    """Residual vector quantization of one row: residual [dim] → codes [len(tables)] (int64).

    Codebook c's distance table [size, dim + 2] is `tables[c]` (`Codebook.nearest`'s [e, 1, |e|²],
    in blocks) and its centroids `centroids[c]` ([size, dim], rows with the table's stride, steps of
    1); each code is the one `Codebook.nearest` picks for what the codebooks before it left.
    """
    count, (size, dim) = len(tables), centroids[0].shape
    residual = residual.reshape(dim).float().clone()  # replaced by what remains
    scratch, codes = residual.new_empty(dim + 2 + size), torch.empty(count, dtype=torch.long)
    library().mimi_residual_codes(
        residual.data_ptr(), dim, count,
        (ctypes.c_void_p * count)(*[table.blocks.data_ptr() for table in tables]),
        (ctypes.c_void_p * count)(*[table.data_ptr() for table in centroids]),
        centroids[0].stride(0), size, scratch.data_ptr(), codes.data_ptr(),
    )  # fmt: skip
    return codes


def elu(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """`F.elu(x)` (alpha 1) of a contiguous float32 CPU tensor in one vectorized pass (expm1 within
    ~1 ulp, as torch's); in place where asked."""
    y = x if inplace else torch.empty_like(x)
    library().mimi_elu(x.data_ptr(), y.data_ptr(), x.numel())
    return y


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _blocks(weight: torch.Tensor, block: int) -> PackedBlocks:
    out_features, in_features = weight.shape
    padded = -(-out_features // block) * block
    rows = weight.new_zeros(padded, in_features)
    rows[:out_features] = weight
    blocks = _on_huge_pages(padded * in_features).view(-1, in_features, block)
    blocks.copy_(rows.view(-1, block, in_features).transpose(1, 2))
    return PackedBlocks(blocks, out_features)


def _on_huge_pages(count: int) -> torch.Tensor:
    """An uninitialised float32 tensor of `count` values whose whole 2 MiB pieces are asked to be
    backed by huge pages (Linux's transparent huge pages, `madvise`): a frame's pass over 170 MB of
    weights then needs ~85 TLB entries, not ~43,000 (one frame 24.8 → 23.3 ms on an Intel Xeon). The
    tail under 2 MiB keeps plain pages (no memory is spent on rounding up); so does everything where
    the system refuses or is not Linux."""
    memory = torch.empty(count + HUGE_PAGE // 4)  # untouched: its pages are made on the first write
    start = (-memory.data_ptr() % HUGE_PAGE) // 4
    region = memory[start : start + count]
    whole = count * 4 // HUGE_PAGE * HUGE_PAGE
    if _LIBC is not None and whole:
        _LIBC.madvise(region.data_ptr(), whole, MADV_HUGEPAGE)  # (a refusal leaves plain pages)
    return region


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use and checked once per process; None where unavailable."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    path = _built()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    for name, (result, arguments) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = result, arguments
    return lib if _agrees_with_torch(lib) else None


def _agrees_with_torch(lib: ctypes.CDLL) -> bool:
    """The kernel's product, attention and ELU against float64 on the same inputs, within the rounding
    any correct float32 route may add (`rounding`): no CPU's own library sets the tolerance."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(45, 37, generator=generator)  # a partial last block, an odd width
    bias, gain = torch.randn(2, 45, generator=generator)
    residual = torch.randn(6, 45, generator=generator)
    rows = torch.randn(6, 40, generator=generator)[:, :37]  # strided rows, a group of 4 and of 2
    packed = _blocks(weight, lib.mimi_block_size())
    y = torch.empty(6, 45)
    lib.mimi_rows_times_blocks(
        packed.blocks.data_ptr(), 37, 45, rows.data_ptr(), rows.stride(0), 6,
        bias.data_ptr(), gain.data_ptr(), residual.data_ptr(), y.data_ptr(),
    )  # fmt: skip
    exact = residual.double() + gain.double() * (rows.double() @ weight.double().T + bias.double())
    if not rounding.within(y, exact, rounding.product_bound(rows, weight, bias, gain, residual)):
        return False
    keys = torch.randn(2, 1, 3, 12, 20, generator=generator)[..., 1:9, :]  # strided heads, a partial window
    q = torch.randn(1, 3, 2, 20, generator=generator)
    out, scores = torch.empty(1, 2, 3, 20), torch.empty(8)
    lib.mimi_window_attention(
        q.data_ptr(), q.stride(1), q.stride(2), keys[0].data_ptr(), keys[1].data_ptr(), keys.stride(2),
        3, 2, 8, 20, 6, 5, 1.0 / math.sqrt(20), scores.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    position = torch.arange(2)[:, None] + 6 - torch.arange(8)[None, :]
    mask = (position >= 0) & (position < 5)
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double(), keys[0].double(), keys[1].double(), attn_mask=mask
    )
    bound = rounding.attention_bound(q, keys[0], keys[1], mask, 1.0 / math.sqrt(20))
    if not rounding.within(out.transpose(1, 2), exact, bound):
        return False
    x = torch.cat([torch.randn(37, generator=generator) * 8, torch.tensor([0.0, -1e-30, -90.0, -torch.inf])])
    y = torch.empty_like(x)
    lib.mimi_elu(x.data_ptr(), y.data_ptr(), x.numel())
    exact = torch.where(x > 0, x.double(), torch.expm1(x.double()))
    return rounding.within(y, exact, rounding.EXP_ULPS * rounding.unit_roundoff() * exact.abs())


def _built() -> Path | None:
    """The shared library for this machine, compiled into the cache folder if not already there."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return None
    source = SOURCE.read_bytes()
    folder = fpcache.cache_dir() / "kernels"
    tune = (f"-march={os.environ.get(ARCH_ENV) or 'native'}",)  # dropped where the compiler refuses it
    for flags in (FLAGS + tune, FLAGS):
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), *map(str.encode, flags), _cpu_id()]))
        path = folder / f"one_frame-{key.hexdigest()[:16]}.so"
        if path.is_file() or _compile(compiler, flags, path):
            return path
    return None


def _compile(compiler: str, flags: tuple[str, ...], path: Path) -> bool:
    """Compile into a temporary file beside `path`, then rename: concurrent runs never see half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=".one_frame-", suffix=".so")
        os.close(fd)
    except OSError:
        return False
    try:
        result = subprocess.run(
            [compiler, *flags, "-o", partial, str(SOURCE), "-lm"],
            capture_output=True, timeout=COMPILE_TIMEOUT_S, check=False,
        )  # fmt: skip
        if result.returncode == 0:
            os.replace(partial, path)
            return True
    except (OSError, subprocess.SubprocessError):
        pass
    finally:
        with contextlib.suppress(OSError):
            os.unlink(partial)
    return False


def _cpu_id() -> bytes:
    """What a binary tuned for this CPU depends on: a cache folder shared by machines keeps one per CPU."""
    parts = [platform.machine(), platform.processor()]
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            parts += [line for line in cpuinfo if line.startswith(("model name", "flags", "Features"))][:2]
    return "\n".join(parts).encode()
