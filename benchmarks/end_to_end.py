"""End to end from the command line: `mimi encode|decode` against a plain transformers script, and where a
cold `mimi` process spends its time. Used by `speed.py` (`make bench`).

Every measurement is a fresh process, from its start until its output is on disk. An untimed round of
the short input's commands warms the page cache (and mimi's fingerprint cache) for every tool alike;
then `repeats` rounds run every command once each, interleaved, so that a burst of load from another
process slows every contender of that round; the best time of each command is kept.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# What a user of transformers would write: import, load, read, encode or decode, save.
REFERENCE_SCRIPT = """\
import sys

import numpy as np
import soundfile as sf
import torch
import transformers

step, weights, src, dst, codebooks = sys.argv[1:6]
model = transformers.MimiModel.from_pretrained(weights).eval()
with torch.inference_mode():
    if step == "encode":
        audio, rate = sf.read(src, dtype="float32")
        codes = model.encode(torch.from_numpy(audio)[None, None], num_quantizers=int(codebooks)).audio_codes
        np.save(dst, codes[0].numpy().astype(np.int16))
    else:
        codes = torch.from_numpy(np.load(src).astype(np.int64))[None]
        sf.write(dst, model.decode(codes).audio_values[0, 0].numpy(), 24000)
"""


Command = tuple[list[str], Path]  # argv, and the folder it runs in (whose mimi_cli it imports)


def commands(
    folder: Path,
    workdir: Path,
    wavs: dict[float, Path],
    codebooks: int,
    reference: bool,
    baseline: Path | None = None,
) -> dict[str, Command]:
    """The command lines to time, by label: `import torch`, then mimi and transformers for each input.

    `baseline`: another checkout of mimi-cli, timed as "mimi@baseline" beside this one.
    """
    script = workdir / "reference.py"
    script.write_text(REFERENCE_SCRIPT)
    python, mimi = sys.executable, [sys.executable, "-m", "mimi_cli"]
    common = ["--weights", str(folder), "--force", "--quiet"]
    trees = {"mimi": ROOT, **({"mimi@baseline": baseline.resolve()} if baseline else {})}
    out: dict[str, Command] = {"python -c 'import torch'": ([python, "-c", "import torch"], ROOT)}
    for seconds, wav in wavs.items():
        packed, codes, k = workdir / f"{seconds:g}.mimi", workdir / f"{seconds:g}.npy", str(codebooks)
        for name, tree in trees.items():
            encode = [*mimi, "encode", str(wav), str(packed), "--codebooks", k, *common]
            out[f"{name} encode {seconds:g} s"] = (encode, tree)
        if reference:
            encode = [python, str(script), "encode", str(folder), str(wav), str(codes), k]
            out[f"transformers encode {seconds:g} s"] = (encode, ROOT)
        for name, tree in trees.items():
            decode = [*mimi, "decode", str(packed), str(workdir / "rec.wav"), *common]
            out[f"{name} decode {seconds:g} s"] = (decode, tree)
        if reference:
            decode = [python, str(script), "decode", str(folder), str(codes), str(workdir / "ref.wav"), k]
            out[f"transformers decode {seconds:g} s"] = (decode, ROOT)
    return out


def run_rounds(cmds: dict[str, Command], repeats: int, env: dict[str, str], warm: set[str]) -> dict[str, Any]:
    """{label: {"s": best wall seconds, "runs_s": [...]}} or {"error": "..."} when a command fails.

    Round 0 runs only the commands labelled in `warm` (enough to warm the caches), untimed.
    """
    times: dict[str, list[float]] = {label: [] for label in cmds}
    for round_ in range(repeats + 1):
        for label, (cmd, tree) in cmds.items():
            if not round_ and label not in warm:
                continue
            start = time.perf_counter()
            proc = subprocess.run(
                cmd, capture_output=True, text=True, cwd=tree, env={**env, "PYTHONPATH": str(tree)}
            )
            elapsed = time.perf_counter() - start
            if proc.returncode != 0:
                lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
                return {"error": f"{label}: {lines[-1]}"}
            if round_:
                times[label].append(elapsed)
            print(f"  round {round_}/{repeats}: {label}: {elapsed:.2f} s", file=sys.stderr, flush=True)
    return {label: {"s": min(runs), "runs_s": runs} for label, runs in times.items()}


def bench_end_to_end(
    folder: Path,
    workdir: Path,
    wavs: dict[float, Path],
    repeats: int,
    codebooks: int,
    reference: bool,
    baseline: Path | None = None,
    warm: bool = True,
) -> dict[str, Any]:
    """{label: figures} of every command line (see `run_rounds`); `warm`: False skips the untimed round."""
    env = {**os.environ, "MIMI_CACHE_DIR": str(workdir / "cache")}  # never the user's cache
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cmds = commands(folder, workdir, wavs, codebooks, reference, baseline)
    shortest = f" {min(wavs):g} s"  # the short input's commands warm the same caches as the long one's
    warming = {label for label in cmds if warm and label.endswith(shortest)}
    return run_rounds(cmds, repeats, env, warming)


def print_end_to_end(results: dict[str, Any], codebooks: int, repeats: int) -> None:
    print(f"\n## End to end from the command line ({codebooks} codebooks, best of {repeats}, one run)\n")
    if "error" in results:
        print(f"not available: {results['error']}")
        return
    torch_s = results["python -c 'import torch'"]["s"]
    print(f"`python -c 'import torch'`: {torch_s:.2f} s\n")
    has_baseline = any(label.startswith("mimi@baseline") for label in results)
    extra = " mimi@baseline | baseline ÷ mimi |" if has_baseline else ""
    print(f"| input | step | mimi | transformers script | transformers ÷ mimi | mimi ÷ import torch |{extra}")
    print("|---|---|---:|---:|---:|---:|" + ("---:|---:|" if has_baseline else ""))
    lengths = sorted({label.split()[-2] for label in results if label.startswith("mimi ")}, key=float)
    for seconds in reversed(lengths):
        for step in ("encode", "decode"):
            ours = results[f"mimi {step} {seconds} s"]["s"]
            ref = results.get(f"transformers {step} {seconds} s")
            row = f"| {seconds} s | {step} | {ours:.2f} s | "
            row += f"{ref['s']:.2f} s | {ref['s'] / ours:.2f} |" if ref else "- | - |"
            row += f" {ours / torch_s:.2f} |"
            if has_baseline:
                before = results[f"mimi@baseline {step} {seconds} s"]["s"]
                row += f" {before:.2f} s | {before / ours:.2f} |"
            print(row)


# ----------------------------------------------------------------------------- cold-process breakdown

BREAKDOWN_SCRIPT = """\
import json, sys, time

clock = lambda: (time.perf_counter(), time.process_time())
marks = [("start", clock())]
import torch
marks.append(("import torch", clock()))
from mimi_cli import codec, weights
from mimi_cli.allocator import keep_freed_memory
from mimi_cli.cli import common
marks.append(("import mimi_cli (cli, codec, weights)", clock()))
keep_freed_memory()  # as the commands do
folder, wav, packed, rec = sys.argv[1:5]
model = weights.load_model(folder, "cpu")
marks.append(("load weights (fingerprint cached)", clock()))
files = weights.resolve_weights(folder)
state = weights.to_hub_layout(weights.read_state_dict(files.weights), weights.load_config(files))
weights.fingerprint(state)
marks.append(("fingerprint, computed (what the cache saves)", clock()))
from mimi_cli import audio
audio.read_audio(wav)
marks.append(("read the input", clock()))
codec.encode_file(model, wav, packed, int(sys.argv[5]))
marks.append(("encode_file, first call", clock()))
codec.encode_file(model, wav, packed, int(sys.argv[5]))
marks.append(("encode_file, second call (steady)", clock()))
codec.decode_file(model, packed, rec, force=True)
marks.append(("decode_file, first call", clock()))
codec.decode_file(model, packed, rec, force=True)
marks.append(("decode_file, second call (steady)", clock()))
import numpy as np
with audio.AudioWriter(rec, 24000) as writer:
    writer.write(np.zeros(int(float(sys.argv[6]) * 24000), np.float32))
marks.append(("write the decoded WAV", clock()))
print(json.dumps([(label, now[0] - then[0], now[1] - then[1])
                  for (_, then), (label, now) in zip(marks, marks[1:])]))
"""


def bench_breakdown(folder: Path, workdir: Path, wav: Path, seconds: float, codebooks: int) -> dict[str, Any]:
    """Wall and CPU seconds of each stage of a cold process (best of 2 processes, stage by stage)."""
    import json

    script = workdir / "breakdown.py"
    script.write_text(BREAKDOWN_SCRIPT)
    env = {**os.environ, "MIMI_CACHE_DIR": str(workdir / "cache"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(script), str(folder), str(wav), str(workdir / "bd.mimi")]
    cmd += [str(workdir / "bd.wav"), str(codebooks), str(seconds)]
    best: dict[str, list[float]] = {}
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
        for label, wall, cpu in json.loads(proc.stdout.strip().splitlines()[-1]):
            old = best.get(label)
            best[label] = [wall, cpu] if old is None or wall < old[0] else old
    return {label: {"wall_s": w, "cpu_s": c} for label, (w, c) in best.items()}


def print_breakdown(results: dict[str, Any], seconds: float) -> None:
    print(f"\n## Where a cold `mimi` process spends its time ({seconds:g} s input; best of 2 processes)\n")
    if "error" in results:
        print(f"not available: {results['error']}")
        return
    print("| stage | wall s | CPU s (all threads) |")
    print("|---|---:|---:|")
    for label, fig in results.items():
        print(f"| {label} | {fig['wall_s']:.2f} | {fig['cpu_s']:.2f} |")
    for step in ("encode", "decode"):
        first = results[f"{step}_file, first call"]["wall_s"]
        steady = results[f"{step}_file, second call (steady)"]["wall_s"]
        print(
            f"\nfirst-call cost of {step}: {first - steady:+.2f} s ({first:.2f} first, {steady:.2f} steady)"
        )
