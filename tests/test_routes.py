"""The one-frame routes chosen by timing on the machine at hand: what is chosen, cached and forced."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from mimi_cli.model import linear, native, onednn, routes
from mimi_cli.model.linear import Linear

COMPILER = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C compiler here: the kernel can't be built")


@pytest.fixture
def timed(fresh_build, monkeypatch):
    """A fresh kernel cache, the choice left to timing (no MIMI_NATIVE), and a count of the timings."""
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    runs = []
    time_routes = routes.time_routes
    monkeypatch.setattr(routes, "time_routes", lambda: runs.append(1) or time_routes())
    yield runs
    native.set_threads(1)  # (the choice set the kernel's threads for the process)


def _slowed(call, seconds: float = 0.002):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return call(*args, **kwargs)

    return slow


def test_the_choice_is_timed_once_and_recorded(timed, fresh_build):
    chosen = routes.chosen()
    assert timed == [1]
    assert chosen.products in ("kernel", "onednn", "blas") and chosen.attention in ("kernel", "torch")
    assert chosen.prefetch in routes.PREFETCH_CANDIDATES
    counts = range(1, min(routes.available_cores(), routes.MAX_KERNEL_THREADS) + 1)
    assert {f"kernel threads {count}" for count in counts} == {n for n in chosen.timings_us if "threads" in n}
    assert chosen.timings_us[f"kernel threads {chosen.threads}"] == min(
        chosen.timings_us[f"kernel threads {count}"] for count in counts
    )
    assert {f"products {name}" for name in ("kernel", "onednn", "blas")} <= set(chosen.timings_us)
    assert chosen.timings_us[f"products {chosen.products}"] == min(
        t for name, t in chosen.timings_us.items() if name.startswith("products ")
    )
    [saved] = fresh_build.glob("routes-*.json")
    assert json.loads(saved.read_text())["products"] == chosen.products
    assert not list(fresh_build.glob(".routes-*"))  # no partial file left
    assert "products: " in chosen.describe() and "KiB ahead" in chosen.describe()
    assert f"elu: {routes.elu()}" in chosen.describe()
    assert f"kernel threads: {chosen.threads}" in chosen.describe()


@pytest.mark.parametrize("slow", ["kernel", "onednn", "blas"])
def test_a_route_made_slow_is_never_chosen(timed, monkeypatch, slow):
    if slow == "kernel":
        monkeypatch.setattr(native.PackedBlocks, "times_rows", _slowed(native.PackedBlocks.times_rows))
    elif slow == "onednn":
        monkeypatch.setattr(onednn.PackedRows, "times_rows", _slowed(onednn.PackedRows.times_rows))
    else:
        monkeypatch.setattr(linear, "weight_times_rows", _slowed(linear.weight_times_rows))
    assert routes.chosen().products != slow
    layer = Linear(1024, 512)
    with torch.inference_mode():
        layer(torch.randn(2, 1024))
    kind = {"kernel": native.PackedBlocks, "onednn": onednn.PackedRows, "blas": type(None)}
    assert not isinstance(layer.packed, kind[slow])  # the layers follow the choice


@pytest.mark.parametrize("slow", ["kernel", "torch"])
def test_slow_attention_is_never_chosen(timed, monkeypatch, slow):
    if slow == "kernel":
        monkeypatch.setattr(native, "rope_attention", _slowed(native.rope_attention, 0.0005))
    else:
        monkeypatch.setattr(
            routes.F,
            "scaled_dot_product_attention",
            _slowed(torch.nn.functional.scaled_dot_product_attention, 0.0005),
        )
    assert routes.chosen().attention != slow


@pytest.mark.parametrize("slow", ["kernel", "torch"])
def test_a_slow_elu_is_never_chosen_and_the_seanet_follows_the_choice(timed, monkeypatch, slow):
    from mimi_cli.config import MimiConfig
    from mimi_cli.model.seanet import SeanetEncoder

    if slow == "kernel":
        monkeypatch.setattr(native, "elu", _slowed(native.elu, 0.0005))
    else:
        monkeypatch.setattr(routes.F, "elu", _slowed(torch.nn.functional.elu, 0.0005))
    assert routes.elu() != slow
    calls = []
    elu = native.elu
    monkeypatch.setattr(native, "elu", lambda *a: calls.append(1) or elu(*a))
    encoder = SeanetEncoder(MimiConfig(num_filters=4, hidden_size=16))
    with torch.inference_mode():
        encoder(torch.randn(1, 960, 1))  # a bulk call
    assert (len(calls) > 0) == (slow == "torch")
    assert timed == []  # the one-frame routes were not timed for the ELU's choice


def test_the_elu_choice_is_kept_in_its_own_file_and_reused(timed, fresh_build, monkeypatch):
    route, timings = routes.elu_choice()
    [saved] = fresh_build.glob("elu-*.json")
    assert json.loads(saved.read_text())["elu"] == route and timings[f"elu {route}"] == min(timings.values())
    assert set(timings) == {"elu kernel", "elu torch"} and timed == []
    routes.elu_choice.cache_clear()  # a new process
    with monkeypatch.context() as patched:
        patched.setattr(routes, "_fastest", lambda *a: pytest.fail("timed again"))
        assert routes.elu_choice() == (route, timings)
    saved.write_text('{"version": 1, "elu": "fastest"')  # damaged: timed again
    routes.elu_choice.cache_clear()
    assert routes.elu_choice()[0] in ("kernel", "torch")
    assert json.loads(saved.read_text())["elu"] in ("kernel", "torch")


def test_the_cached_choice_is_reused_without_timing(timed, monkeypatch):
    first = routes.chosen()
    routes.chosen.cache_clear()  # a new process
    monkeypatch.setattr(routes, "time_routes", lambda: pytest.fail("timed again"))
    assert routes.chosen() == first


@pytest.mark.parametrize(
    "change", ["cpu", "compiler flags", "torch settings", "timing code", "threads", "cores"]
)
def test_the_choice_is_redone_when_the_kernel_cpu_or_torch_change(
    timed, fresh_build, tmp_path, monkeypatch, change
):
    routes.chosen()
    if change == "threads":
        other = torch.get_num_threads() + 1  # (as a process with another thread count sees it)
        monkeypatch.setattr(routes.torch, "get_num_threads", lambda: other)
    elif change == "cores":  # (a process started on fewer cores, as `taskset` or a container does)
        monkeypatch.setattr(routes, "available_cores", lambda: 1)
    elif change == "timing code":  # a choice made by an older way of timing is not trusted
        changed = tmp_path / "routes.py"
        changed.write_text(open(routes.__file__).read() + "# another way of timing\n")
        monkeypatch.setattr(routes, "__file__", str(changed))
    elif change == "cpu":
        monkeypatch.setattr(native, "_cpu_id", lambda: b"another CPU")
    elif change == "compiler flags":
        monkeypatch.setenv(native.ARCH_ENV, "x86-64-v2" if os.uname().machine == "x86_64" else "armv8-a")
    else:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    native.library.cache_clear()
    routes.chosen.cache_clear()
    routes.chosen()
    assert timed == [1, 1]
    assert len(list(fresh_build.glob("routes-*.json"))) == 2


def test_a_damaged_cache_file_is_timed_again_and_replaced(timed, fresh_build):
    routes.chosen()
    [saved] = fresh_build.glob("routes-*.json")
    saved.write_text('{"version": 1, "products": "fastest"')
    routes.chosen.cache_clear()
    routes.chosen()
    assert timed == [1, 1] and json.loads(saved.read_text())["products"] in ("kernel", "onednn", "blas")


def test_mimi_native_forces_a_route_without_timing_against_it(timed, monkeypatch, fresh_build):
    monkeypatch.setattr(native.PackedBlocks, "times_rows", _slowed(native.PackedBlocks.times_rows))
    assert routes.chosen().products != "kernel"
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    routes.chosen.cache_clear()
    forced = routes.chosen()
    routes.elu_choice.cache_clear()
    assert (forced.products, forced.attention, routes.elu()) == ("kernel",) * 3
    assert timed == [1]  # its cache, reused
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    native.library.cache_clear()
    routes.chosen.cache_clear()
    routes.elu_choice.cache_clear()
    assert routes.chosen() == routes.TORCH_ONLY and routes.elu() == "torch" and timed == [1]


def test_the_prefetch_chosen_is_the_kernels_setting(timed):
    chosen = routes.chosen()
    with pytest.raises(ValueError, match="no such prefetch"):
        native.set_prefetch(64, 1)
    native.set_prefetch(*chosen.prefetch)  # (accepted: the candidates are the kernel's)


@pytest.mark.skipif(routes.available_cores() < 2, reason="one core here: there is no thread count to choose")
@pytest.mark.parametrize("slow", [1, 2])
def test_a_thread_count_made_slow_is_never_chosen(timed, monkeypatch, slow):
    current = {"threads": 1}
    set_threads, times_rows = native.set_threads, native.PackedBlocks.times_rows

    def recorded(threads, *args):
        current["threads"] = threads
        set_threads(threads, *args)

    def slowed_when_shared(self, *args):
        if current["threads"] == slow:
            time.sleep(0.002)
        return times_rows(self, *args)

    monkeypatch.setattr(native, "set_threads", recorded)
    monkeypatch.setattr(native.PackedBlocks, "times_rows", slowed_when_shared)
    chosen = routes.chosen()
    assert chosen.threads != slow
    assert current["threads"] == chosen.threads  # the process runs with the choice


def test_mimi_native_threads_sets_the_kernels_threads(timed, monkeypatch):
    monkeypatch.setenv(routes.THREADS_ENV, "1")
    assert routes.chosen().threads == 1
    monkeypatch.setenv(routes.THREADS_ENV, "many")
    routes.chosen.cache_clear()
    with pytest.raises(ValueError, match="MIMI_NATIVE_THREADS=many: expected a thread count"):
        routes.chosen()


class _Clock:
    """A clock whose frames take `alone` or `shared` seconds, whichever way `native.set_sharing` set."""

    def __init__(self, monkeypatch, alone: float, shared: float) -> None:
        self.now, self.cost, self.way, self.ways = 0.0, {False: alone, True: shared}, True, []
        monkeypatch.setattr(native, "set_sharing", self.set_sharing)

    def set_sharing(self, on: bool) -> None:
        self.way = on
        self.ways.append(on)

    def __call__(self) -> float:
        return self.now

    def frame(self, sharing: routes.Sharing, extra: float = 0.0) -> None:
        with sharing.timed(1):
            self.now += self.cost[self.way] + extra


@pytest.mark.parametrize("faster", ["shared", "alone"])
def test_a_streams_frames_run_the_faster_way_and_look_at_the_other_now_and_then(monkeypatch, faster):
    monkeypatch.setattr(routes, "chosen", lambda: routes.Routes(threads=2))
    clock = _Clock(monkeypatch, alone=0.020, shared=0.015 if faster == "shared" else 0.029)
    sharing = routes.Sharing(clock)
    for _ in range(320):
        clock.frame(sharing)
    ways = clock.ways[3 * sharing.WINDOW :]  # after a window of warm-up and one window each way
    slower = sum(way != (faster == "shared") for way in ways)
    first = [True] * 2 * sharing.WINDOW + [False] * sharing.WINDOW
    assert clock.ways[: 3 * sharing.WINDOW] == first
    assert slower == len(ways) // (sharing.WINDOW * sharing.EXPLORE) * sharing.WINDOW  # exploring only


def test_the_warm_up_window_and_one_slow_frame_do_not_decide(monkeypatch):
    monkeypatch.setattr(routes, "chosen", lambda: routes.Routes(threads=2))
    clock = _Clock(monkeypatch, alone=0.020, shared=0.015)
    sharing = routes.Sharing(clock)
    clock.cost[True] = 0.500  # the first calls pack the weights
    for _ in range(sharing.WINDOW):
        clock.frame(sharing)
    clock.cost[True] = 0.015
    for index in range(6 * sharing.WINDOW):
        clock.frame(sharing, extra=0.3 if index == 5 else 0.0)  # one frame held up by the system
    assert sharing.cost == pytest.approx({True: 0.015, False: 0.020}) and sharing.shared


def test_a_change_of_load_is_followed_within_a_few_explorations(monkeypatch):
    monkeypatch.setattr(routes, "chosen", lambda: routes.Routes(threads=2))
    clock = _Clock(monkeypatch, alone=0.020, shared=0.015)
    sharing = routes.Sharing(clock)
    for _ in range(100):
        clock.frame(sharing)
    clock.cost[True] = 0.029  # another process takes a core
    for _ in range(4 * sharing.WINDOW * sharing.EXPLORE):
        clock.frame(sharing)
    assert clock.ways[-sharing.WINDOW * (sharing.EXPLORE - 1) :].count(True) <= sharing.WINDOW


def test_calls_that_are_not_one_frame_work_are_not_timed(monkeypatch):
    monkeypatch.setattr(routes, "chosen", lambda: routes.Routes(threads=2))
    clock = _Clock(monkeypatch, alone=0.020, shared=0.015)
    sharing = routes.Sharing(clock)
    for frames in (0, routes.ONE_FRAME_CALL + 1):
        with sharing.timed(frames):
            clock.now += 1.0
    assert clock.ways == [] and sharing.cost == {True: None, False: None}
    monkeypatch.setattr(routes, "chosen", lambda: routes.Routes(threads=1))  # no helpers: nothing to choose
    with sharing.timed(1):
        pass
    assert clock.ways == []
