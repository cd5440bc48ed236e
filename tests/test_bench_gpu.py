"""benchmarks/gpu.py (`make bench-gpu`) without a GPU refuses in one line; its smoke mode, every section
on CPU, runs with the other benchmarks' in tests/test_benchmarks.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_without_cuda(bench, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no CUDA device" in err


def test_cpu_needs_smoke(bench, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--device", "cpu"])
    assert exit_info.value.code == 2
    assert "--smoke" in capsys.readouterr().err
