"""benchmarks/bench_host.py's --layers timers without a GPU: they wrap each layer the docstring
names, count the time of the layers a CPU call goes through (the torch adapter's autograd
Function), and put every original back (the GPU layers run only under
``python benchmarks/bench_host.py --layers`` on a GPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

torch = pytest.importorskip("torch")
pytest.importorskip("cupy")

from benchmarks import bench_host  # noqa: E402


def _layer(module_name, path):
    owner, attribute = bench_host._LayerTimers.resolve(module_name, path)
    return owner.__dict__[attribute]


def test_layer_timers_time_the_torch_path_and_restore_every_layer():
    import cuflash.torch as ct
    from cuflash._gpu import launch_args

    originals = [_layer(module, path) for _, module, path in bench_host.LAYERS] + [launch_args.__dict__["driver"]]
    timers = bench_host._LayerTimers()
    timers.install()
    try:
        assert all(_layer(module, path) is not original
                   for (_, module, path), original in zip(bench_host.LAYERS, originals))
        q = torch.randn(1, 2, 8, 8, requires_grad=True)
        out = ct.scaled_dot_product_attention(q, q, q, is_causal=True)
        out.sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()
    finally:
        timers.remove()
    assert set(timers.totals) == {"Function.forward", "Function.backward"}
    assert all(total > 0 for total in timers.totals.values())
    restored = [_layer(module, path) for _, module, path in bench_host.LAYERS] + [launch_args.__dict__["driver"]]
    assert all(a is b for a, b in zip(originals, restored))
