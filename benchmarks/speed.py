"""Encode/decode speed of mimi-cli against transformers' MimiModel, on CPU, with random full-size weights.

What it measures (one run, everything under a temporary directory):
  1. Model speed: `encode` (audio → codes, `--codebooks` of them, 16 by default) and `decode`
     (codes → audio) of a speech-like signal (60 s by default), for our model and for the reference
     `transformers.MimiModel`, loaded from the same randomised full-size weights. One warm-up call,
     then the median of `--repeats` calls, interleaved ours/theirs. Both decode the reference's codes.
  2. End to end from the command line (`end_to_end.py`): `python -m mimi_cli encode|decode` and a plain
     transformers script (import, load, read, encode or decode, save) on 60 s and 5 s WAVs, each run a
     fresh process from start to output on disk, interleaved, best of `--repeats`; and `python -c
     "import torch"` in the same rounds, the floor of any torch command.
  3. A cold-process breakdown of `mimi` (imports, weights, fingerprint, reading, first call, steady
     compute, writing), wall and CPU seconds.

How to read it: "× real time" is seconds of audio processed per second of wall time (higher is faster;
above 1 keeps up with live audio). The ratio row is ours ÷ transformers, so above 1 means we are faster.
"codes differing" must stay near 0 (float near-ties in the nearest-centroid search may flip a few);
otherwise the two models are not doing the same work and the comparison means nothing.
Random weights run the same arithmetic as the released ones, so the timings transfer.
`--smoke` checks the script in seconds: a tiny model, 2 s of audio, one repeat, one 1 s end-to-end input
and no untimed warm-up round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

from end_to_end import bench_breakdown, bench_end_to_end, print_breakdown, print_end_to_end  # noqa: E402
from machine import describe, header  # noqa: E402  (benchmarks/, the script's folder)
from signals import speech_like  # noqa: E402
from weights_factory import TINY_CONFIG, random_state, write_hub_layout  # noqa: E402

from mimi_cli import load_model  # noqa: E402
from mimi_cli.config import MimiConfig  # noqa: E402

SAMPLE_RATE = 24_000
END_TO_END_SECONDS = (60.0, 5.0)
SMOKE_END_TO_END_SECONDS = (1.0,)
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


def noisy_runs(models: dict) -> list[str]:
    """Measurements whose slowest run took more than NOISY_SPREAD × their fastest."""
    measured = [
        (f"{name} {step}", models[name][step])
        for name in ("ours", "transformers")
        if name in models
        for step in ("encode", "decode")
    ]
    return [
        f"{label} ({', '.join(f'{t:.2f}' for t in fig['runs_s'])} s)"
        for label, fig in measured
        if max(fig["runs_s"]) > NOISY_SPREAD * min(fig["runs_s"])
    ]


def print_report(env: dict, models: dict) -> None:
    seconds, codebooks, threads = env["seconds"], env["codebooks"], env["threads"]
    print(
        f"\n## Model speed ({seconds:g} s speech-like signal, {codebooks} codebooks, float32, "
        f"{threads} threads)\n"
    )
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
    noisy = noisy_runs(models)
    if noisy:
        print(f"\nnoisy, slowest run > {NOISY_SPREAD}× fastest (machine busy?): {'; '.join(noisy)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the test signal")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--codebooks", type=int, default=16, help="codebooks to encode")
    parser.add_argument("--skip-reference", action="store_true", help="do not time transformers")
    parser.add_argument("--skip-cli", action="store_true", help="no end-to-end table nor breakdown")
    parser.add_argument("--skip-models", action="store_true", help="no model-speed table (warm models)")
    parser.add_argument(
        "--baseline", type=Path, help="also time `mimi` of this other checkout end to end (before/after)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny model, short inputs: checks the script")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seconds, args.repeats = 2.0, 1

    torch.set_num_threads(os.cpu_count() or 1)
    env = {
        **describe(args.smoke),
        "threads": torch.get_num_threads(),
        "codebooks": args.codebooks,
        "seconds": args.seconds,
        "repeats": args.repeats,
    }
    print(header(env))
    lengths = SMOKE_END_TO_END_SECONDS if args.smoke else END_TO_END_SECONDS
    with tempfile.TemporaryDirectory(prefix="mimi-bench-") as tmp:
        workdir = Path(tmp)
        folder = workdir / "weights"
        config = TINY_CONFIG if args.smoke else MimiConfig()
        write_hub_layout(folder, config, random_state(config, SEED))
        reference = not args.skip_reference
        models = (
            {}
            if args.skip_models
            else bench_models(folder, args.seconds, args.repeats, args.codebooks, reference)
        )
        if not args.skip_models:
            print_report(env, models)
        cli, breakdown = None, None
        if not args.skip_cli:
            wavs = {}
            for seconds in lengths:
                wavs[seconds] = workdir / f"speech_{seconds:g}s.wav"
                sf.write(wavs[seconds], speech_like(seconds), SAMPLE_RATE)
            time.sleep(2)  # the weights settle: mimi caches the fingerprint of files older than 2 s
            cli = bench_end_to_end(
                folder, workdir, wavs, args.repeats, args.codebooks, reference, args.baseline, not args.smoke
            )
            print_end_to_end(cli, args.codebooks, args.repeats)
            longest = max(lengths)
            breakdown = bench_breakdown(folder, workdir, wavs[longest], longest, args.codebooks)
            print_breakdown(breakdown, longest)
    if args.json:
        figures_ = {"env": env, "models": models, "end_to_end": cli, "breakdown": breakdown}
        args.json.write_text(json.dumps(figures_, indent=2) + "\n")


if __name__ == "__main__":
    main()
