"""Test configuration: Triton interpreter on CPU-only machines, an isolated tuning cache per test,
the `gpu` marker (tests that need a CUDA device skip cleanly without one) and the opt-in `sweep`
tests (`--sweep`)."""

from __future__ import annotations

import os
import sys

import torch

# `python -m pytest` puts the checkout's root on sys.path, where kernels/ (installed as
# fastres.kernels) would shadow the `kernels` package that transformers imports.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must happen before fastres.kernels is imported: triton decides at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastres import tuning  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--sweep", action="store_true",
                     help="run the `sweep` tests: fastres.optimize over whole timm / torchvision model libraries")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--sweep"):  # opt-in: left out of the run, not reported as skipped
        sweep = [item for item in items if "sweep" in item.keywords]
        if sweep:
            config.hook.pytest_deselected(items=sweep)
            items[:] = [item for item in items if "sweep" not in item.keywords]
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `make test-gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_tuning_cache(tmp_path, monkeypatch):
    """Every test gets its own empty tuning cache directory and a fresh in-memory view of it."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "tuning-cache"))
    tuning.forget_in_memory()
    yield tmp_path / "tuning-cache"
    tuning.forget_in_memory()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """Puts a state_dict in torch's hub cache (made in tmp_path, for this test and the processes it
    starts) as the file of torchvision's weights, which then load as torchvision loads them, with no
    download: `hub_cache(ResNet18_Weights.DEFAULT, state_dict)`."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def put(weights, state: dict) -> None:
        path = tmp_path / "torch-home" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    return put
