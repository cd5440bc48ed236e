"""The weights fingerprint cache: same value as hashing, used when the file is unchanged, never stale."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from safetensors.torch import save_file
from weights_factory import TINY_CONFIG, random_state

from mimi_cli import fpcache, load_model, weights
from mimi_cli.fpcache import CACHE_ENV, CACHE_FILE


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder / CACHE_FILE


@pytest.fixture
def settled_weights(tmp_path, tiny_weights):
    """A copy of the tiny weights whose files were last modified a minute ago (old enough to cache)."""
    folder = tmp_path / "weights"
    shutil.copytree(tiny_weights, folder)
    _age(folder / "model.safetensors", folder / "config.json")
    return folder


def _age(*paths, seconds: float = 60.0) -> None:
    old = time.time() - seconds
    for path in paths:
        os.utime(path, (old, old))


def _no_hashing(monkeypatch) -> None:
    def refuse(state):
        raise AssertionError("the fingerprint was computed instead of read from the cache")

    monkeypatch.setattr(weights, "fingerprint", refuse)


def test_second_load_reads_the_cached_value(cache, settled_weights, tiny_state, monkeypatch):
    first = load_model(settled_weights)
    assert first.fingerprint == weights.fingerprint(tiny_state)
    entries = json.loads(cache.read_text())["entries"]
    assert list(entries.values()) == [first.fingerprint.hex()]
    _no_hashing(monkeypatch)
    assert load_model(settled_weights).fingerprint == first.fingerprint
    assert [p.name for p in cache.parent.iterdir()] == [CACHE_FILE]  # no temporary file left


def test_rewritten_weights_are_hashed_again(cache, settled_weights, tiny_state):
    path = settled_weights / "model.safetensors"
    before = load_model(settled_weights).fingerprint
    other = random_state(TINY_CONFIG, seed=7)
    save_file(other, str(path))  # same shapes, so the same size: the modification time tells
    _age(path, seconds=30.0)
    after = load_model(settled_weights).fingerprint
    assert after == weights.fingerprint(other) != before
    assert len(json.loads(cache.read_text())["entries"]) == 2


def test_a_just_written_file_is_not_cached(cache, tiny_weights, tmp_path):
    folder = tmp_path / "fresh"
    shutil.copytree(tiny_weights, folder)
    os.utime(folder / "model.safetensors")  # modified now: a second write could keep the same key
    assert fpcache.file_key(folder / "model.safetensors") is None
    load_model(folder)
    assert not cache.exists()


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("not json", id="not-json"),
        pytest.param(json.dumps({"version": 99, "entries": {}}), id="other-version"),
        pytest.param(json.dumps([1, 2]), id="not-an-object"),
    ],
)
def test_a_broken_cache_file_is_replaced(cache, settled_weights, tiny_state, content):
    cache.parent.mkdir()
    cache.write_text(content)
    assert load_model(settled_weights).fingerprint == weights.fingerprint(tiny_state)
    assert json.loads(cache.read_text())["version"] == fpcache.CACHE_VERSION


def test_a_bad_cached_value_is_not_trusted(cache, settled_weights, tiny_state):
    key = fpcache.file_key(settled_weights / "model.safetensors", settled_weights / "config.json")
    cache.parent.mkdir()
    cache.write_text(json.dumps({"version": fpcache.CACHE_VERSION, "entries": {key: "zz" * 8}}))
    assert load_model(settled_weights).fingerprint == weights.fingerprint(tiny_state)
    assert json.loads(cache.read_text())["entries"][key] == weights.fingerprint(tiny_state).hex()


def test_an_unusable_cache_folder_only_costs_time(tmp_path, monkeypatch, settled_weights, tiny_state):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))  # cannot be created: a file is in the way
    assert load_model(settled_weights).fingerprint == weights.fingerprint(tiny_state)


def test_the_cache_keeps_only_the_newest_entries(cache, monkeypatch):
    monkeypatch.setattr(fpcache, "MAX_ENTRIES", 3)
    for i in range(5):
        assert fpcache.cached(f"key{i}", lambda i=i: bytes([i] * 8), 8) == bytes([i] * 8)
    assert list(json.loads(cache.read_text())["entries"]) == ["key2", "key3", "key4"]
    assert fpcache.cached("key4", lambda: b"computed", 8) == bytes([4] * 8)
