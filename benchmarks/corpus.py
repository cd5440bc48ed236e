"""Corpus throughput: `mimi tokenize` with the local engine and with Ray, on the same corpus.

What it measures (everything under a temporary directory):
  100 short speech-like files (2–6 s; WAV and FLAC; 16, 22.05 and 44.1 kHz; mono and stereo, made as
  for bench-batch) are tokenised by the real CLI, `mimi tokenize SRC OUT -w WEIGHTS --json -q`, as a
  subprocess into a fresh OUT each time, with random full-size weights and the default 16 codebooks:
    local        --engine local (torch on every core)
    local, 1 torch thread   the same with OMP_NUM_THREADS=1, as in a Ray encoder actor of 1 CPU
    ray (own)    --engine ray: a Ray instance started for the run and stopped after it
    ray (head)   --engine ray --address: a Ray head already running on 127.0.0.1 (started here)
    s3 → s3      --engine local, SRC and OUT_DIR in a bucket of moto's S3 server on 127.0.0.1
    s3, ray 2 nodes   --engine ray --address: the head and a second node (each its own `ray start` on
                 127.0.0.1), SRC and OUT_DIR in the bucket
  and a listing: `open_source` of a prefix of 100,000 objects made in the server, in 100 folders (its
  wall time, the listing process's CPU time, its peak memory, and the plan's bytes per object; moto
  answers each request in time linear in the bucket, so the wall time is mostly the server's: the CPU
  time and memory are ours), beside the same for one folder of 1,000 of them (what grows with the
  count is the difference) and for a .txt list naming the 100,000 objects by URL (no listing).

Peak memory of a run: the largest total proportional set size (Pss, /proc/PID/smaps_rollup) of every
process of the run, sampled every 50 ms: the `mimi` process, its reader processes, and for Ray every
process of the Ray instance it starts or of the cluster it joins (the head's, the second node's: their
idle footprint included). Not getrusage: on Linux a child's ru_maxrss starts from the RSS of the
process that forked it (the high-water mark survives exec), and this process holds moto's objects.
"bytes = local" says whether the run's shard files are those of the local run of the same torch thread
count, byte for byte ("local" for 2 threads, "local, 1 torch thread" for the Ray rows, whose actors run
one thread each).

How to read it: "h audio / h" is hours of audio tokenised per hour of wall time (= × real time),
end to end (interpreter start-up, weight loading and, for Ray, joining or starting the cluster and
the actors loading their weights, included). "Ray overhead" is the Ray run's wall time ÷ the local
run's: above 1 is what Ray costs on one machine, where it cannot add hardware; on a cluster it buys
more machines. All runs must write the same rows, their codes equal but for float-rounding near-ties
(at most 0.1 % of quantizer decisions flipped, as the suite allows); the script checks that. It also
measures the share of the CPUs other processes used during each run (noisy above 10 %).

`--smoke` checks the script in seconds: 6 files, a tiny model, the local engine's two runs and S3 → S3,
a listing of 1,000 objects (Ray takes seconds to start a cluster and its actors; tests/test_corpus_ray.py
covers that engine).

(The file is not named tokenize.py: a script's folder goes first on sys.path, and a `tokenize.py`
there would shadow the standard library's `tokenize`, which torch imports.)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from batch import BUSY, SEED, busy_cpu_seconds, children_cpu_seconds, make_files  # noqa: E402
from codes import flipped_decisions  # noqa: E402  (tests/: how the suite counts near-tie flips)
from corpora import env as ray_env  # noqa: E402
from corpora import parts, ray_head_on_localhost, ray_node_on_localhost  # noqa: E402
from machine import describe, header, load_average  # noqa: E402  (benchmarks/, the script's folder)
from s3server import client, objects, s3_environment, s3_server, upload  # noqa: E402
from weights_factory import TINY_CONFIG, random_state, write_hub_layout  # noqa: E402

from mimi_cli.config import MimiConfig  # noqa: E402

MIMI = Path(sys.executable).with_name("mimi")
MAX_FLIPPED = 0.001  # the suite's MAX_CODE_MISMATCH (tests/test_streaming.py, test_parity.py)


def tokenize(
    src: str,
    out: str,
    weights: Path,
    options: list[str],
    shard_size: int,
    threads: int | None,
    extra_env: dict[str, str] | None = None,
    sessions: tuple[int, ...] = (),
) -> dict[str, Any]:
    """One `mimi tokenize` run into a fresh `out` (a folder, or a prefix the caller emptied): wall
    seconds, its JSON summary, others' CPU share, peak memory (MiB).

    `threads`: torch threads of the local engine (None: torch's default, one per core). `sessions`: the
    sessions of a Ray cluster the run joins, whose processes count in its memory."""
    if "://" not in out:
        shutil.rmtree(out, ignore_errors=True)
    cmd = [str(MIMI), "tokenize", src, out, "-w", str(weights), "--json", "-q"]
    cmd += ["--shard-size", str(shard_size), *options]
    environment = {k: v for k, v in ray_env(**(extra_env or {})).items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    return run_sampled(cmd, environment, sessions)


def run_sampled(cmd: list[str], environment: dict[str, str], sessions: tuple[int, ...]) -> dict[str, Any]:
    """Run a `mimi ... --json` command in a session of its own: wall seconds, its JSON summary, others'
    share of the CPUs, and the peak of the summed Pss of its session's processes and `sessions`'."""
    busy, ours = busy_cpu_seconds(), children_cpu_seconds()
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, pss_of_sessions({proc.pid, *sessions}))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    busy_after, ours = busy_cpu_seconds(), children_cpu_seconds() - ours
    others = None
    if busy is not None and busy_after is not None:
        others = max(0.0, (busy_after - busy - ours) / (wall * (os.cpu_count() or 1)))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}\n{stderr.strip()}")
    try:
        summary = json.loads(stdout)
    except json.JSONDecodeError:
        summary = {}
    return {"wall": wall, "summary": summary, "others": others, "peak_mib": peak / 2**20}


def pss_of_sessions(sessions: set[int]) -> int:
    """Bytes: the summed proportional set size of every process in `sessions` (shared pages counted
    once over the processes sharing them)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) not in sessions:
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError):
            continue  # gone meanwhile
    return total


LISTING = """
import json, resource, sys, time
from mimi_cli.corpus.sources import open_source
start = time.perf_counter()
source = open_source(sys.argv[1])
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"inputs": len(source.inputs), "seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime,
                  "peak_mib": int(status["VmHWM"].split()[0]) / 1024,
                  "plan_bytes": source.inputs.nbytes / len(source.inputs)}))
"""  # VmHWM: this process's own peak (ru_maxrss would start from the benchmark's RSS at the fork)


def listing(endpoint: str, count: int, folder: Path) -> dict[str, Any]:
    """`count` objects made in the server's bucket, in 100 folders (directly in its backend: fast), then
    listed by `open_source` in a process of its own: the whole prefix, one folder of them, and a .txt
    list naming them all by URL. Each: wall seconds, CPU seconds, peak memory, plan bytes per input."""
    from moto.backends import get_backend

    client(endpoint).create_bucket(Bucket="listing")
    backend = get_backend("s3")["123456789012"]["global"]
    names = [f"many/d{i % 100:02d}/f{i:06d}.wav" for i in range(count)]
    for name in names:
        backend.put_object("listing", name, b"RIFF")
    urls = folder / "urls.txt"
    urls.write_text("".join(f"s3://listing/{name}\n" for name in names))
    environment = ray_env(**s3_environment(endpoint))
    out = {"objects": count}
    for label, src in (("prefix", "s3://listing/many"), ("folder", "s3://listing/many/d00"), ("list", urls)):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", LISTING, str(src)], env=environment, capture_output=True, text=True
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"listing {src}: exit {proc.returncode}\n{proc.stderr.strip()}")
        out[label] = {"wall": wall, **json.loads(proc.stdout)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100, help="number of input files (at least 100)")
    parser.add_argument("--shard-size", type=int, default=25, help="inputs per shard")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="6 files, tiny model: checks the script")
    args = parser.parse_args(argv)
    if args.files < 1 or args.shard_size < 1:
        parser.error("--files and --shard-size must be at least 1")
    if args.smoke:
        args.files, args.shard_size = 6, 2

    info: dict[str, Any] = {**describe(args.smoke), "files": args.files}
    info["model"] = "tiny" if args.smoke else "full-size"
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mimi-bench-tokenize-") as tmp:
        work = Path(tmp)
        weights = work / "weights"
        config = TINY_CONFIG if args.smoke else MimiConfig()
        write_hub_layout(weights, config, random_state(config, SEED))
        info["audio_s"] = make_files(work / "in", args.files, SEED)
        shards: dict[str, dict[str, bytes]] = {}

        def measure(label: str, options: list[str], threads: int | None = None, sessions=()) -> None:
            out = work / "out"
            results[label] = tokenize(
                str(work / "in"), str(out), weights, options, args.shard_size, threads, sessions=sessions
            )
            shards[label] = {p.name: p.read_bytes() for p in parts(out)}

        def measure_s3(label: str, endpoint: str, options: list[str], sessions=()) -> None:
            prefix = label.replace(" ", "-").replace(",", "").replace("→", "to")
            src, out = "s3://bench/in", f"s3://bench/{prefix}"
            results[label] = tokenize(
                src, out, weights, options, args.shard_size, None, s3_environment(endpoint), sessions
            )
            stored = objects(endpoint, "bench", prefix)
            shards[label] = {n: d for n, d in stored.items() if n.startswith("part-")}

        measure("local", ["--engine", "local"])
        measure("local, 1 torch thread", ["--engine", "local"], threads=1)
        if not args.smoke:
            measure("ray (own)", ["--engine", "ray"])
            head: list[int] = []
            with ray_head_on_localhost(cpus=os.cpu_count() or 1, sessions=head) as address:
                measure("ray (head)", ["--engine", "ray", "--address", address], sessions=tuple(head))
        with s3_server() as endpoint:
            client(endpoint).create_bucket(Bucket="bench")
            upload(endpoint, work / "in", "bench", "in")
            measure_s3("s3 → s3", endpoint, ["--engine", "local"])
            if not args.smoke:
                cpus = max(1, (os.cpu_count() or 2) // 2)
                head = []
                with ray_head_on_localhost(cpus=cpus, sessions=head) as address:
                    with ray_node_on_localhost(
                        address, cpus, Path(tempfile.mkdtemp(prefix="rayn", dir="/tmp"))
                    ) as node:
                        options = ["--engine", "ray", "--address", address]
                        measure_s3("s3, ray 2 nodes", endpoint, options, (*head, node.pid))
            info["listing"] = listing(endpoint, 1000 if args.smoke else 100_000, work)
        info["load_after"] = load_average()
        info["agreement"] = compare_shards(
            {k: {n: table(d) for n, d in v.items()} for k, v in shards.items()}
        )
        info["identical"] = identical_bytes(shards)
    report(info, results)
    if args.json:
        args.json.write_text(json.dumps({"env": info, "results": results}, indent=2) + "\n")
    if not info["agreement"]["same_rows"] or info["agreement"]["flipped"] > MAX_FLIPPED:
        raise SystemExit("the engines wrote different datasets")
    if not info["identical"].get("s3 → s3", True):
        raise SystemExit("S3 → S3 wrote other shard files than local → local")


def table(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))


def reference_of(label: str) -> str:
    """The local run of the same torch thread count: Ray's encoder actors run one thread each."""
    return "local, 1 torch thread" if "ray" in label else "local"


def identical_bytes(shards: dict[str, dict[str, bytes]]) -> dict[str, bool]:
    """Per run: whether its shard files are, byte for byte, those of `reference_of` it."""
    return {
        label: bool(files) and files == shards[reference_of(label)]
        for label, files in shards.items()
        if label != reference_of(label)
    }


def compare_shards(shards: dict[str, dict[str, pa.Table]]) -> dict[str, Any]:
    """How the engines' shards agree with the local engine's: the same files, rows and columns but for
    the codes (`same_rows`), whether every table is equal (`identical`), and the share of quantizer
    decisions that flipped (`flipped`, as tests/codes.py counts them) over `decisions`.

    Engines that run torch on other thread counts sum in other orders, and on some machines (an Intel
    Xeon's oneDNN) that flips a rare float-rounding near-tie: 1 decision in 81,264 here."""
    reference = shards["local"]
    same_rows, identical, flipped, decisions = len(reference) > 0, True, 0.0, 0
    for tables in shards.values():
        same_rows &= sorted(tables) == sorted(reference)
        for name in set(tables) & set(reference):
            table, expected = tables[name], reference[name]
            identical &= table.equals(expected)
            same_rows &= table.drop(["codes"]).equals(expected.drop(["codes"]))
            for codes, wanted in zip(table["codes"].to_pylist(), expected["codes"].to_pylist(), strict=True):
                codes, wanted = np.asarray(codes), np.asarray(wanted)
                same_rows &= codes.shape == wanted.shape
                if codes.shape == wanted.shape:
                    flipped += flipped_decisions(codes, wanted) * codes.size
                    decisions += codes.size
    share = flipped / max(decisions, 1)
    return {
        "same_rows": bool(same_rows),
        "identical": bool(identical),
        "flipped": share,
        "decisions": decisions,
    }


def report(info: dict[str, Any], results: dict[str, dict[str, Any]]) -> None:
    print(header(info))
    print(
        f"\n## mimi tokenize: {info['files']} files, {info['audio_s']:.0f} s of audio "
        f"({info['model']} random weights, 16 codebooks, batch size 1 on CPU)\n"
    )
    print(
        "| engine | end to end (s) | h audio / h | in run (s) | ÷ local | ÷ local 1 thread "
        "| peak memory (MiB) | ÷ local memory | bytes = local | others' CPU |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    local, single = results["local"]["wall"], results["local, 1 torch thread"]["wall"]
    memory = results["local"]["peak_mib"]
    for label, r in results.items():
        inner = r["summary"]["seconds"]
        others = "-" if r["others"] is None else f"{r['others']:.0%}"
        same = info["identical"].get(label)
        same_text = "(reference)" if same is None else ("yes" if same else "NO")
        print(
            f"| {label} | {r['wall']:.1f} | {info['audio_s'] / r['wall']:.1f} | {inner:.1f} "
            f"| {r['wall'] / local:.2f} | {r['wall'] / single:.2f} | {r['peak_mib']:.0f} "
            f"| {r['peak_mib'] / memory:.2f} | {same_text} | {others} |"
        )
    print(
        "\nRay overhead = a Ray run's wall time ÷ the local run's; the Ray encoder actors run torch on one"
        " thread each (Ray sets OMP_NUM_THREADS to an actor's CPUs), hence the like-for-like column."
    )
    agreement = info["agreement"]
    print(
        f"\nshards identical across engines: {'yes' if agreement['identical'] else 'no'}; "
        f"same files, rows and columns: {'yes' if agreement['same_rows'] else 'NO'}; "
        f"flipped quantizer decisions: {agreement['flipped']:.4%} of {agreement['decisions']} "
        f"(at most {MAX_FLIPPED:.1%}: float-rounding near-ties between thread counts)"
    )
    listed = info["listing"]
    prefix, folder, urls = listed["prefix"], listed["folder"], listed["list"]
    grown = (prefix["peak_mib"] - folder["peak_mib"]) * 2**20 / max(1, prefix["inputs"] - folder["inputs"])
    print(f"\nlisting in moto ({listed['objects']:,} objects in 100 folders; the listing process alone):")
    for label, r in (
        ("prefix s3://listing/many", prefix),
        ("one folder of it", folder),
        (".txt of URLs", urls),
    ):
        print(
            f"  {label}: {r['inputs']:,} inputs in {r['seconds']:.1f} s (process: {r['wall']:.1f} s wall, "
            f"{r['cpu']:.1f} s CPU, peak {r['peak_mib']:.0f} MiB; plan {r['plan_bytes']:.0f} bytes an input)"
        )
    print(f"  memory grown with the count: {grown:.0f} bytes an object (prefix ÷ one folder)")
    busiest = max((r["others"] for r in results.values() if r["others"] is not None), default=0.0)
    if busiest > BUSY:
        print(f"noisy: other processes used up to {busiest:.0%} of the CPUs during a run; run it again")


if __name__ == "__main__":
    main()
