"""Encode/decode speed of mimi-cli against transformers' MimiModel, on CPU, with random full-size weights.

What it measures (one run, everything under a temporary directory):
  1. Model speed: `encode` (audio → codes, `--codebooks` of them, 16 by default) and `decode`
     (codes → audio) of a speech-like signal (60 s by default), for our model and for the reference
     `transformers.MimiModel`, loaded from the same randomised full-size weights. One warm-up call,
     then the median of `--repeats` calls, interleaved ours/theirs. Both decode the reference's codes.
  2. The real CLI end to end on a 5 s WAV: `python -m mimi_cli encode|decode` as subprocesses, median
     wall time, which includes interpreter start, imports and weight loading.

How to read it: "× real time" is seconds of audio processed per second of wall time (higher is faster;
above 1 keeps up with live audio). The ratio row is ours ÷ transformers, so above 1 means we are faster.
"codes differing" must stay near 0 (float near-ties in the nearest-centroid search may flip a few);
otherwise the two models are not doing the same work and the comparison means nothing.
Random weights run the same arithmetic as the released ones, so the timings transfer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from machine import cpu_model  # noqa: E402  (benchmarks/, the script's folder)
from signals import speech_like  # noqa: E402
from weights_factory import random_state, write_hub_layout  # noqa: E402

from mimi_cli import load_model  # noqa: E402
from mimi_cli.config import MimiConfig  # noqa: E402

SAMPLE_RATE = 24_000
CLI_SECONDS = 5.0
SEED = 1234
NOISY_SPREAD = 1.3  # slowest run above this × the fastest: something else was probably using the CPU


def timed(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Wall times (s) of `repeats` calls of each function after one untimed warm-up, and the last results.

    The calls are interleaved (a, b, a, b, ...) so that a burst of load from another process slows
    both contenders rather than whichever happened to be running.
    """
    results = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return times, results


def figures(times: list[float], seconds: float) -> dict[str, Any]:
    """Median seconds, × real time for `seconds` of audio, and every run (to judge the noise)."""
    median = statistics.median(times)
    return {"s": median, "xrt": seconds / median, "runs_s": times}


def bench_models(folder: Path, seconds: float, repeats: int, codebooks: int, reference: bool) -> dict:
    """Encode/decode figures of ours and, unless `reference` is False, of transformers."""
    audio = torch.from_numpy(speech_like(seconds))[None, None]  # [1, 1, T] at 24 kHz
    length = audio.shape[-1]
    ours = load_model(folder, device="cpu")
    encoders = {"ours": lambda: ours.encode(audio, num_codebooks=codebooks)}
    if reference:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        ref = transformers.MimiModel.from_pretrained(folder).eval()

        def ref_encode() -> torch.Tensor:
            with torch.inference_mode():
                return ref.encode(audio, num_quantizers=codebooks).audio_codes

        encoders["transformers"] = ref_encode

    enc_times, codes = timed(encoders, repeats)
    # both decoders decode the reference's codes, when there is a reference, so they do the same work
    to_decode = codes.get("transformers", codes["ours"])
    decoders = {"ours": lambda: ours.decode(to_decode, length=length)}
    if reference:

        def ref_decode() -> torch.Tensor:
            with torch.inference_mode():
                return ref.decode(to_decode).audio_values

        decoders["transformers"] = ref_decode

    dec_times, audios = timed(decoders, repeats)
    results: dict[str, Any] = {
        name: {"encode": figures(enc_times[name], seconds), "decode": figures(dec_times[name], seconds)}
        for name in encoders
    }
    if reference:
        ours_codes, ref_codes = codes["ours"], codes["transformers"]
        same_shape = ours_codes.shape == ref_codes.shape
        results["codes_differing"] = (ours_codes != ref_codes).float().mean().item() if same_shape else 1.0
        diff = audios["ours"] - audios["transformers"][..., :length]
        results["audio_max_abs_diff"] = diff.abs().max().item()
    return results


def bench_cli(folder: Path, workdir: Path, repeats: int, codebooks: int) -> dict:
    """Wall times of `python -m mimi_cli encode` and `decode` on a 5 s WAV, or the CLI's error."""
    wav, packed, rec = workdir / "cli_in.wav", workdir / "cli_out.mimi", workdir / "cli_rec.wav"
    sf.write(wav, speech_like(CLI_SECONDS), SAMPLE_RATE)
    mimi, common = [sys.executable, "-m", "mimi_cli"], ["--weights", str(folder), "--force", "--quiet"]
    commands = {
        "encode": [*mimi, "encode", str(wav), str(packed), "--codebooks", str(codebooks), *common],
        "decode": [*mimi, "decode", str(packed), str(rec), *common],
    }
    results: dict[str, Any] = {}
    for step, cmd in commands.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            times.append(time.perf_counter() - start)
            if proc.returncode != 0:
                lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
                # a traceback's first line says nothing; its last one names the exception
                line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
                return {**results, "error": f"{step}: {line}"}
        results[step] = figures(times, CLI_SECONDS)
    return results


def noisy_runs(models: dict, cli: dict | None) -> list[str]:
    """Measurements whose slowest run took more than NOISY_SPREAD × their fastest."""
    measured = [
        (f"{name} {step}", models[name][step])
        for name in ("ours", "transformers")
        if name in models
        for step in ("encode", "decode")
    ]
    measured += [(f"CLI {step}", cli[step]) for step in ("encode", "decode") if cli and step in cli]
    return [
        f"{label} ({', '.join(f'{t:.2f}' for t in fig['runs_s'])} s)"
        for label, fig in measured
        if max(fig["runs_s"]) > NOISY_SPREAD * min(fig["runs_s"])
    ]


def print_report(env: dict, models: dict, cli: dict | None) -> None:
    print(f"torch {env['torch']}, {env['threads']} threads, CPU: {env['cpu']}, Python {env['python']}")
    seconds, codebooks = env["seconds"], env["codebooks"]
    print(f"\n## Model speed ({seconds:g} s speech-like signal, {codebooks} codebooks, float32)\n")
    print("| | encode × real time | decode × real time |")
    print("|---|---:|---:|")
    for name in ("ours", "transformers"):
        if name in models:
            enc, dec = models[name]["encode"], models[name]["decode"]
            print(f"| {name} | {enc['xrt']:.1f} ({enc['s']:.2f} s) | {dec['xrt']:.1f} ({dec['s']:.2f} s) |")
    if "transformers" in models:
        ours, ref = models["ours"], models["transformers"]
        enc, dec = (ours[step]["xrt"] / ref[step]["xrt"] for step in ("encode", "decode"))
        print(f"| ratio ours/theirs | {enc:.2f} | {dec:.2f} |")
        print(f"\ncodes differing from the reference: {models['codes_differing']:.4%}")
        print(f"decoded audio (same codes) max |ours - reference|: {models['audio_max_abs_diff']:.2e}")
    if cli is not None:
        print(f"\n## CLI end to end ({CLI_SECONDS:g} s WAV; includes start-up and weight loading)\n")
        for step in ("encode", "decode"):
            if step in cli:
                print(f"{step}: {cli[step]['s']:.2f} s ({cli[step]['xrt']:.2f} × real time)")
        if "error" in cli:
            print(f"CLI not available: {cli['error']}")
    noisy = noisy_runs(models, cli)
    if noisy:
        print(f"\nnoisy, slowest run > {NOISY_SPREAD}× fastest (machine busy?): {'; '.join(noisy)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the test signal")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--codebooks", type=int, default=16, help="codebooks to encode")
    parser.add_argument("--skip-reference", action="store_true", help="do not time transformers")
    parser.add_argument("--skip-cli", action="store_true", help="do not time the CLI end to end")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    torch.set_num_threads(os.cpu_count() or 1)
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "codebooks": args.codebooks,
        "seconds": args.seconds,
        "repeats": args.repeats,
    }
    with tempfile.TemporaryDirectory(prefix="mimi-bench-") as tmp:
        workdir = Path(tmp)
        folder = workdir / "weights"
        config = MimiConfig()
        write_hub_layout(folder, config, random_state(config, SEED))
        models = bench_models(folder, args.seconds, args.repeats, args.codebooks, not args.skip_reference)
        cli = None if args.skip_cli else bench_cli(folder, workdir, args.repeats, args.codebooks)

    print_report(env, models, cli)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "models": models, "cli": cli}, indent=2) + "\n")


if __name__ == "__main__":
    main()
