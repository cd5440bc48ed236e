"""The engines that run the read and encode stages over the units of the pending shards.

    local   reading threads → the model on this process's device → shards written here
    ray     Ray Data: read tasks (CPU) → an actor pool of encoders (weights loaded once per actor,
            one GPU each with --device cuda) → results streamed back to the driver, which writes shards

Both feed an `Assembler`, which writes a shard as soon as all its units are in. The assembler keys
results by (shard, unit) and ignores a unit it already holds, so a task Ray retries after a worker
died cannot put a row in twice; shards are written by rename, with bytes that depend on their inputs
only. ray is imported by the Ray engine only.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import MimiError
from .encoding import Audio, Encoded, Failed, Launched, encode_unit, finish_unit, launch_unit, read_unit
from .readers import Pending, reading_pool
from .shards import Shard, write_shard
from .sources import CellReader, Input
from .storage import Folder, worker_environment

if TYPE_CHECKING:
    import pyarrow as pa

    from ..model import MimiModel

RAY_INSTALL = "pip install 'mimi-cli[ray]'"
READ_MEMORY = 256 * 2**20  # bytes reserved per read task (a unit's audio, decoded and resampled)
Progress = Callable[[int, int, float], None]
"""Called with (shards done, shards to do, seconds of audio encoded so far)."""


class Assembler:
    """Collects unit results and writes each shard when its last unit arrives; duplicates are dropped."""

    def __init__(
        self,
        out_dir: Folder,
        shards: list[Shard],
        batch_size: int,
        carried: Callable[[Shard], pa.Table | None],
        progress: Progress | None = None,
    ) -> None:
        self.out_dir, self.batch_size, self.carried, self.progress = out_dir, batch_size, carried, progress
        self.shards = {s.index: s for s in shards}
        self.expected = {s.index: -(-s.size // batch_size) for s in shards}
        self.parts: dict[int, dict[int, list[Encoded | Failed]]] = {}
        self.metas: dict[int, dict[str, Any]] = {}
        self.audio_seconds = 0.0

    def add(self, shard: int, unit: int, results: list[Encoded | Failed]) -> None:
        if shard in self.metas or unit in self.parts.get(shard, {}):
            return  # a retried task delivered this unit again
        parts = self.parts.setdefault(shard, {})
        parts[unit] = results
        self.audio_seconds += sum(r.duration for r in results if isinstance(r, Encoded))
        if len(parts) < self.expected[shard]:
            return
        ordered = [r for u in range(self.expected[shard]) for r in parts[u]]
        s = self.shards[shard]
        self.metas[shard] = write_shard(self.out_dir, s, ordered, self.carried(s))
        del self.parts[shard]
        if self.progress:
            self.progress(len(self.metas), len(self.shards), self.audio_seconds)

    def check_done(self) -> None:
        missing = sorted(set(self.shards) - set(self.metas))
        if missing:  # cannot happen unless the engine lost a unit
            raise MimiError(f"the engine returned no results for shards {missing[:5]}")


def run_local(
    model: MimiModel,
    num_codebooks: int,
    shards: list[Shard],
    assembler: Assembler,
    audio_column: str,
    workers: int,
    processes: bool = False,
) -> None:
    """Read inputs in `workers` threads (or processes), encode each unit, hand them over in order.

    Inputs are read one per task, so that all the readers work on a unit of `--batch-size` inputs;
    reads run ahead by two units, or by twice the readers' count of inputs when units are small.
    One unit is in flight on the model's device while the next is read, batched and queued.
    """
    units = ((s.index, u, unit) for s in shards for u, unit in enumerate(s.units(assembler.batch_size)))
    workers = max(1, workers)
    with reading_pool(workers, processes, audio_column) as submit:
        ahead: deque[tuple[int, int, list[Input], list[Pending]]] = deque()
        pending = units  # a shard's inputs are taken from the plan as its units are reached
        reading = 0  # inputs submitted and not yet handed to the model
        in_flight: tuple[int, int, Launched] | None = None  # queued on the device, not yet collected
        while True:
            while len(ahead) < 2 or reading < 2 * workers:
                entry = next(pending, None)
                if entry is None:
                    break
                shard, u, unit = entry
                ahead.append((shard, u, unit, [submit(item) for item in unit]))
                reading += len(unit)
            if not ahead:
                break
            shard, u, unit, waits = ahead.popleft()
            reading -= len(unit)
            read = [result for wait in waits for result in wait()]
            launched = launch_unit(model, num_codebooks, unit, read)
            if in_flight is not None:  # collected once the next unit is queued behind it
                assembler.add(in_flight[0], in_flight[1], finish_unit(in_flight[2]))
            in_flight = (shard, u, launched)
        if in_flight is not None:
            assembler.add(in_flight[0], in_flight[1], finish_unit(in_flight[2]))


# ---------------------------------------------------------------------------------------------- ray


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MimiError(f"--engine ray needs Ray Data: {RAY_INSTALL}") from None
    return ray


def run_ray(
    address: str | None,
    load: dict[str, Any],
    num_codebooks: int,
    shards: list[Shard],
    assembler: Assembler,
    audio_column: str,
    actors: int | None,
) -> None:
    """Run the units as a Ray Data pipeline on the cluster at `address` (None: a local Ray for this run).

    `load`: the keyword arguments of `weights.load_model` each encoder actor calls once.
    """
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        logging.getLogger("ray").setLevel(logging.ERROR)  # Ray's notices would drown the CLI's lines
        ray.init(
            address=_ray_address(address),
            include_dashboard=False if address is None else None,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
    try:
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # configured by Ray Data on import
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        gpu = str(load.get("device", "")).startswith("cuda")
        resources = ray.cluster_resources()
        if actors is None:
            actors = (
                max(1, int(resources.get("GPU", 0))) if gpu else max(1, int(resources.get("CPU", 1)) // 2)
            )
        size = assembler.batch_size
        rows = [  # a unit by its place in the plan: 4 integers, not its inputs
            {"shard": s.index, "unit": u, "start": start, "stop": min(start + size, s.stop)}
            for s in shards
            for u, start in enumerate(range(s.start, s.stop, size))
        ]
        plan = ray.put(shards[0].source) if shards else None  # the plan's columns, once in the object store
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        # Reading runs as tasks of its own: its memory reservation differs from the actors' options,
        # which keeps Ray from fusing both stages into the actors (the GPU would wait for the decoding).
        dataset = dataset.map(
            _read_row,
            fn_kwargs={
                "audio_column": audio_column,
                "storage": ray.put(worker_environment()),
                "plan": plan,
            },
            num_cpus=1,
            memory=READ_MEMORY,
        )
        dataset = dataset.map_batches(
            _Encoder,
            fn_constructor_kwargs={"load": load, "num_codebooks": num_codebooks},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
            num_gpus=1 if gpu else 0,
        )
        for row in dataset.iter_rows():
            assembler.add(int(row["shard"]), int(row["unit"]), _results(row))
    except ray.exceptions.RayError as e:
        raise MimiError(f"the Ray pipeline failed: {_first_line(e)}") from e
    finally:
        if started_here:
            ray.shutdown()


def _ray_address(address: str | None) -> str:
    """ray.init's address: "local" starts a Ray for this run (None would join one found on this machine)."""
    if address is None:
        return "local"
    if address == "auto" or address.startswith("ray://"):
        return address
    return address if ":" in address else f"{address}:6379"


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _read_row(row: dict[str, Any], audio_column: str, storage: Any, plan: Any) -> dict[str, Any]:
    """Read stage (a Ray task): the unit's audio as one float32 buffer, and what each input was.

    `storage`: a reference to the driver's storage variables (`storage.worker_environment`). The secrets
    among them travel as an object only: a task's arguments and a job's runtime_env are written to
    Ray's logs (the runtime env agent logs every variable), an object's value is not. `plan`: a
    reference to the plan (`sources.Inputs`), whose inputs start … stop-1 are the unit's.
    """
    import ray

    os.environ.update(ray.get(storage) if isinstance(storage, ray.ObjectRef) else storage)
    inputs = ray.get(plan) if isinstance(plan, ray.ObjectRef) else plan
    unit = inputs.slice(int(row["start"]), int(row["stop"]))
    read = read_unit(unit, _worker_cells(audio_column))
    described = [
        {"error": r.error}
        if isinstance(r, Failed)
        else [len(r.audio), r.sample_rate, r.num_samples, r.channels]
        for r in read
    ]
    audio = [r.audio for r in read if isinstance(r, Audio)]
    data = np.concatenate(audio).astype(np.float32).tobytes() if audio else b""
    return {
        "shard": row["shard"],
        "unit": row["unit"],
        "ids": json.dumps([item.id for item in unit]),
        "read": json.dumps(described),
        "audio": data,
    }


@functools.cache
def _worker_cells(audio_column: str) -> CellReader:
    """One reader per worker process: the read tasks it runs share its row groups and tar cursors (a
    tar is streamed on from where the previous unit left it, not from its start)."""
    return CellReader(audio_column)


class _Encoder:
    """Encode stage (a Ray actor): loads the weights once, then encodes one unit per call."""

    def __init__(self, load: dict[str, Any], num_codebooks: int) -> None:
        from ..weights import load_model

        self.model = load_model(**load)
        self.num_codebooks = num_codebooks

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {"shard": [], "unit": [], "results": [], "codes": []}
        for shard, u, ids, read, audio in zip(
            batch["shard"], batch["unit"], batch["ids"], batch["read"], batch["audio"], strict=True
        ):
            unit = [Input(name, "") for name in json.loads(ids)]  # encoding needs their ids only
            results = encode_unit(self.model, self.num_codebooks, unit, _unpack_read(unit, read, audio))
            codes = [r.codes for r in results if isinstance(r, Encoded)]
            out["shard"].append(int(shard))
            out["unit"].append(int(u))
            out["results"].append(json.dumps([_describe(r) for r in results]))
            out["codes"].append(b"".join(c.tobytes() for c in codes))
        return {key: np.array(values, dtype=object) for key, values in out.items()}


def _unpack_read(unit: list[Input], read: str, audio: bytes) -> list[Audio | Failed]:
    samples = np.frombuffer(audio, np.float32)
    out: list[Audio | Failed] = []
    offset = 0
    for item, d in zip(unit, json.loads(read), strict=True):
        if isinstance(d, dict):
            out.append(Failed(item.id, d["error"]))
            continue
        length, rate, num_samples, channels = d
        out.append(Audio(samples[offset : offset + length], rate, num_samples, channels))
        offset += length
    return out


def _describe(r: Encoded | Failed) -> dict[str, Any]:
    if isinstance(r, Failed):
        return {"id": r.id, "error": r.error}
    return {"id": r.id, "shape": list(r.codes.shape), "original": [r.sample_rate, r.num_samples, r.channels]}


def _results(row: dict[str, Any]) -> list[Encoded | Failed]:
    data = np.frombuffer(row["codes"], np.int16)
    out: list[Encoded | Failed] = []
    offset = 0
    for d in json.loads(row["results"]):
        if "error" in d:
            out.append(Failed(d["id"], d["error"]))
            continue
        k, frames = d["shape"]
        out.append(Encoded(d["id"], data[offset : offset + k * frames].reshape(k, frames), *d["original"]))
        offset += k * frames
    return out
