"""Building blocks of the model checked against direct definitions on small inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from bounds import assert_attention, assert_convolution, assert_product
from propagation import rounding_error_bound

from mimi_cli.config import MimiConfig
from mimi_cli.model import conv as conv_module
from mimi_cli.model import native, onednn
from mimi_cli.model import quantizer as quantizer_module
from mimi_cli.model.conv import CausalConv1d, CausalConvTranspose1d
from mimi_cli.model.linear import PACK_MIN_VALUES, Linear, weight_times_rows
from mimi_cli.model.quantizer import Codebook
from mimi_cli.model.stream import Stream
from mimi_cli.model.transformer import Transformer, sliding_window_attention


def _window_mask(steps: int, keys: int, window: int, num_past: int) -> torch.Tensor:
    """Query i (absolute num_past + i) sees keys j with 0 ≤ (num_past + i) - j < window."""
    position = torch.arange(steps)[:, None] + num_past - torch.arange(keys)[None, :]
    return (position >= 0) & (position < window)


def _padded(conv: torch.nn.Conv1d, left: int, right: int, mode: str = "constant"):
    """`conv` (its stride, dilation and groups) of x padded causally, as a function of (x, weight, bias)."""
    return lambda x, weight, bias: F.conv1d(
        F.pad(x, (left, right), mode=mode), weight, bias, conv.stride, 0, conv.dilation, conv.groups
    )


def _transposed(conv: torch.nn.ConvTranspose1d, trim: int):
    """`conv` (its stride and groups), the tail cut to `trim` steps, as a function of (x, weight, bias)."""
    return lambda x, weight, bias: F.conv_transpose1d(x, weight, bias, conv.stride, groups=conv.groups)[
        ..., :trim
    ]


@pytest.mark.parametrize("steps", [1, 7, 30, 61])
@pytest.mark.parametrize("num_past", [0, 3, 9])
@pytest.mark.parametrize("block", [None, 4, 16])
def test_block_attention_equals_masked_attention(steps, num_past, block):
    window = 10
    gen = torch.Generator().manual_seed(steps * 100 + num_past)
    q = torch.randn(2, 3, steps, 8, generator=gen)
    k = torch.randn(2, 3, num_past + steps, 8, generator=gen)
    v = torch.randn(2, 3, num_past + steps, 8, generator=gen)
    out = sliding_window_attention(q, k, v, window, num_past, block)
    assert_attention(out, q, k, v, _window_mask(steps, num_past + steps, window, num_past))


@pytest.mark.parametrize("stride, groups", [(2, 1), (4, 1), (2, 6)])
def test_transposed_conv_equals_torch_trimmed(stride, groups):
    layer = CausalConvTranspose1d(6, 6, 2 * stride, stride, groups=groups)
    with torch.no_grad():
        layer.conv.weight.normal_()
        layer.conv.bias.normal_()
    x = torch.randn(2, 6, 11)
    with torch.inference_mode():
        out = layer(x.transpose(1, 2))  # time-major in and out
    # torch's transposed conv, tail trimmed; each output sums 6 / groups channels of 2 taps
    transposed = _transposed(layer.conv, trim=11 * stride)
    assert_convolution(out.transpose(1, 2), transposed, x, layer.conv.weight, layer.conv.bias, 12 // groups)


@pytest.mark.parametrize(
    "stride, kernel, dilation, mode",
    [(1, 7, 1, "constant"), (1, 3, 2, "constant"), (4, 8, 1, "constant"), (2, 4, 1, "replicate")],
)
@pytest.mark.parametrize("length", [1, 5, 16, 23])
def test_causal_conv_equals_padded_torch_conv(stride, kernel, dilation, mode, length):
    layer = CausalConv1d(3, 5, kernel, stride, dilation=dilation, pad_mode=mode)
    x = torch.randn(2, 3, length)
    left = (kernel - 1) * dilation + 1 - stride
    right = -length % stride
    with torch.inference_mode():
        out = layer(x.transpose(1, 2)).transpose(1, 2)  # time-major in and out
    assert out.shape[-1] == -(-length // stride)
    padded = _padded(layer.conv, left, right, mode)
    assert_convolution(out, padded, x, layer.conv.weight, layer.conv.bias, 3 * kernel)


@pytest.mark.parametrize("shape", [(1, 2), (2, 1), (2,), (1, 1), (1, 3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("features", [(24, 40), (1024, 512), (1023, 513)])
def test_one_frame_linear_equals_nn_linear(shape, bias, features):
    layer = Linear(*features, bias=bias)
    assert set(layer.state_dict()) == set(torch.nn.Linear(*features, bias=bias).state_dict())
    x = torch.randn(*shape, features[0])
    with torch.inference_mode():
        out = layer(x)
    assert out.shape == (*shape, features[1]) and out.is_contiguous()
    assert_product(out, x, layer.weight, layer.bias)
    two_rows = x.numel() == 2 * features[0]
    assert (layer.packed is not None) == two_rows  # the C kernel's blocks, at every size
    assert not two_rows or isinstance(layer.packed, native.PackedBlocks) or native.library() is None


@pytest.mark.parametrize("features", [(24, 40), (1024, 512), (1023, 513)])
def test_two_row_linear_without_the_c_kernel_reads_large_weights_through_onednn(monkeypatch, features):
    monkeypatch.setattr(native, "pack", lambda weight: None)
    layer = Linear(*features)
    x = torch.randn(2, features[0])
    with torch.inference_mode():
        out = layer(x)
    assert_product(out, x, layer.weight, layer.bias)
    large = layer.weight.numel() >= PACK_MIN_VALUES
    assert isinstance(layer.packed, onednn.PackedRows) if large else layer.packed is None


def test_two_row_linear_without_onednn_takes_the_blas_product(monkeypatch):
    monkeypatch.setattr(onednn, "usable", lambda: False)
    monkeypatch.setattr(native, "pack", lambda weight: None)
    layer = Linear(1024, 512)
    x = torch.randn(2, 1024)
    with torch.inference_mode():
        out = layer(x)
    assert layer.packed is None
    assert_product(out, x, layer.weight, layer.bias)


def _conv2d_forbidden(*args, **kwargs):
    raise AssertionError("a CPU float32 convolution must run on its oneDNN-packed kernel, not F.conv2d")


@pytest.mark.parametrize(
    "channels, kernel, stride, length",
    [(6, 8, 4, 8), (6, 3, 1, 2), (6, 16, 8, 9), (6, 1, 1, 2), (64, 16, 8, 9), (6, 7, 1, 300)],
)
def test_cpu_conv_runs_on_a_packed_kernel(monkeypatch, channels, kernel, stride, length):
    assert onednn.usable()  # (checked against F.conv2d once, before it is forbidden below)
    layer = CausalConv1d(channels, 5, kernel, stride)
    x = torch.randn(1, channels, length)
    padded = _padded(layer.conv, kernel - stride, -length % stride)
    monkeypatch.setattr(conv_module.F, "conv2d", _conv2d_forbidden)
    with torch.inference_mode():
        out = layer(x.transpose(1, 2)).transpose(1, 2)
    monkeypatch.undo()
    assert_convolution(out, padded, x, layer.conv.weight, layer.conv.bias, channels * kernel)
    assert layer.packed is not None and layer.packed.is_mkldnn
    assert layer.kernel.numel() == 0  # the channels-last copy was given up for the packed one


@pytest.mark.parametrize("channels, length", [(6, 2), (512, 2), (6, 40)])
def test_cpu_transposed_conv_runs_on_a_packed_kernel(monkeypatch, channels, length):
    assert onednn.usable()
    layer = CausalConvTranspose1d(channels, 4, 8, 4)
    x = torch.randn(1, channels, length)
    monkeypatch.setattr(conv_module.F, "conv2d", _conv2d_forbidden)
    with torch.inference_mode():
        out = layer(x.transpose(1, 2)).transpose(1, 2)
    monkeypatch.undo()
    assert_convolution(
        out, _transposed(layer.conv, 4 * length), x, layer.conv.weight, layer.conv.bias, channels * 2
    )
    assert layer.packed is not None


@pytest.mark.parametrize("transposed", [False, True])
def test_few_outputs_of_a_large_kernel_are_rows_times_the_kernel(monkeypatch, transposed):
    """A one-frame call (≤ ROWS_MAX_OUTPUTS outputs, kernel ≥ ROWS_MIN_VALUES) reads the kernel once
    through the C kernel; a longer call then takes oneDNN, and `drop_derived` forgets both."""
    if native.library() is None:
        pytest.skip("no C kernel on this machine (no compiler): covered by the oneDNN tests")
    assert onednn.usable()  # (checked against F.conv2d once, before it is forbidden below)
    if transposed:
        layer, length = CausalConvTranspose1d(512, 64, 16, 8), 3  # polyphase kernel [8 · 64, 512, 2]
    else:
        layer, length = CausalConv1d(512, 64, 16, 8), 24  # two outputs of an 8-step first window
    assert layer.conv.weight.numel() >= conv_module.ROWS_MIN_VALUES
    x = torch.randn(1, 512, length + 40)
    if transposed:  # 2 taps of 512 channels per output
        convolve = _transposed(layer.conv, 8 * x.shape[-1])
    else:
        convolve = _padded(layer.conv, 16 - 8, -x.shape[-1] % 8)
    monkeypatch.setattr(conv_module.F, "conv2d", _conv2d_forbidden)
    stream = Stream()
    with torch.inference_mode():
        first = layer(x[..., :length].transpose(1, 2), stream)
        assert layer.packed_rows is not None and layer.packed is None and layer.kernel.numel() == 0
        rest = layer(x[..., length:].transpose(1, 2), stream)  # many outputs: oneDNN
        assert layer.packed is not None
    out = torch.cat([first, rest], dim=1).transpose(1, 2)
    monkeypatch.undo()
    assert_convolution(out, convolve, x, layer.conv.weight, layer.conv.bias, 512 * (2 if transposed else 16))
    layer.drop_derived()
    assert layer.packed_rows is None and layer.packed is None


def test_few_outputs_without_the_c_kernel_take_onednn(monkeypatch):
    monkeypatch.setattr(native, "library", lambda: None)
    layer = CausalConv1d(512, 64, 16, 8)
    x = torch.randn(1, 512, 24)
    with torch.inference_mode():
        out = layer(x.transpose(1, 2)).transpose(1, 2)
    assert_convolution(out, _padded(layer.conv, 8, 0), x, layer.conv.weight, layer.conv.bias, 512 * 16)
    assert layer.packed_rows is None and (layer.packed is not None or not onednn.usable())


def test_without_onednn_convs_fall_back_to_torch(monkeypatch):
    monkeypatch.setattr(onednn, "usable", lambda: False)
    layer, transposed = CausalConv1d(6, 5, 4, 2), CausalConvTranspose1d(5, 3, 4, 2)
    x = torch.randn(1, 6, 20)
    with torch.inference_mode():
        middle = layer(x.transpose(1, 2))
        out = transposed(middle).transpose(1, 2)
    middle = middle.transpose(1, 2)
    assert_convolution(middle, _padded(layer.conv, 2, 0), x, layer.conv.weight, layer.conv.bias, 6 * 4)
    convolve = _transposed(transposed.conv, 20)
    assert_convolution(out, convolve, middle, transposed.conv.weight, transposed.conv.bias, 5 * 2)
    assert layer.packed is None and transposed.packed is None and layer.kernel.numel() > 0


def test_used_layers_copy_without_their_packed_kernels():
    layer = CausalConv1d(6, 5, 3)
    x = torch.randn(1, 12, 6)
    with torch.inference_mode():
        out = layer(x)
        assert layer.packed is not None
        twin = copy.deepcopy(layer)  # an opaque oneDNN tensor can't be copied: it is derived again
        assert twin.packed is None
        torch.testing.assert_close(twin(x), out, rtol=0, atol=0)
        projection = Linear(1024, 512)
        rows = torch.randn(2, 1024)
        projected = projection(rows)
        assert projection.packed is not None
        projection_twin = copy.deepcopy(projection)
        assert projection_twin.packed is None
        torch.testing.assert_close(projection_twin(rows), projected, rtol=0, atol=0)


def test_one_row_quantizer_call_takes_the_two_row_product(monkeypatch):
    codebook = Codebook(64, 16)
    with torch.no_grad():
        codebook.embed_sum.normal_()
        codebook.cluster_usage.uniform_(0.5, 2.0)
    codebook.prepare()  # centroids are derived from the sums on first use
    rows = torch.randn(40, 16)
    whole = codebook.nearest(rows)
    calls = []

    def counted(weight, x, bias):
        calls.append(x.shape)
        return weight_times_rows(weight, x, bias)

    monkeypatch.setattr(quantizer_module, "weight_times_rows", counted)
    one_by_one = torch.cat([codebook.nearest(rows[i : i + 1]) for i in range(rows.shape[0])])
    assert calls == [(2, 18)] * rows.shape[0]
    assert torch.equal(one_by_one, whole)
    assert whole.unique().numel() > 10  # the check means something


def test_prepare_forgets_what_one_frame_calls_derived(tiny_weights):
    """Weights changed after a one-frame run must not leave stale derived copies in use."""
    from mimi_cli import load_model
    from mimi_cli.model import StreamingDecoder, StreamingEncoder

    model = load_model(tiny_weights)
    codes = StreamingEncoder(model, 8).push(torch.randn(1, 1, 1920) * 0.1)
    StreamingDecoder(model).push(codes)

    def made() -> list[str]:
        kernels = [n for n, b in model.named_buffers() if n.endswith(".kernel") and b.numel()]
        packed = [
            f"{n}.{name}"
            for n, m in model.named_modules()
            for name in ("packed", "packed_qkv", "packed_rows", "packed_table")
            if getattr(m, name, None) is not None
        ]
        return kernels + packed

    names = made()
    assert all(any(n.endswith(kind) for n in names) for kind in ("qkv", ".packed", "_table"))
    model.prepare()
    assert made() == []


def test_transformer_streamed_in_uneven_calls_equals_one_pass():
    config = MimiConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, sliding_window=6
    )
    torch.manual_seed(0)
    model = Transformer(config).eval()
    x = torch.randn(1, 80, 32)
    sizes = [1, 2, 2, 7, 1, 13, 2, 2, 2, 2, 2, 2, 30, 2, 2, 2, 2, 2, 2]
    assert sum(sizes) == x.shape[1]
    stream, outputs, buffers = Stream(), [], set()
    attention = model.layers[0].self_attn
    with torch.inference_mode():
        expected = model(x)
        start = 0
        for size in sizes:
            outputs.append(model(x[:, start : start + size], stream))
            start += size
            if start > 70:  # steady two-step calls write into the same buffer: no copy of the window
                buffers.add(stream.state(attention, lambda: None).buffer.data_ptr())
    streamed = torch.cat(outputs, dim=1)
    twin = copy.deepcopy(model).double()
    bound = rounding_error_bound(lambda: twin(x.double()), [expected, streamed])
    bound.check(expected, "one pass")  # each within the whole network's rounding bound (propagation.py)
    bound.check(streamed, "streamed")
    assert len(buffers) == 1
    assert attention.packed_qkv is not None  # two-step calls took the stacked projection


def test_half_precision_plumbing_keeps_the_quantizer_in_float32(tiny_weights):
    """bfloat16 is offered on CUDA only; the same code path runs on CPU here to check the casts."""
    from mimi_cli import load_model

    model = load_model(tiny_weights).to_runtime(torch.device("cpu"), torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 for b in model.quantizer.buffers())
    assert all(p.dtype == torch.float32 for p in model.quantizer.parameters())
    audio = torch.randn(1, 1, 24_000) * 0.1
    codes = model.encode(audio, 8)
    assert codes.dtype == torch.long and codes.shape == (1, 8, 13)
    decoded = model.decode(codes, 24_000)
    assert decoded.dtype == torch.bfloat16 and decoded.shape == (1, 1, 24_000)
    assert torch.isfinite(decoded.float()).all()


def test_half_precision_is_refused_on_cpu():
    from mimi_cli.device import resolve_device, resolve_dtype

    with pytest.raises(ValueError, match="only supported on CUDA"):
        resolve_dtype("bfloat16", resolve_device("cpu"))
    assert resolve_dtype(None, resolve_device("cpu")) == torch.float32
