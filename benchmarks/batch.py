"""Folder conversion throughput: `mimi encode IN_DIR OUT_DIR` with `--jobs 1` and with the default jobs.

What it measures (everything under a temporary directory):
  100 short speech-like files (2–6 s; WAV and FLAC; 16, 22.05 and 44.1 kHz; mono and stereo) are
  encoded by the real CLI, `mimi encode IN OUT -w WEIGHTS --quiet --json`, as a subprocess into a fresh
  OUT each time, with random full-size weights. The two settings alternate, `--repeats` times each
  (1 by default, about a minute per repeat on two idle cores; 3 for a median);
  the median is reported. `--smoke` checks the script in seconds: 6 files, a tiny model, one repeat.

How to read it: "× real time" is seconds of audio encoded per second of wall time (the throughput;
higher is faster). "end to end" is the subprocess's wall time, interpreter start-up and weight loading
included; "in batch" is the batch's own time as the CLI reports it (`seconds` in its JSON summary),
which is what `--jobs` can change. The ratio row is default ÷ `--jobs 1`: above 1 means the worker
threads (reading, resampling and writing beside the model) pay off. Both settings must write the same
codes; the script checks that. It also measures the share of the CPUs that other processes used during
each run and calls the result noisy above 10 %: on a busy machine torch's threads wait for each other
and the timings can be several times slower, for one setting and not the other.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from machine import describe, header, load_average  # noqa: E402  (benchmarks/, the script's folder)
from signals import speech_like  # noqa: E402
from weights_factory import TINY_CONFIG, random_state, write_hub_layout  # noqa: E402

from mimi_cli.config import DEFAULT_CODEBOOKS, MimiConfig  # noqa: E402
from mimi_cli.container import read_codes  # noqa: E402
from mimi_cli.device import default_workers, resolve_device  # noqa: E402

SEED = 1234
RATES = (16_000, 22_050, 44_100)
BUSY = 0.1  # other processes above this share of the CPUs during a run: the figures are not to be trusted
MIMI = Path(sys.executable).with_name("mimi")  # the console script of this environment


def make_files(folder: Path, count: int, seed: int) -> float:
    """`count` files of 2–6 s in a few subfolders; returns their total length in seconds."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for i in range(count):
        rate = RATES[i % len(RATES)]
        seconds = float(rng.uniform(2.0, 6.0))
        mono = speech_like(seconds, rate, seed=i)
        audio = mono if i % 4 else np.stack([mono, speech_like(seconds, rate, seed=i + count)], axis=1)
        path = folder / f"set{i % 5}" / f"clip{i:03}{'.flac' if i % 2 else '.wav'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, audio, rate)
        total += len(mono) / rate
    return total


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux /proc/stat), or None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def encode_folder(src: Path, out: Path, weights: Path, options: list[str]) -> dict[str, Any]:
    """One `mimi encode` run into a fresh `out`: wall seconds, the CLI's JSON summary, and the share
    of the machine that other processes used meanwhile (a busy machine makes the figures meaningless)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(MIMI), "encode", str(src), str(out), "-w", str(weights), "--quiet", "--json", *options]
    return run_measured(cmd)


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a `mimi ... --json` command: wall seconds, its JSON summary, others' share of the CPUs."""
    busy, ours = busy_cpu_seconds(), children_cpu_seconds()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    busy_after, ours = busy_cpu_seconds(), children_cpu_seconds() - ours
    others = None
    if busy is not None and busy_after is not None:
        others = max(0.0, (busy_after - busy - ours) / (wall * (os.cpu_count() or 1)))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stderr.strip()}")
    try:
        summary = json.loads(proc.stdout)
    except json.JSONDecodeError:
        summary = {}
    return {"wall": wall, "summary": summary, "others": others}


def snapshot(out: Path) -> dict[str, np.ndarray]:
    """The codes of every .mimi file under `out`, by relative path."""
    codes = {}
    for path in sorted(out.rglob("*.mimi")):
        with path.open("rb") as f:
            codes[path.relative_to(out).as_posix()] = read_codes(f)[1]
    return codes


def differing_codes(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[int, int]:
    """(codes that differ, codes in all) between two snapshots; a missing file counts as all differing."""
    differing = total = 0
    for name, codes in a.items():
        other = b.get(name)
        total += codes.size
        same_shape = other is not None and other.shape == codes.shape
        differing += int((codes != other).sum()) if same_shape else codes.size
    return differing, total


def figures(runs: list[dict[str, Any]], files: int, audio: float) -> dict[str, Any]:
    wall = statistics.median(r["wall"] for r in runs)
    inner = [r["summary"].get("seconds") for r in runs]
    batch = statistics.median(inner) if all(isinstance(s, (int, float)) for s in inner) else None
    return {
        "wall_s": wall,
        "files_per_s": files / wall,
        "xrt": audio / wall,
        "batch_s": batch,
        "batch_xrt": audio / batch if batch else None,
        "runs_s": [round(r["wall"], 2) for r in runs],
        "others": [None if r["others"] is None else round(r["others"], 2) for r in runs],
    }


def print_report(env: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    print(header(env))
    print(
        f"\n## Folder encode: {env['files']} files, {env['audio_s']:.0f} s of audio "
        f"(median of {env['repeats']}; {env['model']} random weights, {env['codebooks']} codebooks)\n"
    )
    print("| run | end to end (s) | files/s | × real time (audio s/s) | in batch (s) | in batch × rt |")
    print("|---|---:|---:|---:|---:|---:|")

    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for label, fig in results.items():
        print(
            f"| {label} | {fig['wall_s']:.1f} | {fig['files_per_s']:.2f} | {fig['xrt']:.1f} "
            f"| {cell(fig['batch_s'], '.1f')} | {cell(fig['batch_xrt'], '.1f')} |"
        )
    (one, many) = results.values()
    batch_ratio = many["batch_xrt"] / one["batch_xrt"] if one["batch_xrt"] and many["batch_xrt"] else None
    ratio = many["xrt"] / one["xrt"]
    print(f"| ratio default / --jobs 1 | | {ratio:.2f} | {ratio:.2f} | | {cell(batch_ratio, '.2f')} |")
    print(
        f"\ncodes differing between the two settings (last runs): {env['differing']} of {env['codes']}"
        " (must be 0: the same files go through the same model calls)"
    )
    print("runs (s): " + "; ".join(f"{label}: {fig['runs_s']}" for label, fig in results.items()))
    print(
        "share of the CPUs used by other processes during each run: "
        + "; ".join(f"{label}: {fig['others']}" for label, fig in results.items())
    )
    busiest = max((x for fig in results.values() for x in fig["others"] if x is not None), default=0.0)
    if busiest > BUSY:
        print(f"\nnoisy: other processes used up to {busiest:.0%} of the CPUs during a run; run it again")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100, help="number of input files")
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting (median)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="6 files, tiny model: checks the script")
    args = parser.parse_args(argv)
    if args.files < 1 or args.repeats < 1:
        parser.error("--files and --repeats must be at least 1")
    if args.smoke:
        args.files, args.repeats = 6, 1

    env: dict[str, Any] = {
        **describe(args.smoke),
        "model": "tiny" if args.smoke else "full-size",
        "files": args.files,
        "repeats": args.repeats,
        "codebooks": DEFAULT_CODEBOOKS,
    }
    jobs = default_workers(resolve_device())  # what `mimi encode` picks without --jobs
    settings = {"--jobs 1": ["--jobs", "1"], f"default (--jobs {jobs})": []}
    with tempfile.TemporaryDirectory(prefix="mimi-bench-batch-") as tmp:
        work = Path(tmp)
        weights = work / "weights"
        config = TINY_CONFIG if args.smoke else MimiConfig()
        write_hub_layout(weights, config, random_state(config, SEED))
        env["audio_s"] = make_files(work / "in", args.files, SEED)
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in settings}
        outputs: dict[str, dict[str, np.ndarray]] = {}
        for _ in range(args.repeats):  # alternate, so that a busy spell hurts both settings alike
            for label, options in settings.items():
                out = work / "out"
                runs[label].append(encode_folder(work / "in", out, weights, options))
                outputs[label] = snapshot(out)
        env["load_after"] = load_average()
        results = {label: figures(r, args.files, env["audio_s"]) for label, r in runs.items()}
        first, second = outputs.values()
        if len(first) != args.files or sorted(first) != sorted(second):
            raise SystemExit(f"expected {args.files} outputs each, got {len(first)} and {len(second)}")
        env["differing"], env["codes"] = differing_codes(first, second)

    print_report(env, results)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
