"""Host time per call: what one attention call costs the CPU, cuflash beside torch's SDPA.

A call's host time is the wall time of the Python call itself: argument handling, planning,
allocation and the kernel launches, not the kernels (which run asynchronously). Two figures:
"alone", each call timed by itself, the device synchronized before it (the median over --calls
calls: what a call costs from a cold start, caches cold after the wait), and "streamed", --calls
calls issued back to back (the hot path, as in a training loop), beside the device's span over
them (when that span is about the host's time, the device waited for the host).

Measured, on CUDA tensors / CuPy arrays of the same shapes:
- cuflash (CuPy API): ``cuflash.attention`` and ``cuflash.attention_backward``;
- cuflash.torch: ``attention`` forward without grad, and forward + ``backward()`` with grad;
- the same batch packed (cuflash's ``attention_varlen(_backward)`` and ``cuflash.torch``'s
  ``flash_attn_varlen_func``, max_seqlen hints given);
- one decoding step over the same keys as a KV cache: ``cuflash.attention_with_kvcache`` (CuPy)
  and ``cuflash.torch.flash_attn_with_kvcache`` (flash-attn's layouts), each without and with a
  one-key append, beside SDPA on the step's query row over the same keys;
- the same calls with a float32 bias shared by the heads ``(1, 1, L, L)`` (its gradient summed
  over batch and heads) and a key-padding mask ``(B, 1, 1, L)`` (each sequence's last quarter
  hidden), on CuPy arrays and through ``cuflash.torch`` (bias requiring grad);
- torch SDPA (default backend choice, FLASH, CUDNN, EFFICIENT): the same two.
With ``--gqa`` the key/value heads are half the query heads (SDPA with ``enable_gqa``).

``--layers`` adds where cuflash.torch's forward + ``backward()`` spends its host time: the call
streamed as above, each layer of the path timed by a wrapper around it (the torch adapter's
autograd.Function forward and backward, the cached plans' ``run`` and ``_run``, each
cuLaunchKernel, each tensor-map address update), in rounds alternating with SDPA's default
backend so that the two share the host's state (its timings move 2-3x between runs: compare
within a round). Layers nest (``run`` contains ``_run``, which contains the launches), and the
wrappers add about a microsecond each.

    python benchmarks/bench_host.py [--dtype bf16] [--calls 200] [--gqa] [--layers]

Writes benchmarks/results/<UTC>_<gpu>_host.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: the benchmarks package (and cuflash) from here
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import record as records  # noqa: E402
from benchmarks.tables import cell  # noqa: E402
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}


def host_us_per_call(call, calls: int) -> float:
    """Median over ``calls`` of one call's wall time, in us, the device synchronized between calls
    (never inside the timed region): the host's own cost, launches included. (Queuing many calls
    behind a busy GPU instead fills the driver's launch queue, and then measures the GPU.)"""
    import torch

    call()  # plan and compile outside the clock
    samples = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(samples)


def _inputs(args):
    """q, k, v (requiring grad) and dout: CUDA tensors of the arguments' shapes and dtype."""
    import torch

    dtype = getattr(torch, TORCH_DTYPES[args.dtype])
    hq, hkv = (args.heads, args.heads // 2) if args.gqa else (args.heads, args.heads)
    shape_q, shape_kv = (args.batch, hq, args.seqlen, args.headdim), (args.batch, hkv, args.seqlen, args.headdim)
    q, k, v = (torch.randn(s, device="cuda", dtype=dtype, requires_grad=True) for s in (shape_q, shape_kv, shape_kv))
    return q, k, v, torch.randn(shape_q, device="cuda", dtype=dtype)


def cases(args):
    import cupy
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash
    import cuflash.torch as ct

    q, k, v, dout = _inputs(args)
    cq, ck, cv, cdout = (cupy.from_dlpack(x.detach()) for x in (q, k, v, dout))
    cout, clse = cuflash.attention(cq, ck, cv, causal=True, return_lse=True)

    yield "cuflash (CuPy) fwd", lambda: cuflash.attention(cq, ck, cv, causal=True)
    yield "cuflash (CuPy) bwd", lambda: cuflash.attention_backward(cdout, cq, ck, cv, cout, clse, causal=True)

    def torch_fwd(attend):
        def call():
            with torch.no_grad():
                attend(q, k, v)
        return call

    def torch_fwd_bwd(attend):
        def call():
            attend(q, k, v).backward(dout)
        return call

    ours = lambda q, k, v: ct.attention(q, k, v, causal="top_left")  # noqa: E731
    yield "cuflash.torch fwd", torch_fwd(ours)
    yield "cuflash.torch fwd+bwd", torch_fwd_bwd(ours)

    # A bias shared by the heads and a key-padding mask: the replay lays the bias out, cuts the
    # padded keys on the device and sums dbias (over batch and heads) with a kernel of its own.
    bias = torch.randn(1, 1, args.seqlen, args.seqlen, device="cuda", requires_grad=True)
    mask = (torch.arange(args.seqlen, device="cuda") < args.seqlen - args.seqlen // 4).expand(args.batch, 1, 1, -1)
    mask = mask.contiguous()
    cbias, cmask = (cupy.from_dlpack(x.detach()) for x in (bias, mask))
    scored = dict(bias=cbias, mask=cmask, causal=True)
    cbout, cblse = cuflash.attention(cq, ck, cv, return_lse=True, **scored)
    yield "cuflash (CuPy) bias fwd", lambda: cuflash.attention(cq, ck, cv, **scored)
    yield "cuflash (CuPy) bias bwd", lambda: cuflash.attention_backward(cdout, cq, ck, cv, cbout, cblse, **scored)
    biased = lambda q, k, v: ct.attention(q, k, v, causal="top_left", bias=bias, mask=mask)  # noqa: E731
    yield "cuflash.torch bias fwd", torch_fwd(biased)
    yield "cuflash.torch bias fwd+bwd", torch_fwd_bwd(biased)

    # The same batch as packed sequences (flash-attn's varlen layout, max_seqlen hints given: no
    # host read of the offsets), each sequence one batch entry.
    packed = [x.detach().transpose(1, 2).reshape(-1, x.shape[1], x.shape[3]).contiguous().requires_grad_()
              for x in (q, k, v)]
    pdout = dout.transpose(1, 2).reshape(-1, args.heads, args.headdim).contiguous()
    cu = torch.arange(0, (args.batch + 1) * args.seqlen, args.seqlen, dtype=torch.int32, device="cuda")
    pq, pk, pv, pd, pcu = (cupy.from_dlpack(x.detach()) for x in (*packed, pdout, cu))
    hints = dict(max_seqlen_q=args.seqlen, max_seqlen_k=args.seqlen, causal=True)
    pout, plse = cuflash.attention_varlen(pq, pk, pv, pcu, pcu, return_lse=True, **hints)
    yield "cuflash varlen (CuPy) fwd", lambda: cuflash.attention_varlen(pq, pk, pv, pcu, pcu, **hints)
    yield "cuflash varlen (CuPy) bwd", lambda: cuflash.attention_varlen_backward(pd, pq, pk, pv, pout, plse, pcu, pcu,
                                                                                 **hints)
    varlen = lambda q, k, v: ct.flash_attn_varlen_func(q, k, v, cu, cu, args.seqlen, args.seqlen, causal=True)  # noqa: E731

    def packed_call(backward):
        def call():
            if backward:
                varlen(*packed).backward(pdout)
            else:
                with torch.no_grad():
                    varlen(*packed)
        return call

    yield "flash_attn_varlen_func fwd", packed_call(False)
    yield "flash_attn_varlen_func fwd+bwd", packed_call(True)

    # One decoding step over the same keys as a KV cache: each sequence's last query row against
    # its L cached keys (lengths in an int32 device array, as a serving loop holds them), and the
    # step that also appends one new key (written in place at slot L - 1, call after call).
    step = q.detach()[:, :, -1:]
    cache_k, cache_v = k.detach(), v.detach()
    lengths = torch.full((args.batch,), args.seqlen, dtype=torch.int32, device="cuda")
    before_last = lengths - 1
    new_k, new_v = (x[:, :, -1:].clone() for x in (cache_k, cache_v))
    cstep, cache_ck, cache_cv, clengths, cbefore, cnew_k, cnew_v = (
        cupy.from_dlpack(x) for x in (step, cache_k, cache_v, lengths, before_last, new_k, new_v))
    yield "cuflash (CuPy) kvcache decode", lambda: cuflash.attention_with_kvcache(
        cstep, cache_ck, cache_cv, cache_seqlens=clengths)
    yield "cuflash (CuPy) kvcache decode+append", lambda: cuflash.attention_with_kvcache(
        cstep, cache_ck, cache_cv, k=cnew_k, v=cnew_v, cache_seqlens=cbefore)
    # flash-attn's layouts, (B, L, H, D): views of the same memory
    t_step, t_k, t_v, t_new_k, t_new_v = (x.transpose(1, 2) for x in (step, cache_k, cache_v, new_k, new_v))
    yield "flash_attn_with_kvcache decode", lambda: ct.flash_attn_with_kvcache(
        t_step, t_k, t_v, cache_seqlens=lengths)
    yield "flash_attn_with_kvcache decode+append", lambda: ct.flash_attn_with_kvcache(
        t_step, t_k, t_v, k=t_new_k, v=t_new_v, cache_seqlens=before_last)
    yield "sdpa decode", lambda: torch.nn.functional.scaled_dot_product_attention(
        step, cache_k, cache_v, enable_gqa=args.gqa)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=args.gqa)

    for backend in ("default", "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        def within(call, backend=backend):
            if backend == "default":
                return call

            def run():
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    call()
            return run
        name = "sdpa" if backend == "default" else f"sdpa {backend.split('_')[0].lower()}"
        yield f"{name} fwd", within(torch_fwd(sdpa))
        yield f"{name} fwd+bwd", within(torch_fwd_bwd(sdpa))


# The layers --layers times: (name, module path, attribute path); each wrapped while it is timed.
LAYERS = (
    ("Function.forward", "cuflash.torch", "_AttentionFunction.forward"),
    ("Function.backward", "cuflash.torch", "_AttentionFunction.backward"),
    ("ForwardPlan.run", "cuflash._gpu.plan", "ForwardPlan.run"),
    ("BackwardPlan.run", "cuflash._gpu.plan", "BackwardPlan.run"),
    ("_Plan._run", "cuflash._gpu.plan", "_Plan._run"),
    ("tensor-map updates", "cuflash._gpu.tma", "replace_address_in_place"),
)


class _LayerTimers:
    """Wrappers that add each layer's wall time into ``totals`` (seconds), installed by
    ``install`` and removed by ``remove``; the launches are timed through _gpu.launch_args.driver."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self._restore = []

    @staticmethod
    def resolve(module_name, path):
        """(the object holding the layer at ``path`` in ``module_name``, its attribute name)."""
        import importlib

        owner = importlib.import_module(module_name)
        *parents, attribute = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        return owner, attribute

    def _timed(self, name, function):
        totals = self.totals

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
        return timed

    def install(self):
        for name, module_name, path in LAYERS:
            owner, attribute = self.resolve(module_name, path)
            original = owner.__dict__[attribute]
            function = original.__func__ if isinstance(original, staticmethod) else original
            wrapped = self._timed(name, function)
            setattr(owner, attribute, staticmethod(wrapped) if isinstance(original, staticmethod) else wrapped)
            self._restore.append((owner, attribute, original))
        from cuflash._gpu import launch_args

        driver = launch_args.driver()
        timed_launch = self._timed("cuLaunchKernel", driver.launchKernel)

        class _TimedDriver:
            launchKernel = staticmethod(timed_launch)

            def __getattr__(self, name):
                return getattr(driver, name)
        original_driver = launch_args.__dict__["driver"]
        launch_args.driver = lambda: _TimedDriver()
        self._restore.append((launch_args, "driver", original_driver))

    def remove(self):
        for owner, attribute, original in reversed(self._restore):
            setattr(owner, attribute, original)
        self._restore.clear()


def layers(args, rounds: int = 3) -> list[dict]:
    """--layers: per round, cuflash.torch's fwd+bwd streamed with its layers timed, then SDPA's
    (default backend) on the same tensors; us per call."""
    import cupy
    import torch

    import cuflash.torch as ct

    q, k, v, dout = _inputs(args)

    def ours():
        ct.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=args.gqa).backward(dout)

    def sdpa():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=args.gqa).backward(dout)

    results = []
    for round_ in range(rounds):
        timers = _LayerTimers()
        ours()  # planned and compiled outside the clock
        timers.install()
        try:
            host, device = records.streamed(cupy, ours, args.calls)
        finally:
            timers.remove()
        calls = args.calls + 1  # streamed's warm-up call ran under the timers too
        results.append({"round": round_, "call": "cuflash.torch fwd+bwd", "host_us": 1e3 * host,
                        "device_us": 1e3 * device,
                        **{name: 1e6 * total / calls for name, total in timers.totals.items()}})
        host, device = records.streamed(cupy, sdpa, args.calls)
        results.append({"round": round_, "call": "sdpa fwd+bwd", "host_us": 1e3 * host, "device_us": 1e3 * device})
    return results


def environment() -> dict:
    import cupy
    import torch

    import cuflash

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cupy": cupy.__version__,
            "cuflash": cuflash.__version__, "python": sys.version.split()[0], **records.source_commit(),
            "date_utc": records.now_utc()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(TORCH_DTYPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--headdim", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--gqa", action="store_true", help="key/value heads = query heads / 2")
    parser.add_argument("--layers", action="store_true",
                        help="also time the layers of cuflash.torch's fwd+bwd (see the module docstring)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    args = parser.parse_args(argv)
    if args.gqa and args.heads % 2:
        parser.error("--gqa needs an even --heads")
    import cupy

    rows = []
    for name, call in cases(args):
        try:
            value = host_us_per_call(call, args.calls)
            streamed, span = records.streamed(cupy, call, args.calls)  # (ms per call: host, device)
            rows.append({"call": name, "host_us": value, "streamed_host_us": 1e3 * streamed,
                         "streamed_device_us": 1e3 * span})
        except Exception as error:  # a backend torch does not offer here: say so, keep going
            rows.append({"call": name, "host_us": None, "note": f"{type(error).__name__}: {error}"[:200]})
        print(f"{name:28s} " + " ".join(cell(rows[-1].get(k), ".1f") for k in ("host_us", "streamed_host_us",
                                                                               "streamed_device_us")),
              file=sys.stderr, flush=True)

    layer_rows = layers(args) if args.layers else []
    env = environment()
    record = {"sweep": "host", **env, "config": vars(args), "rows": rows, "layers": layer_rows}
    path = records.write(record, records.record_path(args.out, env["date_utc"], env["device"],
                                                     "host_gqa" if args.gqa else "host"))
    print(f"| call ({args.dtype}, B={args.batch} H={args.heads}{' GQA' if args.gqa else ''} L={args.seqlen} D={args.headdim}) "
          "| host us/call, alone | host us/call, streamed | device span us/call, streamed |\n| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['call']} | " + " | ".join(cell(row.get(k), ".1f") for k in ("host_us", "streamed_host_us",
                                                                                 "streamed_device_us")) + " |")
    if layer_rows:
        names = [name for name, _, _ in LAYERS] + ["cuLaunchKernel"]
        print("\n| round | call | host us | device us | " + " | ".join(names) + " |\n|"
              + " --- |" * (4 + len(names)))
        for row in layer_rows:
            print(f"| {row['round']} | {row['call']} | " + " | ".join(cell(row.get(k), ".1f") for k in
                                                                    ["host_us", "device_us"] + names) + " |")
    print(f"\nrecorded {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
