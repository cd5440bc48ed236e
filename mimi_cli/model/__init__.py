"""Mimi in PyTorch, inference only."""

from .mimi import MimiModel

__all__ = ["MimiModel"]
