"""Mimi in PyTorch, inference only."""

from .mimi import MimiModel, StreamingDecoder, StreamingEncoder

__all__ = ["MimiModel", "StreamingDecoder", "StreamingEncoder"]
