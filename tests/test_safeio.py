"""No exception is lost in libsndfile's callbacks: file objects that raise, and real Ctrl-Cs, handed to
every reader and writer, come out of the library call (`mimi_cli.safeio`, `mimi_cli.audio`)."""

from __future__ import annotations

import errno
import io
import os
import signal
import threading

import numpy as np
import pytest
import soundfile as sf

from mimi_cli.audio import AudioWriter, probe, read_audio, stream_audio
from mimi_cli.errors import AudioError, OutputError, StorageError
from mimi_cli.safeio import GuardedFile, held_interrupts

RATE = 16_000
FORMATS = ["WAV", "FLAC", "OGG"]


def _encoded(fmt: str, seconds: float = 3.0) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    audio = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, audio, RATE, format=fmt, subtype={"OGG": "VORBIS"}.get(fmt, "PCM_16"))
    return buffer.getvalue()


class Faulty(io.BytesIO):
    """A seekable in-memory file whose `method` raises `error` at its `at`-th call (1-based), or —
    for `write` with `offset` — on the write that reaches byte `offset`. `error` may be a callable
    that does something instead (sends a signal) and returns normally."""

    def __init__(self, data: bytes = b"", method: str = "", at: int = 0, error=None, offset=None):
        super().__init__(data)
        self.method, self.at, self.error, self.offset = method, at, error, offset
        self.calls: dict[str, int] = {}
        self.written = 0

    def _hit(self, method: str, size: int = 0) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        if method != self.method:
            return
        if self.offset is not None:
            reached = self.written + size >= self.offset
        else:
            reached = self.calls[method] == self.at
        if reached:
            if isinstance(self.error, BaseException):
                raise self.error
            self.error()

    def read(self, size=-1):
        self._hit("read")
        return super().read(size)

    def readinto(self, buffer):
        self._hit("read")
        return super().readinto(buffer)

    def seek(self, offset, whence=0):
        self._hit("seek")
        return super().seek(offset, whence)

    def tell(self):
        self._hit("tell")
        return super().tell()

    def write(self, data):
        self._hit("write", len(data))
        self.written += len(data)
        return super().write(data)


def _read_all(src) -> None:
    read_audio(src)


def _stream_all(src) -> None:
    _, blocks = stream_audio(src, block_frames=2048)
    for _ in blocks:
        pass


READERS = {"read_audio": _read_all, "stream_audio": _stream_all, "probe": probe}


def _calls(fmt: str, reader) -> dict[str, int]:
    """How often each method is called when `reader` reads the whole file: the points to fault at."""
    counting = Faulty(_encoded(fmt))
    reader(counting)
    return counting.calls


def _send_sigint() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def _no_lost_exceptions(capfd) -> None:
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("method", ["read", "seek", "tell"])
def test_faults_of_an_input_file_object_come_out_of_the_reader(fmt, reader, method, capfd):
    read = READERS[reader]
    total = _calls(fmt, read).get(method, 0)
    assert total, f"{reader} never calls {method} on a {fmt} input: nothing would be tested"
    points = sorted({1, max(1, total // 2), total})
    for at in points:
        with pytest.raises(KeyboardInterrupt):
            read(Faulty(_encoded(fmt), method, at, KeyboardInterrupt()))
        with pytest.raises(AudioError, match="input/output error"):
            read(Faulty(_encoded(fmt), method, at, OSError(errno.EIO, os.strerror(errno.EIO))))
        with pytest.raises(KeyboardInterrupt):  # a real Ctrl-C arriving while libsndfile reads
            read(Faulty(_encoded(fmt), method, at, _send_sigint))
    _no_lost_exceptions(capfd)


def _write_file(dst, fmt: str, seconds: float = 2.0) -> None:
    audio = np.sin(np.linspace(0, 2000, int(seconds * RATE))).astype(np.float32) * 0.3
    with AudioWriter(dst, RATE, fmt) as writer:
        for start in range(0, len(audio), 4096):
            writer.write(audio[start : start + 4096])


@pytest.mark.parametrize("fmt", FORMATS)
def test_faults_of_an_output_file_object_come_out_of_the_writer(fmt, capfd):
    size = len(_write_to_memory(fmt))
    for offset in sorted({1, size // 2, size}):
        with pytest.raises(StorageError, match="no space left on device"):
            _write_file(Faulty(method="write", offset=offset, error=_enospc()), fmt)
        with pytest.raises(StorageError, match="read-only file system"):
            _write_file(Faulty(method="write", offset=offset, error=_os_error(errno.EROFS)), fmt)
        with pytest.raises(KeyboardInterrupt):
            _write_file(Faulty(method="write", offset=offset, error=KeyboardInterrupt()), fmt)
        with pytest.raises(KeyboardInterrupt):
            _write_file(Faulty(method="write", offset=offset, error=_send_sigint), fmt)
    for method in ("seek", "tell"):
        calls = _write_calls(fmt).get(method, 0)
        for at in sorted({1, calls}) if calls else []:
            with pytest.raises(OutputError, match="input/output error"):
                _write_file(Faulty(method=method, at=at, error=OSError(errno.EIO, "Input/output error")), fmt)
            with pytest.raises(KeyboardInterrupt):
                _write_file(Faulty(method=method, at=at, error=KeyboardInterrupt()), fmt)
    _no_lost_exceptions(capfd)


def _os_error(number: int) -> OSError:
    return OSError(number, os.strerror(number))


def _enospc() -> OSError:
    return _os_error(errno.ENOSPC)


def _write_to_memory(fmt: str) -> bytes:
    buffer = io.BytesIO()
    _write_file(buffer, fmt)
    return buffer.getvalue()


def _write_calls(fmt: str) -> dict[str, int]:
    counting = Faulty()
    _write_file(counting, fmt)
    return counting.calls


def test_held_interrupts_delivers_the_signal_when_the_block_ends():
    reached_the_end = False
    with pytest.raises(KeyboardInterrupt):
        with held_interrupts():
            _send_sigint()
            for _ in range(1000):  # many bytecodes: the signal would be handled here if not held
                pass
            reached_the_end = True
    assert reached_the_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_held_interrupts_nests_and_is_a_no_op_outside_the_main_thread():
    with held_interrupts():
        with held_interrupts():
            inner = signal.getsignal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is inner  # the inner block did not restore early
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with held_interrupts():  # signal.signal() would raise ValueError in a thread
                pass
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert errors == []


def test_a_guarded_file_records_the_first_error_and_then_answers_nothing():
    guarded = GuardedFile(Faulty(b"abcdef", "read", 1, OSError(errno.EIO, "Input/output error")))
    assert guarded.read(3) == b""
    assert guarded.tell() == -1 and guarded.write(b"x") == 0  # the file is not touched again
    with pytest.raises(OSError, match="Input/output error"):
        with guarded.call():
            pass
