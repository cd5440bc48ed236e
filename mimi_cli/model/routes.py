"""Which route one-frame CPU calls take on this machine: timed once, on first use, and cached.

A streamed frame reads every weight of its half of the model, so its speed is the speed at which one
route reads memory, and that differs by machine: on an AMD EPYC the C kernel (`native`) read 33 GB/s
where oneDNN read 21–26; on an Intel Xeon the same kernel read 5.5 GB/s (its non-temporal prefetches)
where oneDNN read 9–10. So the first one-frame call times the candidates on the machine at hand:

- the kernel's prefetch: distance and cache level (`native.set_prefetch`);
- the kernel's threads: how many share each product's blocks (`native.set_threads`; one core of an
  Intel Xeon read 16 GB/s where two read 33);
- products (the transformers' projections; the same choice is taken for the other large products of
  one frame, the quantizer's distance tables and few-output convolutions): the kernel, oneDNN's
  packed rows or the BLAS, on the released model's four projection shapes, read cold;
- attention of a streamed call, from its stacked q/k/v: the kernel's one call (RoPE, the window,
  the attention), or torch's RoPE, window and `scaled_dot_product_attention`;
- the SEANet's ELUs, in every CPU call (bulk ones too): the kernel's one pass (its expm1 vectorizes
  as far as the build's instruction set allows: ~2.6x torch's with AVX-512, ~1.9x with AVX2, slower
  than torch's with SSE alone) or torch's, on a frame's activations. Chosen on its own (`elu_choice`,
  ~20 ms, its own file), so that a bulk call does not time the one-frame routes (~1 s, ~240 MiB).

The choice is written as JSON beside the compiled kernel (`cache_dir()/kernels`), keyed like it (its
source, compiler, flags and CPU), by this module's source (how the choice is made), by torch's
version and instruction-set settings, by torch's thread count (oneDNN and the BLAS read with every
thread, the kernel with its own: a live process, on one thread, and a folder encode, on two, may choose
differently) and by the cores this process may run on, so it is redone when any of those change.
`MIMI_NATIVE=1` takes the kernel everywhere it can run, `MIMI_NATIVE=0` never (torch's routes), without
timing; `MIMI_NATIVE_THREADS=N` sets the kernel's threads (1: the calling thread alone, as on a machine
whose other cores are kept for other work).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import fpcache
from . import native, onednn

ROUTES_VERSION = 2
ELU_VERSION = 1
PRODUCT_SHAPES = ((1536, 512), (512, 512), (2048, 512), (512, 2048))  # q/k/v, o, fc1, fc2 of a layer
# the released SEANet's activations where a frame's ELUs run (steps, channels), encoder and decoder
ELU_SHAPES = ((1920, 64), (1920, 32), (480, 128), (480, 64), (96, 256), (96, 128), (16, 512), (16, 256))
LAYERS_READ = 10  # copies of the four shapes read in turn: 120 MiB (see `time_routes`)
PREFETCH_CANDIDATES = tuple((ahead, locality) for locality in (0, 2, 3) for ahead in (512, 2048))
# interleaved rounds; each candidate's fastest counts (a memory-bound read only loses time to noise)
ROUNDS = 5
MAX_KERNEL_THREADS = 4  # beyond this a live frame's products gain little, and other work needs cores
ONE_FRAME_CALL = 2  # frames of a streamed call that `Sharing` times (one frame's call gives two steps)
ENVIRONMENT = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
THREADS_ENV = "MIMI_NATIVE_THREADS"  # the kernel's threads, instead of the timed choice


@dataclass(frozen=True)
class Routes:
    """The routes of one-frame calls: "kernel", "onednn" or "blas" for products, "kernel" or "torch"
    for attention, the kernel's prefetch (floats ahead, locality) and threads, and the timings behind
    them (µs)."""

    products: str = "kernel"
    attention: str = "kernel"
    prefetch: tuple[int, int] = (2048, 0)
    threads: int = 1
    timings_us: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        """One line: the route per layer kind (the ELU's too, see `elu`), and the kernel's prefetch and
        threads."""
        ahead, locality = self.prefetch
        level = {0: "non-temporal", 2: "into L2", 3: "into L1"}.get(locality, str(locality))
        prefetch = f"{4 * ahead // 1024} KiB ahead {level}"
        kernel = f"kernel prefetch: {prefetch}, kernel threads: {self.threads}"
        return f"products: {self.products}, attention: {self.attention}, elu: {elu()}, {kernel}"


TORCH_ONLY = Routes(products="onednn", attention="torch")


class Sharing:
    """Whether one stream's frames share the kernel's products with its helper threads, chosen by
    timing the frames both ways as they go.

    Helpers pay where a core is free (an idle Intel Xeon: a frame 15–16 ms shared, 20–21 alone) and
    cost where none is (the same Xeon with one core busy elsewhere: 29 against 22), and a machine's
    load changes while a live stream runs. So after a first window of warm-up (buffers, packed
    weights), a stream runs its frames in windows of `WINDOW`, each shared or alone; keeps each way's
    time per frame (the median of its last `KEPT` windows' medians: one frame, or one window, held up
    by the system does not decide); runs the next window the faster way, and every `EXPLORE`-th
    window the other way, so that a change of load is seen within seconds. Whole frames are what is
    timed, so all a helper costs (its spinning takes a core that other work then takes from the
    caller) is counted.
    """

    WINDOW = 4
    EXPLORE = 16
    KEPT = 3

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.cost: dict[bool, float | None] = {True: None, False: None}  # s per frame, by way
        self._kept: dict[bool, collections.deque[float]] = {
            way: collections.deque(maxlen=self.KEPT) for way in (True, False)
        }
        self.shared = True  # the current window's way
        self._window: list[float] = []  # s per frame of the current window's calls
        self._windows = -1  # (the first window warms up)
        self.frames = {True: 0, False: 0}  # frames run each way

    def summary(self) -> dict[str, float] | None:
        """How the stream ran: the share of its frames that shared products, and each way's latest
        ms per frame; None where nothing was timed (no helpers, or not one-frame work)."""
        total = self.frames[True] + self.frames[False]
        if not total:
            return None
        ms = {way: None if cost is None else round(cost * 1000, 2) for way, cost in self.cost.items()}
        return {
            "shared_frames": round(self.frames[True] / total, 3),
            "shared_ms": ms[True],
            "alone_ms": ms[False],
        }

    @contextlib.contextmanager
    def timed(self, frames: int) -> Iterator[None]:
        """Runs a call of `frames` frames the current window's way and counts its time; a call that is
        not one-frame work (no frames, or more than a few), or a process whose kernel has no helpers,
        is run as it is and not counted."""
        if not 0 < frames <= ONE_FRAME_CALL or native.library() is None or chosen().threads == 1:
            yield
            return
        native.set_sharing(self.shared)
        self.frames[self.shared] += frames
        started = self.clock()
        yield
        self._count((self.clock() - started) / frames)

    def _count(self, per_frame: float) -> None:
        self._window.append(per_frame)
        if len(self._window) < self.WINDOW:
            return
        if self._windows >= 0:
            self._kept[self.shared].append(statistics.median(self._window))
            self.cost[self.shared] = statistics.median(self._kept[self.shared])
        self._windows += 1
        self._window = []
        alone, shared = self.cost[False], self.cost[True]
        if alone is None or shared is None:  # a way not timed yet is timed next
            self.shared = alone is not None or shared is None
        else:
            faster = shared < alone
            self.shared = not faster if self._windows % self.EXPLORE == 0 else faster


def products() -> str:
    """The route of one-frame products: "kernel", "onednn" or "blas"."""
    return chosen().products


def attention() -> str:
    """The route of one-frame attention: "kernel" or "torch"."""
    return chosen().attention


def elu() -> str:
    """The route of the SEANet's ELUs on CPU: "kernel" or "torch" (`elu_choice`)."""
    return elu_choice()[0]


@functools.cache
def elu_choice() -> tuple[str, dict[str, float]]:
    """(route, timings in µs) of the ELU on this machine: read from its file beside the kernel (keyed
    as the routes are: `cache_path`), else timed on a frame's activations and written. torch's where
    the kernel is not available, the kernel's with `MIMI_NATIVE=1` (not timed)."""
    lib = native.library()
    if lib is None:
        return "torch", {}
    if os.environ.get(native.DISABLE_ENV) == "1":
        return "kernel", {}
    path = cache_path(lib, "elu")
    data = _read_versioned(path, ELU_VERSION)
    if data is not None and data.get("elu") in ("kernel", "torch"):
        with contextlib.suppress(KeyError, TypeError, ValueError, AttributeError):  # (else timed again)
            return data["elu"], {name: float(t) for name, t in data["timings_us"].items()}
    times = _fastest(_elu_candidates(torch.Generator().manual_seed(0)))
    route = min(times, key=times.get)
    timings = {f"elu {name}": round(t * 1e6, 1) for name, t in times.items()}
    _write_versioned(path, ELU_VERSION, {"elu": route, "timings_us": timings})
    return route, timings


@functools.cache
def chosen() -> Routes:
    """This machine's routes, read from the cache or else timed (and cached); torch's alone where the
    kernel is not available (`MIMI_NATIVE=0` among the reasons), the kernel's wherever it can run with
    `MIMI_NATIVE=1` (its prefetch still this machine's)."""
    lib = native.library()
    if lib is None:
        return TORCH_ONLY
    path = cache_path(lib)
    routes = _read(path)
    if routes is None:
        routes = time_routes()
        _write_versioned(path, ROUTES_VERSION, asdict(routes))
    native.set_prefetch(*routes.prefetch)
    if os.environ.get(native.DISABLE_ENV) == "1":
        routes = replace(routes, products="kernel", attention="kernel")
    forced = os.environ.get(THREADS_ENV, "").strip()
    if forced:
        if not forced.isdigit() or not 1 <= int(forced) <= MAX_KERNEL_THREADS:
            raise ValueError(
                f"{THREADS_ENV}={forced}: expected a thread count from 1 to {MAX_KERNEL_THREADS}"
            )
        routes = replace(routes, threads=int(forced))
    native.set_threads(routes.threads)
    return routes


def cache_path(lib: object, kind: str = "routes") -> Path:
    """Where this machine's choice of `kind` ("routes", "elu") is kept: beside the kernel, keyed by it,
    this module, torch and its settings."""
    kernel = Path(getattr(lib, "_name", "kernel"))
    timing = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # how the choice is made
    settings = (f"{name}={os.environ.get(name, '')}" for name in ENVIRONMENT)
    threads = f"threads={torch.get_num_threads()}"  # oneDNN and the BLAS use them all
    cores = f"cores={available_cores()}"  # the kernel's helper threads run on them
    parts = [kernel.name, timing, torch.__version__, threads, cores, *settings]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return kernel.with_name(f"{kind}-{key}.json")


def time_routes() -> Routes:
    """Times every candidate on this machine (under a second) and keeps the fastest of each kind.

    The products read `LAYERS_READ` layers' weights in turn (120 MiB): a frame finds its weights cold,
    and a smaller set would be timed partly from cache (an Intel Xeon read a 64 MiB set at 20 GB/s, a
    256 MiB one at 12). The kernel's blocks are the weights the BLAS reads too (as [out, in] matrices
    of other values, the same bytes), so at most two copies are held: ~240 MiB, for that second.
    """
    generator = torch.Generator().manual_seed(0)
    rows = {shape[1]: torch.randn(2, shape[1], generator=generator) for shape in PRODUCT_SHAPES}
    blocks = [
        native.pack(torch.empty(shape).uniform_(-1, 1, generator=generator)) for shape in PRODUCT_SHAPES
    ]
    blocks = [native.PackedBlocks(b.blocks.clone(), b.out_features) for b in blocks * LAYERS_READ]
    matrices = [b.blocks.view(-1, b.blocks.shape[1])[: b.out_features] for b in blocks]  # [out, in] views
    widths = [b.blocks.shape[1] for b in blocks]

    def through(packed: list) -> Callable[[], None]:
        calls = [functools.partial(p.times_rows, rows[w], None) for p, w in zip(packed, widths, strict=True)]
        return _cycle(calls)

    kernel = through(blocks)
    prefetch_times = _fastest(
        {candidate: _prefetched(candidate, kernel) for candidate in PREFETCH_CANDIDATES}
    )
    best_prefetch = min(prefetch_times, key=prefetch_times.get)
    native.set_prefetch(*best_prefetch)
    counts = range(1, min(available_cores(), MAX_KERNEL_THREADS) + 1)
    thread_times = _fastest({count: _threaded(count, kernel) for count in counts})
    best_threads = min(thread_times, key=thread_times.get)
    native.set_threads(best_threads)
    from .linear import weight_times_rows  # (linear imports this module)

    blas = [
        functools.partial(weight_times_rows, m, rows[w], None) for m, w in zip(matrices, widths, strict=True)
    ]
    candidates = {"kernel": kernel, "blas": _cycle(blas)}
    packed = [onednn.pack_rows(matrix) for matrix in matrices]
    if all(p is not None for p in packed):
        candidates["onednn"] = through(packed)
    product_times = _fastest(candidates)
    attention_times = _fastest(_attention_candidates(generator))
    timings = {f"prefetch {ahead}/{locality}": t for (ahead, locality), t in prefetch_times.items()}
    timings |= {f"kernel threads {count}": t for count, t in thread_times.items()}
    timings |= {f"products {name}": t for name, t in product_times.items()}
    timings |= {f"attention {name}": t for name, t in attention_times.items()}
    return Routes(
        products=min(product_times, key=product_times.get),
        attention=min(attention_times, key=attention_times.get),
        prefetch=best_prefetch,
        threads=best_threads,
        timings_us={name: round(t * 1e6, 1) for name, t in timings.items()},
    )


def _prefetched(prefetch: tuple[int, int], call: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        native.set_prefetch(*prefetch)
        call()

    return run


def _threaded(threads: int, call: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        native.set_threads(threads)
        call()

    return run


def available_cores() -> int:
    """The cores this process may run on (its affinity where the system says, else all)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _attention_candidates(generator: torch.Generator) -> dict[str, Callable[[], None]]:
    """A streamed two-step call's attention, from the stacked q/k/v to the mixed values, in each
    route's form: the kernel's one call (`native.rope_attention`, the window written in place), or
    torch's RoPE, window concatenation and `scaled_dot_product_attention`. The released model's
    sizes (8 heads of 64, 250 keys), over the windows of 2 · `LAYERS_READ` layers, read cold as a
    frame finds them."""
    from .transformer import apply_rope, rope_tables  # (transformer imports this module)

    heads, dim, keys, steps = 8, 64, 250, 2
    qkv = torch.randn(steps, 3 * heads * dim, generator=generator)
    cos, sin = rope_tables(torch.arange(keys - steps, keys), dim, 10_000.0, torch.float32)
    windows = torch.randn(2 * LAYERS_READ, 2, 1, heads, keys, dim, generator=generator)

    def through_torch(k: torch.Tensor, v: torch.Tensor) -> None:
        q, new_k, new_v = (
            t.view(1, steps, heads, dim).transpose(1, 2) for t in qkv.view(steps, 3, -1).unbind(1)
        )
        q, new_k = apply_rope(q, cos, sin), apply_rope(new_k, cos, sin)
        k = torch.cat([k[:, :, steps:], new_k], dim=2)
        v = torch.cat([v[:, :, steps:], new_v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)  # (every key in the window: no mask needed)
        out.transpose(1, 2).reshape(steps, -1)

    def through_kernel(k: torch.Tensor, v: torch.Tensor) -> None:
        native.rope_attention(qkv, cos, sin, k, v, keys - steps, keys)

    return {
        "kernel": _cycle([functools.partial(through_kernel, k, v) for k, v in windows]),
        "torch": _cycle([functools.partial(through_torch, k, v) for k, v in windows]),
    }


def _elu_candidates(generator: torch.Generator) -> dict[str, Callable[[], None]]:
    """The ELUs of one streamed frame (encoder and decoder: each shape twice), each route's way."""
    activations = [torch.randn(1, *shape, generator=generator) for shape in ELU_SHAPES * 2]
    return {
        "kernel": _cycle([functools.partial(native.elu, x) for x in activations]),
        "torch": _cycle([functools.partial(F.elu, x) for x in activations]),
    }


def _cycle(calls: list[Callable[[], object]]) -> Callable[[], None]:
    """One call that makes every call of the list: a pass over weights too large to stay in cache."""

    def run() -> None:
        for call in calls:
            call()

    return run


def _fastest(candidates: dict, rounds: int = ROUNDS) -> dict:
    """Each candidate's best time (s) over `rounds` interleaved rounds, after one untimed call each."""
    times: dict = {name: [] for name in candidates}
    for call in candidates.values():
        call()
    for _ in range(rounds):
        for name, call in candidates.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def _read(path: Path) -> Routes | None:
    data = _read_versioned(path, ROUTES_VERSION)
    if data is None:
        return None
    try:
        routes = Routes(**{**data, "prefetch": tuple(data["prefetch"])})
    except (KeyError, TypeError, ValueError):
        return None
    valid = routes.products in ("kernel", "onednn", "blas") and routes.attention in ("kernel", "torch")
    valid = valid and isinstance(routes.threads, int) and 1 <= routes.threads <= MAX_KERNEL_THREADS
    return routes if valid and all(isinstance(x, int) for x in routes.prefetch) else None


def _read_versioned(path: Path, version: int) -> dict | None:
    """The fields of a choice's cache file written with `version`; None where it is missing, damaged or
    of another version (the choice is then made again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.pop("version", None) == version else None


def _write_versioned(path: Path, version: int, fields: dict) -> None:
    fpcache.write_json(path, {"version": version, **fields})
