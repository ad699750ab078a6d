"""Shared test setup: the ``gpu`` marker and fresh random inputs.

- ``@pytest.mark.gpu`` tests are skipped, with the reason, when CuPy is missing or no CUDA device
  is usable (CuPy imports without a GPU; only ``getDeviceCount`` tells).
- ``rng`` is a NumPy Generator on a fresh seed every run, so inputs differ run to run; a failing
  test prints its seed, and ``CUFLASH_TEST_SEED=<seed>`` replays it.
- ``randn(*shape, dtype=...)`` draws standard normals in any supported dtype: never zeros, so an
  output that was never written cannot pass for a computed one.
"""
from __future__ import annotations

import functools
import os

import numpy
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped cleanly without one)")


@functools.lru_cache(maxsize=None)
def gpu_unavailable_reason() -> str | None:
    """None if a CUDA device is usable through CuPy, else why not."""
    try:
        import cupy
    except Exception as error:  # ImportError, or a broken CUDA install raising at import
        return f"CuPy is not importable: {error}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no driver, or one too old for CuPy's runtime
        return f"no CUDA GPU (CUDA says: {error})"
    return None if count > 0 else "no CUDA GPU"


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    reason = gpu_unavailable_reason()
    if reason is not None:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def rng(request):
    seed = os.environ.get("CUFLASH_TEST_SEED")
    seed = int(seed) if seed else numpy.random.SeedSequence().entropy
    request.node.cuflash_seed = seed
    return numpy.random.default_rng(seed)


@pytest.fixture
def randn(rng):
    def draw(*shape, dtype=numpy.float32):
        return rng.standard_normal(shape).astype(dtype)

    return draw


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "cuflash_seed", None)
    if seed is not None and report.failed:
        report.sections.append(("random seed", f"rerun with CUFLASH_TEST_SEED={seed}"))
