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
  and a listing: `open_source` of a prefix of 100,000 objects made in the server (its wall time, the
  listing process's CPU time and peak memory; moto pages a listing in time linear in the bucket, so the
  wall time is mostly the server's: the CPU time and memory are ours).

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
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from batch import BUSY, SEED, make_files, run_measured  # noqa: E402
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
) -> dict[str, Any]:
    """One `mimi tokenize` run into a fresh `out` (a folder, or a prefix the caller emptied): wall
    seconds, its JSON summary, others' CPU share.

    `threads`: torch threads of the local engine (None: torch's default, one per core)."""
    if "://" not in out:
        shutil.rmtree(out, ignore_errors=True)
    cmd = [str(MIMI), "tokenize", src, out, "-w", str(weights), "--json", "-q"]
    cmd += ["--shard-size", str(shard_size), *options]
    environment = {k: v for k, v in ray_env(**(extra_env or {})).items() if k != "OMP_NUM_THREADS"}
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    return run_measured(cmd, environment)


LISTING = """
import json, resource, sys, time
from mimi_cli.corpus.sources import open_source
start = time.perf_counter()
source = open_source(sys.argv[1])
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"inputs": len(source.inputs), "seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime,
                  "peak_mib": usage.ru_maxrss / 1024}))
"""


def listing(endpoint: str, count: int) -> dict[str, Any]:
    """`count` objects made in the server's bucket (directly in its backend: fast), then SRC listed by
    `open_source` in a process of its own: wall seconds, CPU seconds and peak memory of that process."""
    from moto.backends import get_backend

    client(endpoint).create_bucket(Bucket="listing")
    backend = get_backend("s3")["123456789012"]["global"]
    for i in range(count):
        backend.put_object("listing", f"many/d{i % 100:02d}/f{i:06d}.wav", b"RIFF")
    environment = ray_env(**s3_environment(endpoint))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", LISTING, "s3://listing/many"], env=environment, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"listing {count} objects: exit {proc.returncode}\n{proc.stderr.strip()}")
    return {"objects": count, "wall": wall, **json.loads(proc.stdout)}


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
        shards: dict[str, dict[str, pa.Table]] = {}

        def measure(label: str, options: list[str], threads: int | None = None) -> None:
            out = work / "out"
            results[label] = tokenize(str(work / "in"), str(out), weights, options, args.shard_size, threads)
            shards[label] = {p.name: pq.read_table(p) for p in parts(out)}

        def measure_s3(label: str, endpoint: str, options: list[str]) -> None:
            prefix = label.replace(" ", "-").replace(",", "").replace("→", "to")
            src, out = "s3://bench/in", f"s3://bench/{prefix}"
            results[label] = tokenize(
                src, out, weights, options, args.shard_size, None, s3_environment(endpoint)
            )
            stored = objects(endpoint, "bench", prefix)
            shards[label] = {
                n: pq.read_table(io.BytesIO(d)) for n, d in stored.items() if n.startswith("part-")
            }

        measure("local", ["--engine", "local"])
        measure("local, 1 torch thread", ["--engine", "local"], threads=1)
        if not args.smoke:
            measure("ray (own)", ["--engine", "ray"])
            with ray_head_on_localhost(cpus=os.cpu_count() or 1) as address:
                measure("ray (head)", ["--engine", "ray", "--address", address])
        with s3_server() as endpoint:
            client(endpoint).create_bucket(Bucket="bench")
            upload(endpoint, work / "in", "bench", "in")
            measure_s3("s3 → s3", endpoint, ["--engine", "local"])
            if not args.smoke:
                cpus = max(1, (os.cpu_count() or 2) // 2)
                with ray_head_on_localhost(cpus=cpus) as address:
                    with ray_node_on_localhost(
                        address, cpus, Path(tempfile.mkdtemp(prefix="rayn", dir="/tmp"))
                    ):
                        measure_s3("s3, ray 2 nodes", endpoint, ["--engine", "ray", "--address", address])
            info["listing"] = listing(endpoint, 1000 if args.smoke else 100_000)
        info["load_after"] = load_average()
        info["agreement"] = compare_shards(shards)
    report(info, results)
    if args.json:
        args.json.write_text(json.dumps({"env": info, "results": results}, indent=2) + "\n")
    if not info["agreement"]["same_rows"] or info["agreement"]["flipped"] > MAX_FLIPPED:
        raise SystemExit("the engines wrote different datasets")


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
    print("| engine | end to end (s) | h audio / h | in run (s) | ÷ local | ÷ local 1 thread | others' CPU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    local, single = results["local"]["wall"], results["local, 1 torch thread"]["wall"]
    for label, r in results.items():
        inner = r["summary"]["seconds"]
        others = "-" if r["others"] is None else f"{r['others']:.0%}"
        print(
            f"| {label} | {r['wall']:.1f} | {info['audio_s'] / r['wall']:.1f} | {inner:.1f} "
            f"| {r['wall'] / local:.2f} | {r['wall'] / single:.2f} | {others} |"
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
    print(
        f"\nlisting s3://listing/many ({listed['objects']:,} objects in moto, 100 folders): "
        f"{listed['inputs']:,} inputs in {listed['seconds']:.1f} s (process: {listed['wall']:.1f} s wall, "
        f"{listed['cpu']:.1f} s CPU, peak {listed['peak_mib']:.0f} MiB)"
    )
    busiest = max((r["others"] for r in results.values() if r["others"] is not None), default=0.0)
    if busiest > BUSY:
        print(f"noisy: other processes used up to {busiest:.0%} of the CPUs during a run; run it again")


if __name__ == "__main__":
    main()
