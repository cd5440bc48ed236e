"""Live mode in real time: `mimi encode - - --live | mimi decode - - --live`, fed at real-time pace.

What it measures (random full-size weights, `--codebooks` 8 by default, everything under a temporary folder):
  1. Bulk reference, in this process with one thread and glibc tuned as the commands tune it: encode
     and decode of `--bulk-seconds` of audio in one call each, as ms per 80 ms frame. Measured before
     and after the live run (same machine state as the pipeline, as nearly as a shared machine
     allows); the ratios use their mean.
  2. The pipeline: a writer thread feeds 24 kHz speech-like raw PCM into the encoder one 1920-sample
     frame every 80 ms (paced on the clock, never ahead), the encoder's codes go straight into the
     decoder, and this process timestamps each frame's decoded samples as they arrive.
     - per-frame compute of encode and decode (median, p99, max, ms): the processes' own timing of
       each model call (`--json` summaries), over the whole run;
     - added latency: from the last sample of a frame entering the encoder to that frame's last
       decoded sample leaving the decoder (median, p99, max) — what live mode adds on top of the
       80 ms a frame takes to arrive;
     - keeping up: the median latency of the last minute minus that of the first (drift), and
       whether the run ended with no backlog.
The first frame is sent alone and its round trip awaited before the clock starts: that is start-up
(loading weights, warm-up), reported separately, not latency.

Run: `make bench-latency` (10 minutes) or `python benchmarks/latency.py --minutes 1`; `--smoke` checks the
script in seconds (a tiny model, 20 frames, 2 s of bulk audio).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from machine import describe, header, load_average  # noqa: E402  (benchmarks/, the script's folder)
from signals import speech_like  # noqa: E402
from weights_factory import TINY_CONFIG, random_state, write_hub_layout  # noqa: E402

from mimi_cli import load_model  # noqa: E402
from mimi_cli.allocator import keep_freed_memory  # noqa: E402
from mimi_cli.config import FRAME_SIZE, SAMPLE_RATE, MimiConfig  # noqa: E402
from mimi_cli.model import routes  # noqa: E402

FRAME_SECONDS = FRAME_SIZE / SAMPLE_RATE
FRAME_BYTES = FRAME_SIZE * 2  # s16le mono
TARGETS = {"median_ms": 20.0, "bulk_ratio": 3.0, "p99_ms": 40.0, "latency_p99_ms": 120.0}


def bulk_per_frame(model, codebooks: int, seconds: float) -> tuple[float, float]:
    """(encode, decode) ms per frame when `seconds` of audio go through the model in one call each."""
    audio = torch.from_numpy(speech_like(seconds, seed=7))[None, None]
    frames = -(-audio.shape[-1] // FRAME_SIZE)
    model.encode(audio[..., : 10 * FRAME_SIZE], codebooks)  # warm-up
    started = time.perf_counter()
    codes = model.encode(audio, codebooks)
    encode = (time.perf_counter() - started) / frames
    started = time.perf_counter()
    model.decode(codes)
    decode = (time.perf_counter() - started) / frames
    return encode * 1000, decode * 1000


def pcm16(audio: np.ndarray) -> bytes:
    return np.clip(np.rint(audio * 32768), -32768, 32767).astype("<i2").tobytes()


def run_pipeline(weights: Path, codebooks: int, frames: int) -> dict:
    mimi = Path(sys.executable).with_name("mimi")
    base = ["--live", "--raw", "--rate", str(SAMPLE_RATE), "-w", str(weights), "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    encoder = subprocess.Popen(
        [str(mimi), "encode", "-", "-", "-k", str(codebooks), *base],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    decoder = subprocess.Popen(
        [str(mimi), "decode", "-", "-", *base],
        stdin=encoder.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    encoder.stdout.close()  # the decoder holds it now
    source = speech_like(60.0, seed=11)
    sent = np.zeros(frames)
    received = np.zeros(frames)
    out_fd = decoder.stdout.fileno()
    got = 0

    def read_until(count: int) -> None:
        nonlocal got
        while got < count * FRAME_BYTES:
            part = os.read(out_fd, 1 << 16)
            if not part:
                raise RuntimeError(f"decoder output ended: {decoder.stderr.read().decode()[-500:]}")
            now = time.perf_counter()
            before, got = got, got + len(part)
            received[before // FRAME_BYTES : got // FRAME_BYTES] = now

    def frame(i: int) -> bytes:
        start = i * FRAME_SIZE % (len(source) - FRAME_SIZE)
        return pcm16(source[start : start + FRAME_SIZE])

    started = time.perf_counter()
    encoder.stdin.write(frame(0))
    encoder.stdin.flush()
    sent[0] = time.perf_counter()
    read_until(1)
    startup = time.perf_counter() - started

    def writer() -> None:
        clock = time.perf_counter()
        for i in range(1, frames):
            delay = clock + i * FRAME_SECONDS - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            encoder.stdin.write(frame(i))
            encoder.stdin.flush()
            sent[i] = time.perf_counter()
        encoder.stdin.close()

    thread = threading.Thread(target=writer)
    thread.start()
    read_until(frames)
    thread.join()
    tail = decoder.stdout.read()  # the end: nothing more than the whole frames
    encoder_err, decoder_err = encoder.stderr.read().decode(), decoder.stderr.read().decode()
    encoder.wait(timeout=120)
    decoder.wait(timeout=120)
    for name, proc, err in (("encoder", encoder, encoder_err), ("decoder", decoder, decoder_err)):
        if proc.returncode:
            raise RuntimeError(f"{name} exited {proc.returncode}: {err[-500:]}")
    latency = (received - sent)[1:] * 1000
    return {
        "startup_s": startup,
        "latency_ms": latency,
        "encode": _summary(encoder_err),
        "decode": _summary(decoder_err),
        "extra_bytes": len(tail),
    }


def _summary(stderr: str) -> dict:
    for line in reversed(stderr.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no --json summary in: {stderr[-500:]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the live run")
    parser.add_argument("--codebooks", type=int, default=8)
    parser.add_argument("--bulk-seconds", type=float, default=20.0)
    parser.add_argument("--smoke", action="store_true", help="tiny model, 20 frames: checks the script")
    args = parser.parse_args(argv)
    if args.smoke:
        args.minutes, args.bulk_seconds = 0.0, 2.0
    info = describe(args.smoke)
    config = TINY_CONFIG if args.smoke else MimiConfig()
    frames = max(20, round(args.minutes * 60 / FRAME_SECONDS))
    torch.set_num_threads(1)  # as each live process runs
    keep_freed_memory()  # as the commands do: the bulk reference runs as `mimi encode` would

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights"
        weights.mkdir()
        write_hub_layout(weights, config, random_state(config, seed=1234))
        model = load_model(weights)
        chosen = routes.chosen()  # timed here if not cached for this machine; the live processes read it
        bulk_before = bulk_per_frame(model, args.codebooks, args.bulk_seconds)
        result = run_pipeline(weights, args.codebooks, frames)
        bulk_after = bulk_per_frame(model, args.codebooks, args.bulk_seconds)
        if chosen.threads > 1:  # the same cores as a live process's products, for the second ratio
            torch.set_num_threads(chosen.threads)
            bulk_shared = bulk_per_frame(model, args.codebooks, args.bulk_seconds)
            torch.set_num_threads(1)
        info["load_after"] = load_average()

    bulk = [(a + b) / 2 for a, b in zip(bulk_before, bulk_after, strict=True)]
    latency = result["latency_ms"]
    minute = min(len(latency) // 2, round(60 / FRAME_SECONDS))
    drift = float(np.median(latency[-minute:]) - np.median(latency[:minute]))
    p = np.percentile
    print(header(info))
    print(f"one-frame routes (chosen by timing on this machine, cached): {chosen.describe()}")
    print(
        f"live run: {len(latency) + 1} frames ({(len(latency) + 1) * FRAME_SECONDS / 60:.1f} min), "
        f"{args.codebooks} codebooks, 1 model thread per process (the kernel's products on "
        f"{chosen.threads}); "
        f"start-up (weights, warm-up) {result['startup_s']:.1f} s"
    )
    print()
    print(f"{'per-frame compute, ms':<24}{'median':>8}{'p99':>8}{'max':>8}{'bulk':>8}{'× bulk':>8}")
    verdicts = []
    for name, stats, reference in (
        ("encode", result["encode"]["frame_ms"], bulk[0]),
        ("decode", result["decode"]["frame_ms"], bulk[1]),
    ):
        ratio = stats["median"] / reference
        print(
            f"{name:<24}{stats['median']:>8.1f}{stats['p99']:>8.1f}{stats['max']:>8.1f}"
            f"{reference:>8.1f}{ratio:>7.1f}×"
        )
        verdicts += [
            (f"{name} median ≤ {TARGETS['median_ms']:.0f} ms", stats["median"] <= TARGETS["median_ms"]),
            (f"{name} ≤ {TARGETS['bulk_ratio']:.0f}× bulk", ratio <= TARGETS["bulk_ratio"]),
            (f"{name} p99 ≤ {TARGETS['p99_ms']:.0f} ms", stats["p99"] <= TARGETS["p99_ms"]),
        ]
    for name in ("encode", "decode"):
        sharing = result[name].get("sharing")
        if sharing:
            print(
                f"({name}: products shared with the kernel's helpers in {sharing['shared_frames']:.0%} "
                f"of frames; latest ms/frame shared {sharing['shared_ms']}, alone {sharing['alone_ms']})"
            )
    print(
        f"(bulk: {args.bulk_seconds:g} s in one call, 1 thread; "
        f"before {bulk_before[0]:.1f}/{bulk_before[1]:.1f}, "
        f"after {bulk_after[0]:.1f}/{bulk_after[1]:.1f} ms/frame)"
    )
    if chosen.threads > 1:
        ratios = "/".join(
            f"{stats['frame_ms']['median'] / ref:.1f}×"
            for stats, ref in zip((result["encode"], result["decode"]), bulk_shared, strict=True)
        )
        print(
            f"(bulk on {chosen.threads} threads, as many as the live products use: "
            f"{bulk_shared[0]:.1f}/{bulk_shared[1]:.1f} ms/frame; live encode/decode median {ratios} that)"
        )
    print()
    print(
        f"added latency, ms: median {p(latency, 50):.1f}, p99 {p(latency, 99):.1f}, max {latency.max():.1f} "
        f"(beyond the 80 ms a frame takes to arrive)"
    )
    keeps_up = drift < 40 and latency[-1] < 500
    print(
        f"drift (median of the last minute − first minute): {drift:+.1f} ms; "
        f"last frame {latency[-1]:.1f} ms; {'keeps up' if keeps_up else 'FALLS BEHIND'}"
    )
    verdicts += [
        (f"latency p99 ≤ {TARGETS['latency_p99_ms']:.0f} ms", p(latency, 99) <= TARGETS["latency_p99_ms"]),
        ("no drift", keeps_up),
    ]
    print()
    print("targets: " + "; ".join(f"{what}: {'yes' if ok else 'NO'}" for what, ok in verdicts))
    print(
        f"median frame {statistics.median(latency):.1f} ms; the machine may be shared: compare ratios, not ms"
    )


if __name__ == "__main__":
    main()
