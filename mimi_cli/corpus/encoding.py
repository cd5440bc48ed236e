"""The two stages both engines run on a unit (up to `--batch-size` consecutive inputs of one shard):
read (decode, downmix, resample to 24 kHz; CPU) and encode (one streamed forward pass over the unit).

Both engines encode exactly the same units, so their codes are bit for bit the same; a unit of one
input is encoded as `mimi encode` encodes a file (the same 10-second chunks, the same end padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..codec import CHUNK_SECONDS, whole_frames
from ..config import FRAME_RATE, FRAME_SIZE
from ..errors import MimiError, one_line
from .sources import CellReader, Input, read_input
from .storage import StorageUnavailable, hide_secrets

if TYPE_CHECKING:
    import torch

    from ..model import MimiModel


@dataclass
class Audio:
    """An input read: float32 mono [T] at 24 kHz and what the original was."""

    audio: np.ndarray
    sample_rate: int
    num_samples: int  # per channel, at the original rate
    channels: int


@dataclass
class Encoded:
    """One row of the dataset, without the carried columns."""

    id: str
    codes: np.ndarray  # int16 [K, frames]
    sample_rate: int
    num_samples: int
    channels: int

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate


@dataclass
class Failed:
    id: str
    error: str


def read_unit(unit: list[Input], cells: CellReader) -> list[Audio | Failed]:
    """Read every input of a unit; one that cannot be read becomes a `Failed` with a one-line reason
    (storage that stays unavailable through every retry raises instead)."""
    out: list[Audio | Failed] = []
    for item in unit:
        try:
            audio, info = read_input(item, cells)
        except StorageUnavailable:
            raise  # not the input's fault: the run stops, its shard is not written, a rerun redoes it
        except (MimiError, ValueError, OSError) as e:
            out.append(Failed(item.id, hide_secrets(_named(item.id, one_line(e)))))
            continue
        out.append(Audio(audio, info.sample_rate, info.frames or len(audio), info.channels))
    return out


def _named(name: str, reason: str) -> str:
    """Reasons name the input (by id: a table row's bytes have no path of their own)."""
    return reason if name in reason else f"{name}: {reason}"


def encode_unit(
    model: MimiModel, num_codebooks: int, unit: list[Input], read: list[Audio | Failed]
) -> list[Encoded | Failed]:
    """Encode the inputs of a unit that were read, in one batch: codes int16 [K, frames] each.

    If the batch fails, each input is tried alone, so one bad input fails alone.
    """
    return finish_unit(launch_unit(model, num_codebooks, unit, read))


@dataclass
class Launched:
    """A unit whose encoding is queued on the model's device; `finish_unit` waits for its codes."""

    model: MimiModel
    num_codebooks: int
    unit: list[Input]
    read: list[Audio | Failed]
    codes: _PendingCodes | None = None
    error: Exception | None = None


def launch_unit(
    model: MimiModel, num_codebooks: int, unit: list[Input], read: list[Audio | Failed]
) -> Launched:
    """Queue a unit's encoding without waiting for it (on CUDA the host can prepare the next unit
    meanwhile: the engines keep one unit in flight)."""
    launched = Launched(model, num_codebooks, unit, read)
    audios = [r.audio for r in read if isinstance(r, Audio)]
    try:
        launched.codes = _launch(model, num_codebooks, audios) if audios else None
    except (MimiError, ValueError, RuntimeError) as e:
        launched.error = e
    return launched


def finish_unit(launched: Launched) -> list[Encoded | Failed]:
    """The rows of a launched unit, once its codes are back; a failed batch is retried input by input."""
    unit, read = launched.unit, launched.read
    ready = [(item, r) for item, r in zip(unit, read, strict=True) if isinstance(r, Audio)]
    codes: list[np.ndarray | Encoded | Failed] = []
    error = launched.error
    if error is None and launched.codes is not None:
        try:
            codes = list(launched.codes.wait())
        except (MimiError, ValueError, RuntimeError) as e:
            error = e
    if error is not None:
        model, k = launched.model, launched.num_codebooks
        if len(ready) <= 1:
            codes = [
                Failed(item.id, _named(item.id, f"cannot encode ({one_line(error)})")) for item, _ in ready
            ]
        else:
            codes = [encode_unit(model, k, [item], [r])[0] for item, r in ready]
    done = iter(codes)
    out: list[Encoded | Failed] = []
    for item, r in zip(unit, read, strict=True):
        if isinstance(r, Failed):
            out.append(r)
            continue
        c = next(done)
        out.append(c if isinstance(c, (Encoded, Failed)) else Encoded(item.id, c, *_original(r)))
    return out


def _original(r: Audio) -> tuple[int, int, int]:
    return r.sample_rate, r.num_samples, r.channels


class _PendingCodes:
    """Codes on their way to the host: copied as soon as the device has them, without the host
    waiting (pinned memory and an event on CUDA), so that later work queued behind them is not
    waited for too."""

    def __init__(self, codes: torch.Tensor, frames: list[int]) -> None:
        import torch

        self.frames = frames
        self.event = None
        if codes.device.type == "cuda":
            self.host = torch.empty(codes.shape, dtype=torch.int16, pin_memory=True)
            self.host.copy_(codes.to(torch.int16), non_blocking=True)  # codes < 2048: a quarter of the bytes
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = codes

    def wait(self) -> list[np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        codes = self.host.numpy().astype(np.int16, copy=False)  # already int16 from CUDA
        return [codes[row, :, :frames] for row, frames in enumerate(self.frames)]


def _launch(model: MimiModel, num_codebooks: int, audios: list[np.ndarray]) -> _PendingCodes:
    """audios: float32 [T_i] at 24 kHz → codes int16 [K, ceil(T_i / frame_size)] each, once waited for.

    Padded to whole frames, then to the longest, and pushed through the streaming encoder in the
    chunks `codec.encode_file` uses: the codes of a unit of one are those `mimi encode` writes. On
    CUDA the batch goes to the device in one copy from pinned memory, queued without waiting.
    """
    import torch

    from ..model import StreamingEncoder

    padded = [whole_frames(a) for a in audios]
    cuda = model.device.type == "cuda"
    batch = torch.zeros(len(padded), 1, max(map(len, padded)), pin_memory=cuda)
    for row, samples in enumerate(padded):
        batch[row, 0, : len(samples)] = torch.from_numpy(samples)
    batch = batch.to(model.device, non_blocking=True)
    encoder = StreamingEncoder(model, num_codebooks)
    chunk = max(1, round(CHUNK_SECONDS * FRAME_RATE)) * FRAME_SIZE
    pieces = [encoder.push(batch[..., start : start + chunk]) for start in range(0, batch.shape[-1], chunk)]
    codes = torch.cat([*pieces, encoder.finish()], dim=-1)
    return _PendingCodes(codes, [len(samples) // FRAME_SIZE for samples in padded])
