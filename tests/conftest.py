"""Shared fixtures: random weights written in the released layouts, and test signals."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from signals import noise, speech_like  # noqa: E402,F401
from weights_factory import TINY_CONFIG, random_state, write_hub_layout  # noqa: E402

from mimi_cli.config import MimiConfig  # noqa: E402
from mimi_cli.fpcache import CACHE_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

torch.set_num_threads(min(2, torch.get_num_threads()))

# One-frame calls take the C kernel wherever it builds (as on the machines it wins on), so that its
# routes are tested on every machine; the timed choice between routes has its own tests (test_routes.py).
os.environ.setdefault("MIMI_NATIVE", "1")

# The Ctrl-C tests need SIGINT as a terminal delivers it. A suite started in the background of a
# non-interactive shell (`make test &`) inherits SIGINT *ignored*, and so would every `mimi` process
# the tests start (an ignored signal stays ignored across exec; a handled one is reset to the default).
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory) -> None:
    """The fingerprint cache of this run goes to a folder of its own, never the user's cache."""
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """A kernel cache folder of its own, no C kernel loaded and no routes chosen yet; the session's
    are restored after. Yields the folder the kernel and its routes go to."""
    from mimi_cli.model import native, routes

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(native.ARCH_ENV, raising=False)  # (set by `make test-portability`)
    native.library.cache_clear()
    routes.chosen.cache_clear()
    routes.elu_choice.cache_clear()
    yield tmp_path / "cache" / "kernels"
    native.library.cache_clear()
    routes.chosen.cache_clear()
    routes.elu_choice.cache_clear()


@pytest.fixture(scope="session")
def full_state() -> dict[str, torch.Tensor]:
    return random_state(MimiConfig(), seed=1234)


@pytest.fixture(scope="session")
def full_weights(tmp_path_factory, full_state) -> Path:
    """A folder holding model.safetensors + config.json of random full-size weights (hub layout)."""
    folder = tmp_path_factory.mktemp("mimi-full")
    write_hub_layout(folder, MimiConfig(), full_state)
    return folder


@pytest.fixture(scope="session")
def tiny_state() -> dict[str, torch.Tensor]:
    return random_state(TINY_CONFIG, seed=99)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory, tiny_state) -> Path:
    folder = tmp_path_factory.mktemp("mimi-tiny")
    write_hub_layout(folder, TINY_CONFIG, tiny_state)
    return folder
