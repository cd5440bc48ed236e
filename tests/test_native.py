"""The C kernel of one-frame calls: its results, how it is built and cached, and every way it falls back."""

from __future__ import annotations

import copy
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bounds import assert_attention, assert_product, assert_within
from propagation import rounding_error_bound

from mimi_cli.fpcache import CACHE_ENV
from mimi_cli.model import native, onednn, rounding, routes
from mimi_cli.model.linear import PACK_MIN_VALUES, Linear, pack_for_rows
from mimi_cli.model.transformer import sliding_window_attention

COMPILER = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="no C compiler here: the kernel can't be built")


def _compiler_wrapper(folder: Path, refuse: str | None = None, source: Path | None = None) -> Path:
    """A `cc` stand-in: logs its arguments to calls.log, fails when they hold `refuse`, compiles
    `source` instead of the package's kernel if given, else passes everything to the real compiler."""
    script = folder / "cc-wrapper"
    script.write_text(
        f"#!{sys.executable}\n"
        "import subprocess, sys\n"
        f"open({str(folder / 'calls.log')!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        f"if {refuse!r} in sys.argv: sys.exit(1)\n"
        f"args = [{str(source)!r} if {source is not None} and a.endswith('one_frame.c') else a\n"
        "        for a in sys.argv[1:]]\n"
        f"sys.exit(subprocess.call([{COMPILER!r}, *args]))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


@needs_compiler
def test_the_kernel_is_built_here():
    assert native.library() is not None


@needs_compiler
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("out_features, in_features", [(1, 7), (31, 64), (32, 130), (33, 1), (100, 2048)])
@pytest.mark.parametrize("bias", [False, True])
def test_rows_times_blocks_equals_the_product(rows, out_features, in_features, bias):
    generator = torch.Generator().manual_seed(rows * 1000 + out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    b = torch.randn(out_features, generator=generator) if bias else None
    x = torch.randn(rows, in_features + 3, generator=generator)[:, 2:-1]  # strided rows
    got = native.pack(weight).times_rows(x, b)
    assert got.shape == (rows, out_features) and got.is_contiguous()
    assert_product(got, x, weight, b)  # within what any summation order may round


@needs_compiler
def test_the_rounding_bound_catches_one_wrong_term():
    """The bound is tight enough to fail a product that drops or doubles a single term."""
    weight, x = torch.randn(100, 2048), torch.randn(2, 2048)
    got = native.pack(weight).times_rows(x, None)
    off_by_one_term = got + (x[:, -1:] * weight[:, -1]).abs().clamp_min(1e-3)
    with pytest.raises(AssertionError, match="rounding bound"):
        assert_product(off_by_one_term, x, weight)


@needs_compiler
def test_rows_in_the_same_memory_as_a_convolution_window():
    """Overlapping rows (a convolution's windows, `stride` steps apart) are read where they lie."""
    weight, signal = torch.randn(48, 6 * 16), torch.randn(40, 16)  # 6 taps of 16 channels, time-major
    rows = signal.view(-1).as_strided((9, 6 * 16), (4 * 16, 1))  # windows of 6 steps, stride 4
    assert_product(native.pack(weight).times_rows(rows, None), rows, weight)


@needs_compiler
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("num_past, window", [(0, 5), (3, 5), (4, 5), (11, 5), (249, 250)])
def test_window_attention_equals_masked_attention(steps, num_past, window):
    generator = torch.Generator().manual_seed(steps * 1000 + num_past)
    heads, dim, keys = 3, 64, num_past + steps
    buffer = torch.randn(2, 1, heads, keys + 7, dim, generator=generator)  # as a stream keeps them
    buffer = buffer[..., 4 : 4 + keys, :]
    q = torch.randn(1, heads, steps, dim, generator=generator)
    got = native.window_attention(q, buffer[0], buffer[1], num_past, window)
    position = torch.arange(steps)[:, None] + num_past - torch.arange(keys)[None, :]
    assert_attention(got, q, buffer[0], buffer[1], (position >= 0) & (position < window))
    assert got.transpose(1, 2).is_contiguous()  # what the output projection reads, without a copy


@needs_compiler
def test_short_streamed_attention_calls_take_the_kernel(monkeypatch):
    routes.chosen()  # (timed once per machine, before calls are counted)
    calls = []
    kernel = native.window_attention
    monkeypatch.setattr(native, "window_attention", lambda *a: calls.append(a[0].shape) or kernel(*a))
    q, k = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 9, 8)
    out = sliding_window_attention(q, k, k, 4, 7)
    position = torch.arange(2)[:, None] + 7 - torch.arange(9)[None, :]
    assert_attention(out, q, k, k, (position >= 0) & (position < 4))
    assert calls == [(1, 2, 2, 8)]
    sliding_window_attention(torch.randn(2, 2, 2, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8), 4, 7)
    assert len(calls) == 2  # a batch of two is asked too, and declined: torch computes it


def test_what_the_kernel_declines():
    assert native.pack(torch.randn(4, 4, dtype=torch.float64)) is None
    assert native.pack(torch.randn(2, 4, 4)) is None
    q, k = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 5, 8)
    assert native.window_attention(q, k, k, 3, 4) is None  # batch 2
    assert native.window_attention(q[:1].double(), k[:1].double(), k[:1].double(), 3, 4) is None


@needs_compiler
def test_built_once_into_the_cache_then_reused(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", str(_compiler_wrapper(fresh_build.parent.parent)))
    assert native.library() is not None
    built = list(fresh_build.glob("one_frame-*.so"))
    assert len(built) == 1 and not list(fresh_build.glob(".one_frame-*"))  # no partial file left
    assert "-march=native" in (fresh_build.parent.parent / "calls.log").read_text()
    native.library.cache_clear()
    assert native.library() is not None  # a new process: the cached build, no compiler call
    assert len((fresh_build.parent.parent / "calls.log").read_text().splitlines()) == 1


@needs_compiler
def test_the_kernel_is_built_for_the_instruction_set_asked(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", str(_compiler_wrapper(fresh_build.parent.parent)))
    monkeypatch.setenv(native.ARCH_ENV, "x86-64-v2" if os.uname().machine == "x86_64" else "armv8-a")
    assert native.library() is not None
    assert f"-march={os.environ[native.ARCH_ENV]} " in (fresh_build.parent.parent / "calls.log").read_text()


@needs_compiler
def test_a_compiler_refusing_the_tuning_flag_still_builds(fresh_build, monkeypatch):
    monkeypatch.setenv("CC", str(_compiler_wrapper(fresh_build.parent.parent, refuse="-march=native")))
    assert native.library() is not None
    assert len((fresh_build.parent.parent / "calls.log").read_text().splitlines()) == 2


@needs_compiler
@pytest.mark.parametrize(
    "right, wrong",
    [
        ("a[r][j] += s * wi[j]", "a[r][j] += 2 * s * wi[j]"),  # the products
        ("m = r + (r * r) * p;", "m = r + (r * r) * p * 1.0001f;"),  # ELU's expm1: ~1e-5 near -0.3
    ],
)
def test_a_kernel_that_disagrees_with_torch_is_not_used(fresh_build, monkeypatch, right, wrong):
    """A miscompiled kernel is caught by the check against torch: torch's routes are kept."""
    original = (Path(__file__).parents[1] / "mimi_cli" / "model" / "one_frame.c").read_text()
    assert original.count(right) == 1
    source = fresh_build.parent.parent / "wrong.c"
    source.write_text(original.replace(right, wrong))
    monkeypatch.setenv("CC", str(_compiler_wrapper(fresh_build.parent.parent, source=source)))
    assert native.library() is None
    assert len(list(fresh_build.glob("one_frame-*.so"))) == 1  # built, then refused
    assert native.pack(torch.randn(64, 64)) is None
    assert isinstance(pack_for_rows(torch.randn(1024, 512)), onednn.PackedRows)


@needs_compiler
@pytest.mark.parametrize("inplace", [False, True])
def test_elu_is_within_a_few_ulp_of_expm1_everywhere(inplace):
    """Every 997th float from -0 to -100 (1.1 million: every exponent, mantissas all over), [-1, 1]
    densely, and the edges: within the exp error every check allows (`rounding.EXP_ULPS`)."""
    import numpy as np

    negatives = np.arange(0x80000000, 0xC2C80001, 997, dtype=np.uint64).astype(np.uint32)
    edges = [0.0, -0.0, 1e-45, -1e-45, -1e-39, 3.0, -87.0, -87.5, -88.0, -1e30, 3e38]
    x = torch.from_numpy(negatives.view(np.float32))
    x = torch.cat([x, torch.linspace(-1, 1, 20001), torch.tensor(edges)])
    expected = torch.where(x > 0, x.double(), torch.expm1(x.double()))
    before = x.clone()
    y = native.elu(x, inplace=True) if inplace else native.elu(x)
    assert (y.data_ptr() == x.data_ptr()) == inplace
    assert_within(y, expected, rounding.EXP_ULPS * rounding.unit_roundoff() * expected.abs())
    assert torch.equal(y[x > 0], x[x > 0])  # exact where positive
    special = native.elu(torch.tensor([torch.inf, -torch.inf, torch.nan, -torch.nan]))
    assert special[:2].tolist() == [torch.inf, -1.0] and special[2:].isnan().all()
    if not inplace:
        assert torch.equal(x, before)


@pytest.mark.parametrize("env", [{"CC": "false"}, {"CC": "/nonexistent/cc"}, {"MIMI_NATIVE": "0"}])
def test_without_the_kernel_one_frame_calls_keep_torch_routes(fresh_build, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert native.library() is None and native.pack(torch.randn(64, 64)) is None
    assert not list(fresh_build.glob("*.so"))
    large, small = Linear(1024, 512), Linear(24, 40)
    x = torch.randn(2, 1024)
    with torch.inference_mode():
        assert_product(large(x), x, large.weight, large.bias)
        small(torch.randn(2, 24))
    assert large.weight.numel() >= PACK_MIN_VALUES and isinstance(large.packed, onednn.PackedRows)
    assert small.packed is None  # the BLAS's W @ xᵀ


@needs_compiler
def test_processes_building_at_once_both_get_a_whole_library(tmp_path):
    env = {**os.environ, CACHE_ENV: str(tmp_path)}
    code = "from mimi_cli.model import native; assert native.library() is not None"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert len(list((tmp_path / "kernels").glob("one_frame-*.so"))) == 1
    assert not list((tmp_path / "kernels").glob(".one_frame-*"))


@needs_compiler
def test_rows_times_blocks_with_a_gain_and_a_residual():
    weight, rows, bias, gain = torch.randn(40, 24), torch.randn(2, 24), torch.randn(40), torch.randn(40)
    residual = torch.randn(2, 40)
    got = native.pack(weight).times_rows(rows, bias, gain, residual)
    exact = residual.double() + gain.double() * (rows.double() @ weight.double().T + bias.double())
    assert_within(got, exact, rounding.product_bound(rows, weight, bias, gain, residual))


@needs_compiler
@pytest.mark.parametrize("num_past", [0, 3, 9])
def test_rope_attention_equals_rope_then_window_attention(num_past):
    from mimi_cli.model.transformer import apply_rope, rope_tables

    heads, dim, steps, window = 3, 16, 2, 6
    generator = torch.Generator().manual_seed(num_past)
    qkv = torch.randn(steps, 3 * heads * dim, generator=generator)
    kept = torch.randn(2, 1, heads, num_past, dim, generator=generator)
    buffer = torch.zeros(2, 1, heads, num_past + steps + 5, dim)
    buffer[..., :num_past, :] = kept
    cos, sin = rope_tables(torch.arange(num_past, num_past + steps), dim, 10_000.0, torch.float32)
    got = native.rope_attention(
        qkv,
        cos,
        sin,
        buffer[0, :, :, : num_past + steps],
        buffer[1, :, :, : num_past + steps],
        num_past,
        window,
    )

    # exact: the rotation and the attention in float64; a rotated value a·c ∓ b·s has two roundings,
    # so it is within γ₂ · (|a·c| + |b·s|), the size its scores' bound is taken from
    q, k, v = (t.view(1, steps, heads, dim).transpose(1, 2) for t in qkv.view(steps, 3, -1).unbind(1))
    cos64, sin64 = cos.double(), sin.double()
    q_exact, k_exact = apply_rope(q.double(), cos64, sin64), apply_rope(k.double(), cos64, sin64)
    q_size, k_size = (_rotation_size(t.double(), cos64, sin64) for t in (q, k))
    keys = torch.cat([kept[0].double(), k_exact], dim=2)
    keys_size = torch.cat([kept[0].double().abs(), k_size], dim=2)
    values = torch.cat([kept[1], v], dim=2)
    position = torch.arange(steps)[:, None] + num_past - torch.arange(num_past + steps)[None, :]
    mask = (position >= 0) & (position < window)
    exact = F.scaled_dot_product_attention(q_exact, keys, values.double(), attn_mask=mask)
    bound = rounding.attention_bound(q_exact, keys, values, mask, dim**-0.5, (q_size, keys_size, 2))
    assert_within(got, exact.transpose(1, 2).reshape(steps, -1), bound.transpose(1, 2).reshape(steps, -1))
    assert_within(buffer[0, :, :, : num_past + steps], keys, rounding.gamma(2) * keys_size)  # written
    assert torch.equal(buffer[1, :, :, : num_past + steps], values)


def _rotation_size(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """|x·cos| + |rotated x · sin|: the sum of magnitudes behind each value `apply_rope` gives."""
    half = x.shape[-1] // 2
    return (x * cos).abs() + (torch.cat([x[..., half:], x[..., :half]], dim=-1) * sin).abs()


@needs_compiler
def test_streamed_frames_take_the_fused_layer(monkeypatch):
    """Two-step calls run each layer as products, one RoPE-attention call and two norms; the
    result equals the whole-input pass."""
    from mimi_cli.config import MimiConfig
    from mimi_cli.model.stream import Stream
    from mimi_cli.model.transformer import Transformer

    config = MimiConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, sliding_window=5
    )
    model = Transformer(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)
    routes.chosen()  # (timed once per machine, before calls are counted)
    calls = []
    fused = native.rope_attention
    monkeypatch.setattr(native, "rope_attention", lambda *a: calls.append(a[5]) or fused(*a))
    x = torch.randn(1, 24, 64)
    stream = Stream()
    with torch.inference_mode():
        expected = model(x)
        streamed = torch.cat([model(x[:, i : i + 2], stream) for i in range(0, 24, 2)], dim=1)
    twin = copy.deepcopy(model).double()
    bound = rounding_error_bound(lambda: twin(x.double()), [expected, streamed])
    bound.check(expected, "one pass")  # each within the whole network's rounding bound (propagation.py)
    bound.check(streamed, "fused frames")
    assert calls == [min(i, 4) for i in range(0, 24, 2) for _ in range(2)]  # keys kept: up to window - 1


@needs_compiler
def test_one_row_residual_quantization_is_one_call_and_equals_the_whole_pass(monkeypatch):
    from mimi_cli.config import MimiConfig
    from mimi_cli.model.quantizer import ResidualVectorQuantizer

    config = MimiConfig(hidden_size=48, codebook_dim=16, codebook_size=64)
    quantizer = ResidualVectorQuantizer(config, 6)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        quantizer.input_proj.weight.copy_(torch.randn(quantizer.input_proj.weight.shape, generator=generator))
        for layer in quantizer.layers:
            layer.codebook.embed_sum.copy_(torch.randn(64, 16, generator=generator) * 3)
            layer.codebook.cluster_usage.uniform_(0.5, 2.0, generator=generator)
            layer.codebook.prepare()
    latents = torch.randn(1, 50, 48, generator=generator)
    calls = []
    fused = native.residual_codes
    monkeypatch.setattr(native, "residual_codes", lambda *a: calls.append(len(a[1])) or fused(*a))
    with torch.inference_mode():
        whole = quantizer.encode(latents, 5)
        assert calls == []  # 50 rows: torch's path
        one_by_one = torch.cat([quantizer.encode(latents[:, i : i + 1], 5) for i in range(50)], dim=2)
    assert calls == [5] * 50
    assert torch.equal(one_by_one, whole)
    assert whole.unique().numel() > 30  # the check means something


def test_large_blocks_are_asked_for_huge_pages(monkeypatch):
    """Whole 2 MiB pieces of the blocks are aligned and given to `madvise(MADV_HUGEPAGE)`; the tail is
    not rounded up."""
    calls = []

    class Recorder:
        def madvise(self, address, size, advice):
            calls.append((address, size, advice))
            return 0

    monkeypatch.setattr(native, "_LIBC", Recorder())
    weight = torch.randn(2048 + 32, 512)  # 4 MiB and one block of 64 KiB more
    blocks = native._blocks(weight, 32).blocks
    assert calls == [(blocks.data_ptr(), 4 << 20, 14)] and blocks.data_ptr() % (2 << 20) == 0
    assert torch.equal(blocks[-1, :, 0], weight[-32])  # the last block, on plain pages, is whole
    calls.clear()
    native._blocks(torch.randn(64, 512), 32)  # 128 KiB: no whole huge page
    assert calls == []


@needs_compiler
@pytest.mark.parametrize("threads", [2, 3, 4])
@pytest.mark.parametrize("rows", [1, 2, 5])
def test_products_shared_by_threads_equal_one_thread_bit_for_bit(threads, rows):
    """Each block is computed by the same code whichever thread claims it, so sharing a product
    changes no bit; many calls in a row give the helpers every chance to race on a job."""
    generator = torch.Generator().manual_seed(threads * 10 + rows)
    weights = [torch.randn(out, 96, generator=generator) for out in (40, 130, 1000)]  # 2, 5, 32 blocks
    inputs = [torch.randn(rows, 96, generator=generator) for _ in range(50)]
    packed = [native.pack(w) for w in weights]
    bias, gain = torch.randn(1000, generator=generator), torch.randn(1000, generator=generator)
    try:
        native.set_threads(1)
        alone = [
            p.times_rows(x, bias[: p.out_features], gain[: p.out_features]) for x in inputs for p in packed
        ]
        native.set_threads(threads, spin_us=50)
        for _ in range(4):  # helpers awake (spinning), then some asleep between rounds
            shared = [
                p.times_rows(x, bias[: p.out_features], gain[: p.out_features])
                for x in inputs
                for p in packed
            ]
            assert all(torch.equal(a, s) for a, s in zip(alone, shared, strict=True))
    finally:
        native.set_threads(1)


@needs_compiler
def test_two_callers_at_once_while_products_are_shared():
    """A second thread calling the kernel while the first holds the helpers computes alone: both right."""
    import threading

    weight = torch.randn(2048, 512)
    packed, xs = native.pack(weight), [torch.randn(2, 512) for _ in range(2)]
    expected = [packed.times_rows(x, None) for x in xs]
    failures = []

    def call(x, want):
        for _ in range(200):
            if not torch.equal(packed.times_rows(x, None), want):
                failures.append(1)

    try:
        native.set_threads(2, spin_us=50)
        callers = [threading.Thread(target=call, args=pair) for pair in zip(xs, expected, strict=True)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(timeout=120)
        assert not any(caller.is_alive() for caller in callers) and not failures
    finally:
        native.set_threads(1)


@needs_compiler
def test_a_forked_child_computes_without_its_parents_helpers():
    """fork copies no thread: a child of a process whose products were shared computes them alone
    (no wait for a helper that is not there, no lock held by one)."""
    import multiprocessing

    weight, x = torch.randn(1000, 64), torch.randn(2, 64)
    packed = native.pack(weight)
    try:
        native.set_threads(2, spin_us=0)  # helpers asleep on the lock's condition
        expected = packed.times_rows(x, None)
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        child = context.Process(target=lambda: results.put(packed.times_rows(x, None).tolist()))
        child.start()
        child.join(timeout=60)
        assert child.exitcode == 0, "the child hung or failed"
        assert torch.equal(torch.tensor(results.get(timeout=5)), expected)
    finally:
        native.set_threads(1)


@needs_compiler
@pytest.mark.parametrize("threads", [0, 17])
def test_a_thread_count_the_kernel_cannot_run_is_refused(threads):
    with pytest.raises(ValueError, match="threads"):
        native.set_threads(threads)


@needs_compiler
def test_products_computed_alone_while_sharing_is_off_equal_shared_ones():
    weight, x = torch.randn(1000, 64), torch.randn(2, 64)
    packed = native.pack(weight)
    try:
        native.set_threads(2, spin_us=50)
        shared = packed.times_rows(x, None)
        native.set_sharing(False)
        assert torch.equal(packed.times_rows(x, None), shared)
    finally:
        native.set_sharing(True)
        native.set_threads(1)
