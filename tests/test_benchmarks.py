"""Every script in benchmarks/ runs here in its `--smoke` mode, as `make` starts it (a fresh
`python benchmarks/X.py` process), and prints the machine's header line and then every figure it
promises, each checked by its label and the shape of its value: a script that rots, or stops printing
a figure, fails here rather than on the day someone runs `make bench-*`. gpu.py's JSON figures are
checked too (its `--device cpu --smoke` runs every section; tests/test_bench_gpu.py has its refusals).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUM = r"[-+]?\d[\d,]*(\.\d+)?"
PCT = rf"({NUM}%|-)"
ANY = r"[^|]+"
HEADER = (
    rf"^machine: .+, \d+ cores, memory read {NUM} GB/s \(1 thread, \d+ MiB\); GPU: .+; "
    rf"torch \S+, Python \S+; \d{{4}}-\d\d-\d\dT\d\d:\d\d\S*; load average .+\(SMOKE RUN"
)


def row(label: str, *cells: str) -> str:
    """A Markdown table row: `label` (a literal) and cell patterns, "" for an empty cell."""
    return r"^\| " + re.escape(label) + r" \|" + "".join(rf" {c} \|" if c else r" \|" for c in cells) + "$"


def line(text: str, tail: str = "") -> str:
    """A line starting with the literal `text`, then the pattern `tail`."""
    return "^" + re.escape(text) + tail


X_RT = rf"{NUM} \({NUM} s\)"
STAGES = [
    "import torch",
    "import mimi_cli (cli, codec, weights)",
    "load weights (fingerprint cached)",
    "fingerprint, computed (what the cache saves)",
    "read the input",
    "encode_file, first call",
    "encode_file, second call (steady)",
    "decode_file, first call",
    "decode_file, second call (steady)",
    "write the decoded WAV",
]
SPEED = [
    row("ours", X_RT, X_RT),
    row("transformers", X_RT, X_RT),
    row("ratio ours/theirs", NUM, NUM),
    line("codes differing from the reference: ", rf"{NUM}%$"),
    line("decoded audio (same codes) max |ours - reference|: "),
    line("`python -c 'import torch'`: ", rf"{NUM} s$"),
    row("1 s", "encode", f"{NUM} s", f"{NUM} s", NUM, NUM),
    row("1 s", "decode", f"{NUM} s", f"{NUM} s", NUM, NUM),
    *(row(stage, NUM, NUM) for stage in STAGES),
    line("first-call cost of encode: ", rf"{NUM} s"),
    line("first-call cost of decode: ", rf"{NUM} s"),
]
MEMORY = [
    *(row(f"{m} min", step, f"{NUM} GB", f"{NUM}×") for m in ("0.1", "0.2") for step in ("encode", "decode")),
    line("encode: peak RSS grows ", rf"{NUM}% from 0.1 to 0.2 min$"),
    line("decode: peak RSS grows ", rf"{NUM}% from 0.1 to 0.2 min$"),
]
BATCH = [
    row("--jobs 1", NUM, NUM, NUM, NUM, NUM),
    r"^\| default \(--jobs \d+\)" + rf" \| {NUM}" * 5 + r" \|$",
    row("ratio default / --jobs 1", "", NUM, NUM, "", NUM),
    line("codes differing between the two settings (last runs): 0 of ", r"\d+"),
    line("runs (s): --jobs 1: ["),
    line("share of the CPUs used by other processes during each run: "),
]
CORPUS = [
    *(
        row(engine, NUM, NUM, NUM, NUM, NUM, NUM, NUM, r"(yes|NO|\(reference\))", PCT)
        for engine in ("local", "local, 1 torch thread")
    ),
    line("shards identical across engines: ", r"(yes|no); same files, rows and columns: yes; "),
]
LATENCY = [
    line(
        "one-frame routes (chosen by timing on this machine, cached): products: ",
        r"\w+, attention: \w+, elu: \w+, ",
    ),
    line("live run: 20 frames "),
    r"^per-frame compute, ms +median +p99 +max +bulk +× bulk$",
    *(rf"^{step} +{NUM} +{NUM} +{NUM} +{NUM} +{NUM}×$" for step in ("encode", "decode")),
    line("added latency, ms: ", rf"median {NUM}, p99 {NUM}, max {NUM} "),
    line("drift (median of the last minute − first minute): ", rf"{NUM} ms; last frame {NUM} ms; "),
    line("targets: encode median ≤ 20 ms: "),
]
GPU = [
    *(row(name, "float32", b, NUM, NUM, ANY) for name in ("mimi_cli", "transformers") for b in ("1", "2")),
    line("best encode: mimi_cli ", r".*; ratio mimi_cli / transformers "),
    line("best decode: mimi_cli ", r".*; ratio mimi_cli / transformers "),
    line("codes equal to transformers' (float32, batch 1): ", rf"{NUM}%$"),
    line("end to end: ", rf"{NUM} h of audio per hour"),
    line("CPU side alone (read + resample, ", rf"\d+ threads\): {NUM} h/h$"),
    line("GPU side alone (model, pre-loaded batches of 2, float32): ", rf"{NUM} h/h$"),
    line("efficiency, end to end / slower side: ", rf"{NUM}%"),
    line(
        "seconds of work per hour of audio, by stage: ", rf"read {NUM}, resample {NUM}, model {NUM}, write "
    ),
    row("float32", f"{NUM} / {NUM}", f"{NUM} / {NUM}"),
]


def check_gpu_figures(figures: dict) -> None:
    """gpu.py's --json figures of a CPU smoke run: every section measured, both models did the same work."""
    throughput = figures["throughput"]
    for name in ("mimi_cli", "transformers"):
        for batch in ("1", "2"):
            cell = throughput["cells"][name]["float32"][batch]
            assert cell["encode"]["xrt"] > 0 and cell["decode"]["xrt"] > 0
        assert {"encode", "decode"} <= set(throughput["best"][name])
    assert throughput["codes_equal_float32"] >= 0.99

    tokenize = figures["tokenize"]
    assert tokenize["files"] == 6 and tokenize["audio_hours"] > 0
    assert tokenize["cpu_side"]["hours_per_hour"] > 0 and tokenize["gpu_side"]["hours_per_hour"] > 0
    stages = tokenize["stage_s_per_audio_hour"]
    assert set(stages) == {"read", "resample", "model", "write"}
    assert all(v > 0 or math.isnan(v) for v in stages.values())
    assert tokenize["end_to_end"]["hours_per_hour"] > 0

    frame = figures["frame"]["float32"]
    assert frame["encode"]["median_ms"] > 0 and frame["decode"]["p99_ms"] >= frame["decode"]["median_ms"]


@pytest.mark.parametrize(
    ("script", "args", "figures", "check_json"),
    [
        pytest.param("speed.py", [], SPEED, None, id="speed"),
        pytest.param("memory.py", [], MEMORY, None, id="memory"),
        pytest.param("batch.py", [], BATCH, None, id="batch"),
        pytest.param("corpus.py", [], CORPUS, None, id="corpus"),
        pytest.param("latency.py", [], LATENCY, None, id="latency"),
        pytest.param("gpu.py", ["--device", "cpu"], GPU, check_gpu_figures, id="gpu"),
    ],
)
def test_smoke_run_prints_the_machine_then_every_figure(
    script: str, args: list[str], figures: list[str], check_json: Callable[[dict], None] | None, tmp_path
):
    saved = tmp_path / "figures.json"
    json_args = ["--json", str(saved)] if check_json else []
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", *args, *json_args]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    headers = [i for i, text in enumerate(lines) if re.match(HEADER, text)]
    assert headers, f"no machine header line in:\n{proc.stdout}"
    after_header = "\n".join(lines[headers[0] + 1 :])  # every figure comes below the header
    missing = [pattern for pattern in figures if not re.search(pattern, after_header, re.MULTILINE)]
    assert not missing, f"{script} --smoke did not print:\n" + "\n".join(missing) + f"\n\n{proc.stdout}"
    for sign in ("not available", "failed", "Traceback"):
        assert sign not in proc.stdout
    if check_json:
        check_json(json.loads(saved.read_text())["figures"])
