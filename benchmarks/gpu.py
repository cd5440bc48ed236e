"""GPU benchmark of mimi-cli: model throughput against transformers, corpus tokenisation, one-frame latency.

What it measures, in one run on one CUDA device, with random full-size weights (nothing downloaded):
  1. Model throughput: `encode` (audio → `--codebooks` codes) and `decode` of 10 s speech-like clips at
     batch sizes 1, 8, 32 and 128, in float32 (TF32 off), TF32 and bfloat16, for mimi-cli and for
     transformers' MimiModel loaded from the same weights (both decode mimi-cli's codes). Inputs are
     already on the GPU: this is the model alone. One warm-up call, then the median of `--repeats`;
     a batch that does not fit in memory is reported as such.
  2. Corpus tokenisation: `mimi tokenize SRC OUT --device cuda --batch-size N --json` on a generated
     corpus (`--corpus-files`, ≥ 500 by default: WAV/FLAC/OGG, 8–48 kHz, mono and stereo), end to end
     (start-up included) in hours of audio per hour, with the GPU's busy share sampled during the run
     (NVML through torch.cuda.utilization, else nvidia-smi). Beside it, each side alone: the CPU side
     (reading + resampling every file on all cores) and the GPU side (the model on pre-loaded batches
     of the same files), and the time per stage (read, resample, model, write) per hour of audio.
  3. One 80 ms frame through `StreamingEncoder` / `StreamingDecoder`, after the attention window has
     filled: ms per frame (median, p99), host → device copy and read-back included, as live mode pays.

How to read it: "× real time" is seconds of audio per second of wall time (higher is faster). The
ratio row compares each implementation at its own best setting (dtype and batch size). Tokenisation
"efficiency" is the end-to-end rate over the slower side's own rate: near 1, the pipeline wastes little.
Goals (issue 17): ≥ 2× transformers; ≥ 2,000 h of audio per GPU-hour, ≥ 80 % efficiency; ≤ 2 ms per frame.

`--device cpu --smoke` runs every section with a tiny model, a few small files and one repeat, so that
the code paths can be checked without a GPU (the figures then mean nothing). Without a visible CUDA
device, and without `--smoke`, the script refuses in one line with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT / "benchmarks", ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from machine import describe, header  # noqa: E402
from signals import speech_like  # noqa: E402
from weights_factory import TINY_CONFIG, random_state, write_hub_layout  # noqa: E402

from mimi_cli import load_model  # noqa: E402
from mimi_cli.audio import read_audio, resample, write_audio  # noqa: E402
from mimi_cli.codec import whole_frames  # noqa: E402
from mimi_cli.config import DEFAULT_CODEBOOKS, FRAME_SIZE, SAMPLE_RATE, MimiConfig  # noqa: E402
from mimi_cli.device import configure_cuda, to_device  # noqa: E402
from mimi_cli.model import StreamingDecoder, StreamingEncoder  # noqa: E402

SEED = 1234
CLIP_SECONDS = 10.0
BATCH_SIZES = (1, 8, 32, 128)
SETTINGS = ("float32", "tf32", "bfloat16")  # float32 = IEEE (TF32 off); tf32 = float32 tensors, TF32 math
DTYPES = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16}
CORPUS_RATES = (8_000, 16_000, 22_050, 24_000, 44_100, 48_000)
CORPUS_FORMATS = (".wav", ".flac", ".ogg")
WARM_FRAMES = 150  # 12 s: the attention window (10 s) is full before frames are timed
TIMED_FRAMES = 200


class Plan:
    """What one run measures: the full plan on a GPU, a tiny one for `--smoke`."""

    def __init__(self, args: argparse.Namespace) -> None:
        smoke = args.smoke
        self.device = torch.device(args.device)
        self.config = TINY_CONFIG if smoke else MimiConfig()
        self.codebooks = min(args.codebooks, self.config.num_quantizers)
        self.clip_seconds = 1.0 if smoke else CLIP_SECONDS
        self.batch_sizes = (1, 2) if smoke else tuple(args.batch_sizes)
        self.settings = ("float32",) if self.device.type != "cuda" else tuple(args.settings)
        self.repeats = 1 if smoke else args.repeats
        self.reference = not args.skip_reference
        self.corpus_files = 6 if smoke else args.corpus_files
        self.corpus_seconds = (0.5, 2.0) if smoke else (args.min_seconds, args.max_seconds)
        self.tokenize_batch = 2 if smoke else args.tokenize_batch_size
        self.tokenize_dtype = "float32" if self.device.type != "cuda" else args.tokenize_dtype
        self.tokenize_jobs = 2 if smoke else args.tokenize_jobs
        self.warm_frames, self.timed_frames = (3, 5) if smoke else (WARM_FRAMES, TIMED_FRAMES)
        self.sections = args.sections


# ---------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[list[float], Any]:
    """Wall times (s) of `repeats` calls after one untimed warm-up, the device drained around each."""
    result = fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, result


@contextlib.contextmanager
def precision(setting: str) -> Iterator[None]:
    """The CLI's CUDA settings for `setting` (`configure_cuda`: TF32 for "tf32" only, cuDNN autotuned
    in IEEE float32), for both implementations; torch's flags restored after."""
    backends = torch.backends
    saved = backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark
    configure_cuda(setting)
    try:
        yield
    finally:
        backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark = saved


def note(line: str) -> None:
    """A progress line on stderr (the report comes at the end; a run cut short still says how far it got)."""
    print(line, file=sys.stderr, flush=True)


def out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)


# ---------------------------------------------------------------------------------------------- 1. throughput


def make_clips(count: int, seconds: float) -> torch.Tensor:
    """[count, 1, T] speech-like clips at 24 kHz (8 distinct ones, repeated)."""
    distinct = [torch.from_numpy(speech_like(seconds, seed=s)) for s in range(min(count, 8))]
    return torch.stack([distinct[i % len(distinct)] for i in range(count)])[:, None]


def reference_model(folder: Path, device: torch.device, dtype: torch.dtype) -> Any:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers.MimiModel.from_pretrained(folder).eval().to(device=device, dtype=dtype)


def implementations(plan: Plan, folder: Path, setting: str) -> dict[str, tuple[Callable, Callable]]:
    """name → (encode(audio) → codes, decode(codes) → audio) for ours and, if asked, transformers'."""
    dtype, k = DTYPES[setting], plan.codebooks
    ours = load_model(folder, device=plan.device, dtype=dtype)
    found: dict[str, tuple[Callable, Callable]] = {
        "mimi_cli": (lambda a: ours.encode(a.to(dtype), k), lambda c: ours.decode(c))
    }
    if plan.reference:
        ref = reference_model(folder, plan.device, dtype)

        @torch.inference_mode()
        def ref_encode(audio: torch.Tensor) -> torch.Tensor:
            return ref.encode(audio.to(dtype), num_quantizers=k).audio_codes

        @torch.inference_mode()
        def ref_decode(codes: torch.Tensor) -> torch.Tensor:
            return ref.decode(codes).audio_values

        found["transformers"] = (ref_encode, ref_decode)
    return found


def time_step(fn: Callable[[], Any], seconds: float, plan: Plan) -> tuple[dict[str, Any], Any]:
    """({"xrt", "runs_s", "peak_gib"} or {"error"}, the last result) of one encode or decode."""
    cuda = plan.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(plan.device)
    try:
        times, result = measure(fn, plan.repeats, plan.device)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        if not out_of_memory(e):
            raise
        torch.cuda.empty_cache()
        return {"error": "out of memory"}, None
    figures = {"xrt": seconds / statistics.median(times), "runs_s": times}
    if cuda:
        figures["peak_gib"] = torch.cuda.max_memory_allocated(plan.device) / 2**30
    return figures, result


def bench_throughput(plan: Plan, folder: Path) -> dict[str, Any]:
    """cells {impl: {setting: {batch: {"encode": figures, "decode": figures}}}}, best cells, code agreement.

    Every implementation decodes mimi_cli's codes of the same batch, so that both do the same work.
    """
    clips = make_clips(max(plan.batch_sizes), plan.clip_seconds).to(plan.device)
    cells: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    agreement = None
    for setting in plan.settings:
        with precision(setting):
            impls = implementations(plan, folder, setting)
            for batch in plan.batch_sizes:
                audio, seconds = clips[:batch], batch * plan.clip_seconds
                codes: dict[str, torch.Tensor] = {}
                for name, (encode, decode) in impls.items():
                    cell = cells.setdefault(name, {}).setdefault(setting, {}).setdefault(batch, {})
                    cell["encode"], codes[name] = time_step(partial(encode, audio), seconds, plan)
                    to_decode = codes.get("mimi_cli")
                    if to_decode is None:
                        cell["decode"] = {"error": "no codes to decode"}
                    else:
                        cell["decode"], _ = time_step(partial(decode, to_decode), seconds, plan)
                if setting == "float32" and batch == 1 and len(codes) == 2:
                    ours, theirs = codes["mimi_cli"], codes["transformers"]
                    same = ours is not None and theirs is not None and ours.shape == theirs.shape
                    agreement = (ours.cpu() == theirs.cpu()).float().mean().item() if same else 0.0
            del impls, codes
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
    return {"cells": cells, "best": best_settings(cells), "codes_equal_float32": agreement}


def best_settings(cells: dict) -> dict[str, dict[str, Any]]:
    """{impl: {step: {"xrt", "setting", "batch"}}}: each implementation's fastest cell per step."""
    best: dict[str, dict[str, Any]] = {}
    for name, settings in cells.items():
        for step in ("encode", "decode"):
            found = [
                (cell[step]["xrt"], setting, batch)
                for setting, batches in settings.items()
                for batch, cell in batches.items()
                if "xrt" in cell[step]
            ]
            if found:
                xrt, setting, batch = max(found)
                best.setdefault(name, {})[step] = {"xrt": xrt, "setting": setting, "batch": batch}
    return best


# ---------------------------------------------------------------------------------------------- 2. tokenize


def make_corpus(folder: Path, count: int, seconds: tuple[float, float], seed: int = SEED) -> float:
    """`count` files of mixed rates, formats and channel counts under `folder`; their total seconds.

    A few long speech-like signals are generated once and cut into pieces (generating hours of audio
    sample by sample would take longer than the benchmark), then resampled to each file's rate.
    """
    rng = np.random.default_rng(seed)
    longest = seconds[1]
    sources = [speech_like(longest * 4, seed=s) for s in range(4)]
    specs = []
    for i in range(count):
        rate = CORPUS_RATES[i % len(CORPUS_RATES)]
        suffix = CORPUS_FORMATS[(i // len(CORPUS_RATES)) % len(CORPUS_FORMATS)]
        length = float(rng.uniform(*seconds))
        start = int(rng.uniform(0, longest * 3) * SAMPLE_RATE)
        stereo = i % 3 == 0
        path = folder / f"part{i % 7}" / f"clip{i:04}{suffix}"
        specs.append((path, rate, sources[i % 4], start, length, stereo))

    def write(spec: tuple) -> float:
        path, rate, source, start, length, stereo = spec
        mono = resample(source[start : start + int(length * SAMPLE_RATE)], SAMPLE_RATE, rate)
        audio = np.stack([mono, 0.8 * mono], axis=1) if stereo else mono
        path.parent.mkdir(parents=True, exist_ok=True)
        write_audio(path, audio, rate)  # 16-bit WAV/FLAC, Vorbis; long Ogg written safely in blocks
        return len(mono) / rate

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return sum(pool.map(write, specs))


class BusySampler:
    """Samples the GPU's utilisation (share of time a kernel ran) every `period` s in a thread."""

    def __init__(self, device: torch.device, period: float = 0.1) -> None:
        self.device, self.period = device, period
        self.samples: list[float] = []
        self.source = self._pick_source()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pick_source(self) -> Callable[[], float] | None:
        if self.device.type != "cuda":
            return None
        try:
            torch.cuda.utilization(self.device)  # NVML, when pynvml is installed
            return lambda: float(torch.cuda.utilization(self.device))
        except Exception:  # noqa: BLE001 - any failure means: try the next source
            pass
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return None
        index = str(self.device.index or 0)
        query = [smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", index]
        return lambda: float(subprocess.run(query, capture_output=True, text=True, check=True).stdout)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            with contextlib.suppress(Exception):
                self.samples.append(self.source())  # type: ignore[misc]

    def __enter__(self) -> BusySampler:
        if self.source is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    @property
    def busy(self) -> float | None:
        return statistics.mean(self.samples) / 100 if self.samples else None


def run_tokenize(plan: Plan, folder: Path, corpus: Path, out: Path, audio_seconds: float) -> dict[str, Any]:
    """`mimi tokenize` (issue 9) end to end as a subprocess: the one place that knows its interface.

    Interface assumed: `mimi tokenize SRC OUT_DIR --device D --batch-size N --json` with the common
    options `--weights`, `--dtype`, `--codebooks`; a JSON summary on stdout. Adjust here if it differs.
    """
    command = [
        sys.executable, "-m", "mimi_cli", "tokenize", str(corpus), str(out),
        "--device", str(plan.device), "--batch-size", str(plan.tokenize_batch), "--json",
        "--jobs", str(plan.tokenize_jobs),
        "--weights", str(folder), "--codebooks", str(plan.codebooks),
    ]  # fmt: skip
    if plan.tokenize_dtype != "float32":
        command += ["--dtype", plan.tokenize_dtype]
    with BusySampler(plan.device) as sampler:
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
        return {"error": line, "command": " ".join(["mimi", *command[3:]])}
    try:
        summary = json.loads(proc.stdout)
    except json.JSONDecodeError:
        summary = None
    return {
        "wall_s": wall,
        "hours_per_hour": audio_seconds / wall,
        "gpu_busy": sampler.busy,
        "busy_samples": len(sampler.samples),
        "summary": summary,
        "command": " ".join(["mimi", *command[3:]]),
    }


def cpu_side(paths: list[Path], workers: int) -> tuple[float, list[np.ndarray], dict[str, float]]:
    """Read and resample every file on `workers` threads: (wall s, 24 kHz audio, per-stage CPU s)."""
    stages = {"read": 0.0, "resample": 0.0}
    lock = threading.Lock()

    def load(path: Path) -> np.ndarray:
        t0 = time.perf_counter()
        audio, info = read_audio(path, target_rate=None)
        t1 = time.perf_counter()
        audio = resample(audio, info.sample_rate, SAMPLE_RATE)
        t2 = time.perf_counter()
        with lock:
            stages["read"] += t1 - t0
            stages["resample"] += t2 - t1
        return audio

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        loaded = list(pool.map(load, paths))
    return time.perf_counter() - start, loaded, stages


def gpu_side(plan: Plan, folder: Path, loaded: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    """The model alone on the corpus, in batches of `tokenize_batch` (zero-padded to whole frames and
    to the longest, as batch encoding does), inputs already on the GPU: (wall s, codes per file)."""
    model = load_model(folder, device=plan.device, dtype=DTYPES[plan.tokenize_dtype])
    batches = []
    for start in range(0, len(loaded), plan.tokenize_batch):
        padded = [whole_frames(a) for a in loaded[start : start + plan.tokenize_batch]]
        audio = torch.zeros(len(padded), 1, max(map(len, padded)))
        for row, samples in enumerate(padded):
            audio[row, 0, : len(samples)] = torch.from_numpy(samples)
        batches.append((audio.to(plan.device), [len(p) // FRAME_SIZE for p in padded]))
    with precision(plan.tokenize_dtype):
        model.encode(batches[0][0][:1, :, : 10 * FRAME_SIZE], plan.codebooks)  # warm-up
        synchronize(plan.device)
        start = time.perf_counter()
        results = [(model.encode(audio, plan.codebooks), frames) for audio, frames in batches]
        synchronize(plan.device)
        wall = time.perf_counter() - start
    codes = [c[row, :, :f].cpu().numpy() for c, frames in results for row, f in enumerate(frames)]
    return wall, codes


def write_side(codes: list[np.ndarray], folder: Path) -> float:
    """Seconds to write every file's codes as one Parquet shard (list<list<int16>>, as issue 9 specifies)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return float("nan")
    start = time.perf_counter()
    column = pa.array([c.astype(np.int16).tolist() for c in codes], pa.list_(pa.list_(pa.int16())))
    pq.write_table(pa.table({"codes": column}), folder / "codes.parquet")
    return time.perf_counter() - start


def bench_tokenize(plan: Plan, folder: Path, workdir: Path) -> dict[str, Any]:
    corpus = workdir / "corpus"
    made = time.perf_counter()
    audio_seconds = make_corpus(corpus, plan.corpus_files, plan.corpus_seconds)
    made = time.perf_counter() - made
    paths = sorted(p for p in corpus.rglob("*") if p.is_file())
    hours = audio_seconds / 3600
    note(f"tokenize: corpus of {len(paths)} files, {hours:.2f} h of audio, made in {made:.0f} s")
    result: dict[str, Any] = {"files": len(paths), "audio_hours": hours, "corpus_made_s": made}
    result["end_to_end"] = run_tokenize(plan, folder, corpus, workdir / "tokens", audio_seconds)
    note(f"tokenize: end to end {result['end_to_end'].get('wall_s', float('nan')):.1f} s")

    workers = os.cpu_count() or 1
    cpu_wall, loaded, stages = cpu_side(paths, workers)
    note(f"tokenize: CPU side alone {cpu_wall:.1f} s")
    gpu_wall, codes = gpu_side(plan, folder, loaded)
    note(f"tokenize: GPU side alone {gpu_wall:.1f} s")
    write_s = write_side(codes, workdir)
    result["cpu_side"] = {"workers": workers, "wall_s": cpu_wall, "hours_per_hour": audio_seconds / cpu_wall}
    result["gpu_side"] = {"wall_s": gpu_wall, "hours_per_hour": audio_seconds / gpu_wall}
    # seconds of work per hour of audio, each stage on its own (read and resample: summed over threads)
    per_hour = {**stages, "model": gpu_wall, "write": write_s}
    result["stage_s_per_audio_hour"] = {k: v / hours for k, v in per_hour.items()}
    slower = min(result["cpu_side"]["hours_per_hour"], result["gpu_side"]["hours_per_hour"])
    e2e = result["end_to_end"].get("hours_per_hour")
    result["efficiency"] = e2e / slower if e2e else None
    return result


# ---------------------------------------------------------------------------------------------- 3. one frame


def bench_frame(plan: Plan, folder: Path) -> dict[str, Any]:
    """ms per 80 ms frame through the streaming encoder and decoder, one frame per call, batch 1."""
    host = speech_like((plan.warm_frames + plan.timed_frames) * FRAME_SIZE / SAMPLE_RATE)
    results: dict[str, Any] = {}
    for setting in ("float32", "bfloat16") if plan.device.type == "cuda" else ("float32",):
        with precision(setting):
            model = load_model(folder, device=plan.device, dtype=DTYPES[setting])
            encoder, decoder = StreamingEncoder(model, plan.codebooks), StreamingDecoder(model)
            times: dict[str, list[float]] = {"encode": [], "decode": []}
            for index in range(plan.warm_frames + plan.timed_frames):
                frame = torch.from_numpy(host[index * FRAME_SIZE : (index + 1) * FRAME_SIZE])[None, None]
                start = time.perf_counter()
                codes = encoder.push(to_device(frame, model.device)).cpu()
                middle = time.perf_counter()
                decoder.push(to_device(codes, model.device)).cpu()
                end = time.perf_counter()
                if index >= plan.warm_frames:
                    times["encode"].append(middle - start)
                    times["decode"].append(end - middle)
            results[setting] = {
                step: {"median_ms": 1e3 * statistics.median(t), "p99_ms": 1e3 * float(np.percentile(t, 99))}
                for step, t in times.items()
            }
    return results


# ---------------------------------------------------------------------------------------------- report


def print_report(env: dict, figures: dict) -> None:
    print(header(env))
    print(f"device: {env['device_name']} (CUDA {env['cuda']})")
    if "throughput" in figures:
        print_throughput(env, figures["throughput"])
    if "tokenize" in figures:
        print_tokenize(env, figures["tokenize"])
    if "frame" in figures:
        print("\n## One 80 ms frame, streamed (batch 1, copies to and from the device included)\n")
        print("| setting | encode median / p99 ms | decode median / p99 ms |")
        print("|---|---:|---:|")
        for setting, steps in figures["frame"].items():
            enc, dec = steps["encode"], steps["decode"]
            print(
                f"| {setting} | {enc['median_ms']:.2f} / {enc['p99_ms']:.2f} "
                f"| {dec['median_ms']:.2f} / {dec['p99_ms']:.2f} |"
            )
        print("\ngoal: at most 2 ms per frame and direction")


def _cell(figures: dict[str, Any], key: str, spec: str) -> str:
    return format(figures[key], spec) if key in figures else figures.get("error", "–")


def print_throughput(env: dict, throughput: dict) -> None:
    clips, codebooks = env["clip_seconds"], env["codebooks"]
    print(f"\n## Model throughput (× real time; {clips:g} s clips, {codebooks} codebooks)\n")
    print("| implementation | setting | batch | encode | decode | peak GiB encode / decode |")
    print("|---|---|---:|---:|---:|---:|")
    for name, settings in throughput["cells"].items():
        for setting, batches in settings.items():
            for batch, cell in batches.items():
                enc, dec = cell["encode"], cell["decode"]
                peaks = f"{_cell(enc, 'peak_gib', '.1f')} / {_cell(dec, 'peak_gib', '.1f')}"
                print(
                    f"| {name} | {setting} | {batch} | {_cell(enc, 'xrt', '.0f')} "
                    f"| {_cell(dec, 'xrt', '.0f')} | {peaks} |"
                )
    best = throughput["best"]
    for step in ("encode", "decode"):
        found = [
            f"{n} {b[step]['xrt']:.0f}× ({b[step]['setting']}, batch {b[step]['batch']})"
            for n, b in best.items()
            if step in b
        ]
        line = f"\nbest {step}: {', '.join(found)}"
        if all(step in best.get(n, {}) for n in ("mimi_cli", "transformers")):
            ratio = best["mimi_cli"][step]["xrt"] / best["transformers"][step]["xrt"]
            line += f"; ratio mimi_cli / transformers {ratio:.2f} (goal 2)"
        print(line)
    if throughput["codes_equal_float32"] is not None:
        print(f"codes equal to transformers' (float32, batch 1): {throughput['codes_equal_float32']:.4%}")


def print_tokenize(env: dict, tokenize: dict) -> None:
    e2e, cpu, gpu = tokenize["end_to_end"], tokenize["cpu_side"], tokenize["gpu_side"]
    print(f"\n## Corpus tokenisation ({tokenize['files']} files, {tokenize['audio_hours']:.2f} h of audio)\n")
    if "error" in e2e:
        print(f"`{e2e['command']}` failed: {e2e['error']}")
    else:
        busy = "not measured" if e2e["gpu_busy"] is None else f"{e2e['gpu_busy']:.0%}"
        print(
            f"end to end: {e2e['hours_per_hour']:.0f} h of audio per hour ({e2e['wall_s']:.1f} s, start-up "
            f"included; goal 2,000), GPU busy {busy}"
        )
        inside = (e2e.get("summary") or {}).get("seconds")
        if inside:
            rate = tokenize["audio_hours"] * 3600 / inside
            print(
                f"  of which tokenize() itself (model load included): {inside:.1f} s, {rate:.0f} h/h; "
                f"process start-up {e2e['wall_s'] - inside:.1f} s"
            )
    print(f"CPU side alone (read + resample, {cpu['workers']} threads): {cpu['hours_per_hour']:.0f} h/h")
    batch, dtype = env["tokenize_batch"], env["tokenize_dtype"]
    print(f"GPU side alone (model, pre-loaded batches of {batch}, {dtype}): {gpu['hours_per_hour']:.0f} h/h")
    if tokenize["efficiency"] is not None:
        print(f"efficiency, end to end / slower side: {tokenize['efficiency']:.0%} (goal 80 %)")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in tokenize["stage_s_per_audio_hour"].items())
    print(f"seconds of work per hour of audio, by stage: {stages}")


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few files, one repeat")
    parser.add_argument("--sections", default="throughput,tokenize,frame", help="comma-separated subset")
    parser.add_argument("--codebooks", type=int, default=DEFAULT_CODEBOOKS)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--skip-reference", action="store_true", help="do not time transformers")
    parser.add_argument("--corpus-files", type=int, default=600)
    parser.add_argument("--min-seconds", type=float, default=5.0, help="shortest corpus file")
    parser.add_argument("--max-seconds", type=float, default=55.0, help="longest corpus file")
    parser.add_argument("--tokenize-batch-size", type=int, default=64)
    parser.add_argument("--tokenize-dtype", default="bfloat16", choices=SETTINGS)
    parser.add_argument(
        "--tokenize-jobs", type=int, default=os.cpu_count() or 1, help="`mimi tokenize --jobs` (readers)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - {"throughput", "tokenize", "frame"}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wants_cuda = args.device.startswith("cuda")
    if wants_cuda and not torch.cuda.is_available():
        print(
            "bench-gpu: no CUDA device is visible (--device cpu --smoke checks the script)", file=sys.stderr
        )
        raise SystemExit(2)
    if not wants_cuda and not args.smoke:
        print(f"bench-gpu: --device {args.device} needs --smoke (the figures are for GPUs)", file=sys.stderr)
        raise SystemExit(2)
    plan = Plan(args)
    env = {
        **describe(args.smoke),
        "device_name": torch.cuda.get_device_name(plan.device) if wants_cuda else "CPU",
        "cuda": torch.version.cuda,
        "codebooks": plan.codebooks,
        "clip_seconds": plan.clip_seconds,
        "tokenize_batch": plan.tokenize_batch,
        "tokenize_dtype": plan.tokenize_dtype,
        "tokenize_jobs": plan.tokenize_jobs,
    }
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mimi-bench-gpu-") as tmp:
        workdir = Path(tmp)
        folder = workdir / "weights"
        write_hub_layout(folder, plan.config, random_state(plan.config, SEED))
        if "throughput" in plan.sections:
            figures["throughput"] = bench_throughput(plan, folder)
        if "tokenize" in plan.sections:
            figures["tokenize"] = bench_tokenize(plan, folder, workdir)
        if "frame" in plan.sections:
            figures["frame"] = bench_frame(plan, folder)
    print_report(env, figures)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "figures": figures}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
