"""Carried state for running the model chunk by chunk with results equal to one whole-input pass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

T = TypeVar("T")


class Stream:
    """The state of one streamed encode or decode, shared by every layer it passes through.

    Each stateful layer keeps its own entry (convolution history, transposed-convolution overlap,
    attention key/value window, time offset), created on first use. `final` is True during the
    last call, when layers complete their input the way a whole-input pass pads its end.
    A layer called without a Stream behaves as a whole-input pass: fresh state, `final` True.
    """

    def __init__(self, final: bool = False) -> None:
        self.final = final
        self._states: dict[int, Any] = {}

    def state(self, layer: nn.Module, factory: Callable[[], T]) -> T:
        key = id(layer)
        if key not in self._states:
            self._states[key] = factory()
        return self._states[key]


def layer_state(stream: Stream | None, layer: nn.Module, factory: Callable[[], T]) -> tuple[T, bool]:
    """(state, final) of `layer` in `stream`, or a fresh state and final=True for a whole-input pass."""
    if stream is None:
        return factory(), True
    return stream.state(layer, factory), stream.final
