"""The CUDA path (marker `cuda`, `make test-gpu`): parity with the CPU, TF32 and half precision against
float32, streaming, the CLI, no host–device synchronisation in the chunk loops, ragged batches.

Skipped where no CUDA device is visible, so the default suite stays CPU-only. Full-size random weights
(`full_weights`) run the released model's arithmetic; `make test-gpu` runs with `-s` so that the
measured agreement figures are printed beside the thresholds they are checked against.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from propagation import ErrorBound, check_decodes
from signals import speech_like

from mimi_cli import load_model
from mimi_cli.batch import encode_batch, plan
from mimi_cli.codec import decode_file, encode_file, whole_frames
from mimi_cli.container import read_codes
from mimi_cli.device import set_tf32, to_device
from mimi_cli.model import StreamingDecoder, StreamingEncoder

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; none is visible"),
]

SECONDS = 61.0  # past the 40 s model chunk and the 10 s attention window
CODEBOOKS = 32
MIN_EQUAL_CODES = 0.999  # CUDA float32 (TF32 off) against CPU float32: near-ties may flip a few
# Decoded audio in IEEE float32 (TF32 off: `_ieee_float32`), on any device, route or chunking, is checked
# against the whole network's rounding bound of the exact decode (tests/propagation.py, computed on the
# CPU in float64 by `check_decodes`): any evaluation of the same operations whose sums are sums of the
# products in any order (cuBLAS, cuDNN's GEMM-type convolutions, PyTorch's own CUDA kernels) is within
# it, so two routes are within twice it of each other. With TF32 on the products would round their
# inputs to 11 bits (u = 2⁻¹¹, not 2⁻²⁴): the faster settings are judged by SNR below, not by this bound.
# cuDNN's FFT and Winograd convolutions are not sums of the products and have no such bound, so the
# decode also runs with cuDNN off (PyTorch's CUDA convolutions: im2col and cuBLAS products), which the
# argument covers whatever cuDNN would pick; a failure of the cuDNN route alone means cuDNN took one of
# those algorithms for some shape, and is to be answered with a bound for it, not a wider tolerance.
# A near-tie that flips one code changes the residual of every later codebook of its frame, so one
# rounding difference costs up to 31 codes: runs compared at equal precision are judged by frames too.
MAX_FRAMES_DIFFERING = 0.01  # share of frames (at least 1 allowed)

# Agreement of each faster setting with CUDA float32 (TF32 off), on the 61 s signal and 32 codebooks:
#   (least share of codes equal to float32's, least SNR in dB of decoding float32's codes in that setting)
# Measured on an H100 (torch 2.11, CUDA 13.0), full-size random weights: tf32 90.3 % and 61.5 dB,
# float16 91.8 % and 57.7 dB, bfloat16 54.6 % and 39.4 dB (README, "Which dtype"). The bounds sit a
# margin below, well above what a broken path gives (garbage codes agree ~0.05 %; NaN gives no SNR).
DTYPE_THRESHOLDS: dict[str, tuple[float, float]] = {
    "tf32": (0.85, 55.0),
    "float16": (0.85, 50.0),
    "bfloat16": (0.45, 33.0),
}
DTYPE_OF = {"tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 on or off for the block; torch's flags restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    set_tf32(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def without_cudnn() -> Iterator[None]:
    """PyTorch's own CUDA convolutions for the block (cuDNN off; its other flags, TF32's too, untouched:
    `torch.backends.cudnn.flags` would set them all, allow_tf32=True included)."""
    saved = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = saved


@contextlib.contextmanager
def sync_debug(mode: str) -> Iterator[None]:
    """torch.cuda.set_sync_debug_mode for the block: "error" raises at any host–device synchronisation."""
    saved = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(saved)


def equal_share(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{list(a.shape)} != {list(b.shape)}"
    return (a.cpu() == b.cpu()).float().mean().item()


def differing_frames(a: torch.Tensor, b: torch.Tensor) -> int:
    """Frames of codes [B, K, F] where any codebook differs."""
    assert a.shape == b.shape, f"{list(a.shape)} != {list(b.shape)}"
    return int((a.cpu() != b.cpu()).any(dim=1).sum())


def assert_same_frames(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    frames = a.shape[0] * a.shape[-1]
    differing = differing_frames(a, b)
    allowed = max(1, MAX_FRAMES_DIFFERING * frames)
    assert differing <= allowed, f"{what}: {differing} of {frames} frames differ"


def _ratio(bound: ErrorBound, route: torch.Tensor) -> float:
    """The largest |error| / bound of a decode at the positions `bound` holds (for the printed figures)."""
    error = (route.detach().double().cpu().flatten()[bound.positions] - bound.exact).abs()
    return float((error / bound.bound).max())


def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    reference, other = reference.double().cpu(), other.double().cpu()
    noise = (reference - other).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(reference.pow(2).sum().item() / noise)


def cuda_model(weights: Path, setting: str = "float32"):
    """The model on CUDA in `setting` (float32, tf32, bfloat16, float16); TF32 is switched by callers."""
    return load_model(weights, device="cuda", dtype=DTYPE_OF.get(setting, torch.float32))


@pytest.fixture(scope="module", autouse=True)
def _ieee_float32() -> Iterator[None]:
    """float32 means IEEE float32 in this module (PyTorch lets cuDNN use TF32 by default)."""
    with tf32(False):
        yield


@pytest.fixture(scope="module")
def audio() -> torch.Tensor:
    return torch.from_numpy(speech_like(SECONDS))[None, None]  # [1, 1, T] at 24 kHz


@pytest.fixture(scope="module")
def cpu_model(full_weights):
    return load_model(full_weights, device="cpu")


@pytest.fixture(scope="module")
def cpu_reference(cpu_model, audio) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, decoded audio) of the CPU float32 model: the reference for everything here."""
    codes = cpu_model.encode(audio, CODEBOOKS)
    frames = -(-audio.shape[-1] // 1920)
    assert codes.shape == (1, CODEBOOKS, frames)
    assert codes[0, 0].unique().numel() > frames // 8  # codes vary: the comparisons mean something
    return codes, cpu_model.decode(codes)


@pytest.fixture(scope="module")
def gpu32(full_weights):
    return cuda_model(full_weights)


@pytest.fixture(scope="module")
def gpu32_reference(gpu32, audio) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, those codes decoded) of the CUDA float32 model, on the GPU."""
    codes = gpu32.encode(audio.cuda(), CODEBOOKS)
    return codes, gpu32.decode(codes)


# ---------------------------------------------------------------------------------------------- parity


def test_cuda_float32_matches_cpu(gpu32, gpu32_reference, cpu_model, cpu_reference):
    codes = gpu32_reference[0]
    decoded = gpu32.decode(cpu_reference[0].cuda())  # the same codes as the CPU decoded
    with without_cudnn():  # (see `check_decodes` above)
        without_cudnn_decoded = gpu32.decode(cpu_reference[0].cuda())
    assert gpu32.device.type == "cuda" and gpu32.dtype == torch.float32
    assert codes.device.type == "cuda" and codes.dtype == torch.long
    share = equal_share(codes, cpu_reference[0])
    frames = differing_frames(codes, cpu_reference[0])
    diff = (decoded.cpu() - cpu_reference[1]).abs().max().item()
    routes = {
        "CPU float32": cpu_reference[1],
        "CUDA float32": decoded,
        "CUDA without cuDNN": without_cudnn_decoded,
    }
    bound = check_decodes(cpu_model, cpu_reference[0], routes)
    print(
        f"\nCUDA float32 vs CPU float32: {share:.4%} codes equal ({frames} of {codes.shape[-1]} frames "
        f"differ), decoded max |diff| {diff:.2e}, "
        + ", ".join(
            f"{what} within {_ratio(bound, route):.3g} of the rounding bound"
            for what, route in routes.items()
        )
    )
    assert share >= MIN_EQUAL_CODES
    assert cpu_reference[1].abs().max() > 0.05  # a silent decoder would make the check vacuous


@pytest.mark.parametrize("setting", list(DTYPE_THRESHOLDS))
def test_faster_settings_against_float32(full_weights, setting, audio, gpu32_reference):
    min_share, min_snr = DTYPE_THRESHOLDS[setting]
    codes32, decoded32 = gpu32_reference
    with tf32(setting == "tf32"):
        model = cuda_model(full_weights, setting)
        assert model.dtype == DTYPE_OF[setting]
        assert all(b.dtype == torch.float32 for b in model.quantizer.buffers())  # centroids stay float32
        codes = model.encode(audio.cuda(), CODEBOOKS)
        decoded = model.decode(codes32)  # the float32 codes: the decoder's own precision only
    assert codes.dtype == torch.long
    share = equal_share(codes, codes32)
    first = equal_share(codes[:, :1], codes32[:, :1])
    snr = snr_db(decoded32, decoded.float())
    print(
        f"\n{setting}: {share:.2%} codes equal to float32 ({first:.2%} of codebook 0), "
        f"decoded SNR {snr:.1f} dB (thresholds {min_share:.0%}, {min_snr:g} dB)"
    )
    assert torch.isfinite(decoded.float()).all()
    assert share >= min_share
    assert snr >= min_snr


# ---------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("chunk", [1920, 7 * 24_000 + 1], ids=["one-frame", "7s-plus-one"])
def test_streaming_equals_one_pass_without_synchronising(gpu32, audio, gpu32_reference, cpu_model, chunk):
    """Chunk loops as the codec runs them (pinned host chunks, `to_device`) never wait for the GPU:
    torch raises at any synchronisation while sync debug mode is "error". Results leave the GPU after."""
    codes32, _ = gpu32_reference
    host = audio[0, 0].numpy()
    if chunk == 1920:
        host = host[: 50 * 1920]  # 4 s: 50 one-frame calls
    encoder = StreamingEncoder(gpu32, CODEBOOKS)
    with sync_debug("error"):
        pieces = [
            encoder.push(to_device(torch.from_numpy(host[i : i + chunk])[None, None], gpu32.device))
            for i in range(0, len(host), chunk)
        ]
        pieces.append(encoder.finish())
        streamed = torch.cat(pieces, dim=-1)
    assert streamed.device.type == "cuda"
    whole = codes32[..., : streamed.shape[-1]]
    assert streamed.shape[-1] == -(-len(host) // 1920)
    assert_same_frames(streamed, whole, "streamed codes")

    step = max(1, chunk // 1920)
    codes = whole.cpu().numpy()
    decoder = StreamingDecoder(gpu32)
    with sync_debug("error"):
        parts = [
            decoder.push(to_device(torch.from_numpy(codes[:, :, i : i + step]), gpu32.device))
            for i in range(0, codes.shape[-1], step)
        ]
        decoded = torch.cat(parts, dim=-1)
    one_pass = gpu32.decode(whole, chunk_frames=None)
    assert decoded.shape == one_pass.shape
    check_decodes(cpu_model, whole, {f"streamed in calls of {step} frames": decoded, "one pass": one_pass})


@pytest.mark.parametrize("setting", ["bfloat16", "float16"])
def test_half_precision_chunk_loop_does_not_synchronise(full_weights, setting):
    """The dtype casts (audio to half, latents to float32 for the quantizer and back) stay on the GPU."""
    model = cuda_model(full_weights, setting)
    host = speech_like(6.0)
    encoder, decoder = StreamingEncoder(model, 8), StreamingDecoder(model)
    with sync_debug("error"):
        codes = [
            encoder.push(to_device(torch.from_numpy(host[i : i + 24_000])[None, None], model.device))
            for i in range(0, len(host), 24_000)
        ]
        audio = [decoder.push(c) for c in codes]
    assert torch.cat(codes, dim=-1).shape == (1, 8, 75)
    assert torch.cat(audio, dim=-1).dtype == DTYPE_OF[setting]


def _synchronisations(run) -> int:
    """How many host–device synchronisations `run()` made (sync debug mode "warn" counts them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sync_debug("warn"):
            run()
    return sum("synchroniz" in str(w.message) for w in caught)


def test_codec_waits_for_the_gpu_once_per_chunk(gpu32, tmp_path):
    """encode_file / decode_file read each chunk's result back once (after queueing the next chunk,
    `_one_ahead`) and synchronise nowhere else: no blocking copies in the push loop."""
    src, packed, rec = tmp_path / "in.wav", tmp_path / "out.mimi", tmp_path / "rec.wav"
    sf.write(src, speech_like(SECONDS), 24_000, subtype="FLOAT")
    syncs = _synchronisations(lambda: encode_file(gpu32, src, packed, 8, chunk_seconds=10.0))
    chunks = math.ceil(SECONDS / 10.0)
    assert 1 <= syncs <= chunks + 1, f"{syncs} synchronisations for {chunks} chunks and the last frames"
    syncs = _synchronisations(lambda: decode_file(gpu32, packed, rec))
    assert 1 <= syncs <= chunks + 1, f"{syncs} synchronisations for {chunks} chunks"
    assert sf.info(rec).frames == int(SECONDS * 24_000)


# ---------------------------------------------------------------------------------------------- batches


def test_ragged_batch_gives_each_input_its_own_codes(gpu32, tmp_path):
    """Inputs of different lengths batched together (zero-padded to whole frames and to the longest)
    get the codes each gets alone: the model is causal and every input ends on a frame boundary."""
    lengths = [0.5, 3.07, 7.7, 12.0, 19.93]
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    signals = {}
    for i, seconds in enumerate(lengths):
        signals[f"clip{i}"] = speech_like(seconds, seed=i)
        sf.write(src / f"clip{i}.wav", signals[f"clip{i}"], 24_000, subtype="FLOAT")
    jobs = plan(src, out, ".mimi")
    report = encode_batch(gpu32, jobs, CODEBOOKS, workers=2, batch_size=len(lengths))
    assert report.count("done") == len(lengths)
    for name, signal in signals.items():
        with (out / f"{name}.mimi").open("rb") as f:
            _, batched = read_codes(f)
        alone = gpu32.encode(torch.from_numpy(whole_frames(signal))[None, None].cuda(), CODEBOOKS)
        assert batched.shape == (CODEBOOKS, -(-len(signal) // 1920))
        assert_same_frames(torch.from_numpy(batched)[None], alone, f"{name} batched vs alone")


# ---------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("setting", ["float32", "tf32", "bfloat16", "float16"])
def test_cli_end_to_end_on_cuda(full_weights, tmp_path, setting):
    src, packed, rec = tmp_path / "in.wav", tmp_path / "out.mimi", tmp_path / "rec.wav"
    seconds, rate = 5.0, 22_050
    sf.write(src, speech_like(seconds, rate), rate)
    common = ["--device", "cuda", "--dtype", setting, "--weights", str(full_weights), "--quiet"]
    mimi = [sys.executable, "-m", "mimi_cli"]
    for args in (["encode", src, packed, "-k", "16"], ["decode", packed, rec, "-r", "original"]):
        proc = subprocess.run([*mimi, *map(str, args), *common], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    with packed.open("rb") as f:
        codes = read_codes(f)[1]
    assert codes.shape == (16, -(-round(seconds * 24_000) // 1920))
    info = sf.info(rec)
    assert (info.samplerate, info.frames) == (rate, round(seconds * rate))
    decoded = sf.read(rec, dtype="float32")[0]
    assert np.isfinite(decoded).all() and np.abs(decoded).max() > 0.01
    if setting == "float32":  # IEEE float32 on CUDA gives the CPU's codes
        cpu_packed = tmp_path / "cpu.mimi"
        encode_file(load_model(full_weights, device="cpu"), src, cpu_packed, 16)
        with cpu_packed.open("rb") as f:
            expected = read_codes(f)[1]
        assert_same_frames(torch.from_numpy(codes)[None], torch.from_numpy(expected)[None], "CLI vs CPU")


@pytest.mark.parametrize("setting, expected", [("float32", False), ("tf32", True)])
def test_cli_sets_tf32_from_dtype(full_weights, setting, expected):
    from mimi_cli.cli.common import load_weights

    with tf32(not expected):
        model = load_weights(str(full_weights), "cuda", setting, quiet=True)
        assert model.dtype == torch.float32
        assert torch.backends.cuda.matmul.allow_tf32 is expected
        assert torch.backends.cudnn.allow_tf32 is expected
        assert torch.backends.cudnn.benchmark is (setting == "float32")  # configure_cuda
