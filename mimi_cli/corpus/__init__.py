"""Corpora as datasets: audio (folders, lists, Parquet tables) → Mimi codes in Parquet shards, and back.

`sources` reads SRC, `encoding` the read and encode stages, `shards` the files on disk and resume,
`engines` the local and Ray engines, `pipeline` the `tokenize` run, `detokenize` the way back to audio.
"""

from .pipeline import TokenizeOptions, tokenize

__all__ = ["TokenizeOptions", "tokenize"]
