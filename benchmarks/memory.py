"""Peak memory and speed of the real `mimi encode` / `mimi decode` commands on long inputs.

    python benchmarks/memory.py [--minutes 10 60] [--codebooks 16]

Generates speech-like WAV inputs (16 kHz mono, so resampling is exercised) of each length and
random full-size weights, then runs each command in its own process and reports its peak
resident memory (ru_maxrss of that process alone) and its speed as × real time, plus the growth
of peak memory from the shortest to the longest input. The bar: peak RSS ≤ 1.5 GB and growth
≤ 10% from 10 to 60 minutes. Then the same for encoding an m4a (AAC 44.1 kHz stereo, written here by
PyAV, `--m4a-minutes` long, 60 by default): decoded by FFmpeg frame by frame, it must stay within the
same bar, and its .mimi must hold the m4a's exact sample count. `--smoke` checks the script in
seconds: a tiny model, 6 and 12 s, a 12 s m4a.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from machine import describe, header, load_average  # noqa: E402  (benchmarks/, the script's folder)

RATE = 16_000
# Runs a command as its only child and prints that child's peak RSS (KiB on Linux) as JSON.
_MEASURE = (
    "import json, resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(json.dumps({'code': code, 'seconds': time.perf_counter() - t,\n"
    "    'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))\n"
)


def write_long_wav(path: Path, minutes: float) -> None:
    """Speech-like audio written in blocks of 30 s (the generator itself stays small), or one shorter."""
    from signals import speech_like

    seconds = min(30.0, minutes * 60)
    block = speech_like(seconds, rate=RATE)
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", RATE, 1, "PCM_16") as out:
        for _ in range(round(minutes * 60 / seconds)):
            out.write(np.roll(block, rng.integers(len(block))) * rng.uniform(0.5, 1.0))


def write_long_m4a(path: Path, minutes: float, rate: int = 44_100) -> int:
    """Speech-like stereo AAC in an .m4a, encoded by PyAV block by block; returns its samples per channel."""
    from signals import speech_like

    from mimi_cli.audio import AudioWriter

    seconds = min(30.0, minutes * 60)
    block = speech_like(seconds, rate=rate)
    rng = np.random.default_rng(0)
    frames = 0
    with AudioWriter(path, rate, channels=2) as out:
        for _ in range(round(minutes * 60 / seconds)):
            left = np.roll(block, rng.integers(len(block))) * rng.uniform(0.5, 1.0)
            out.write(np.stack([left, np.roll(left, 300) * 0.8], axis=1))
            frames += len(left)
    return frames


def measure(command: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=False
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if report["code"] != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, nargs="+", default=[10.0, 60.0])
    parser.add_argument("--codebooks", type=int, default=16)
    parser.add_argument("--m4a-minutes", type=float, default=60.0, help="the m4a encode's length (0: none)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 6 and 12 s: checks the script")
    args = parser.parse_args(argv)
    if args.smoke:
        args.minutes, args.m4a_minutes = [0.1, 0.2], 0.2

    from weights_factory import TINY_CONFIG, random_state, write_hub_layout

    from mimi_cli.config import MimiConfig

    info = describe(args.smoke)
    config = TINY_CONFIG if args.smoke else MimiConfig()

    mimi = [sys.executable, "-m", "mimi_cli"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mimi-bench-memory-") as tmp:
        folder = Path(tmp)
        weights = folder / "weights"
        write_hub_layout(weights, config, random_state(config, seed=7))
        for minutes in args.minutes:
            wav, packed, decoded = (folder / f"{minutes:g}min{s}" for s in (".wav", ".mimi", ".out.wav"))
            started = time.perf_counter()
            write_long_wav(wav, minutes)
            took = time.perf_counter() - started
            print(f"generated {wav.name} ({wav.stat().st_size / 1e6:.0f} MB) in {took:.0f} s", flush=True)
            common = ["--weights", str(weights), "--device", "cpu", "--quiet", "--force"]
            for step, command in (
                ("encode", [*mimi, "encode", str(wav), str(packed), "-k", str(args.codebooks), *common]),
                ("decode", [*mimi, "decode", str(packed), str(decoded), "-r", "original", *common]),
            ):
                report = measure(command)
                rows.append(
                    (f"{minutes:g} min", step, report["peak_kib"] / 1024**2, minutes * 60 / report["seconds"])
                )
                print(
                    f"{minutes:g} min {step}: peak {rows[-1][2]:.2f} GB, {rows[-1][3]:.1f}× real time",
                    flush=True,
                )
            if sf.info(decoded).frames != sf.info(wav).frames:
                raise SystemExit(f"{decoded.name}: length differs from the input")
            for path in (wav, packed, decoded):
                path.unlink()
        if args.m4a_minutes:
            rows.append(_m4a_row(folder, args.m4a_minutes, args.codebooks, mimi, weights))

    info["load_after"] = load_average()
    print(f"\n{header(info)}")
    print("\n| input | step | peak RSS | × real time |\n|---|---|---|---|")
    for minutes, step, peak, speed in rows:
        print(f"| {minutes} | {step} | {peak:.2f} GB | {speed:.1f}× |")
    shortest, longest = min(args.minutes), max(args.minutes)
    if shortest != longest:
        for step in ("encode", "decode"):
            peaks = {m: p for m, s, p, _ in rows if s == step and m.endswith(" min")}
            growth = peaks[f"{longest:g} min"] / peaks[f"{shortest:g} min"] - 1
            print(f"{step}: peak RSS grows {growth:+.1%} from {shortest:g} to {longest:g} min")


def _m4a_row(folder: Path, minutes: float, codebooks: int, mimi: list[str], weights: Path) -> tuple:
    """Encode a `minutes`-long m4a in its own process: (label, "encode", peak GB, × real time)."""
    from mimi_cli.codec import read_info

    m4a, packed = folder / f"{minutes:g}min.m4a", folder / f"{minutes:g}min-m4a.mimi"
    started = time.perf_counter()
    frames = write_long_m4a(m4a, minutes)
    took = time.perf_counter() - started
    print(f"generated {m4a.name} ({m4a.stat().st_size / 1e6:.0f} MB, AAC) in {took:.0f} s", flush=True)
    common = ["--weights", str(weights), "--device", "cpu", "--quiet", "--force"]
    report = measure([*mimi, "encode", str(m4a), str(packed), "-k", str(codebooks), *common])
    header, _ = read_info(packed)
    if header.original_length != frames:
        raise SystemExit(f"{packed.name}: holds {header.original_length} samples, the m4a {frames}")
    row = (f"{minutes:g} min m4a", "encode", report["peak_kib"] / 1024**2, minutes * 60 / report["seconds"])
    print(f"{row[0]} encode: peak {row[2]:.2f} GB, {row[3]:.1f}× real time", flush=True)
    m4a.unlink()
    packed.unlink()
    return row


if __name__ == "__main__":
    main()
