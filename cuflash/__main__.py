"""``python -m cuflash``: environment report, self-check and a small timing; ``warmup``; ``bench``.

    python -m cuflash                      # what is here, is it right, how fast
    python -m cuflash warmup --dtype bfloat16,float16 --head-dim 64,128
    python -m cuflash bench --quick        # benchmarks/bench.py, from a checkout
    python -m cuflash --version | --help
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy

import cuflash
from cuflash import _spec


# --------------------------------------------------------------------------- environment

def gpu_devices() -> list[tuple[int, str, str]]:
    """(id, name, compute capability) of every usable GPU; [] without CuPy or a driver."""
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return []
    out = []
    for i in range(count):
        props = cupy.cuda.runtime.getDeviceProperties(i)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        out.append((i, name, f"{props['major']}.{props['minor']}"))
    return out


def report() -> list[tuple[int, str, str]]:
    from ._gpu import kernels

    print(f"cuflash {cuflash.__version__}  (Python {platform.python_version()}, NumPy {numpy.__version__})")
    try:
        import cupy

        print(f"CuPy {cupy.__version__}")
        try:
            from cupy_backends.cuda.libs import nvrtc

            print("NVRTC %d.%d" % nvrtc.getVersion())
        except Exception as e:  # the NVRTC library is missing
            print(f"NVRTC: not loadable ({e})")
        cache = os.environ.get("CUPY_CACHE_DIR", os.path.expanduser("~/.cupy/kernel_cache"))
        print(f"kernel cache: {cache}")
    except ImportError:
        print("CuPy: not installed (pip install 'cuflash[cuda13]' for the GPU kernels)")
    print(f"kernel sources: {kernels.source_dir()}  (digest {kernels.source_digest()})")
    devices = gpu_devices()
    for i, name, cc in devices:
        print(f"GPU {i}: {name}, compute capability {cc}")
    if not devices:
        print("no GPU: running the CPU backend")
    return devices


# --------------------------------------------------------------------------- self-check

CHECKS = [  # (batch/heads, Lq, Lk, D, Dv, options)
    ((2, 3), 97, 97, 64, 64, {}),
    ((1, 4), 200, 113, 59, 32, {"causal": True}),
    ((2, 4), 128, 217, 128, 128, {"causal": "top_left"}),
    ((1, 2), 150, 150, 32, 32, {"window": (16, 8)}),
]


def _dense(q, k, v, scale, visible):
    """Standard attention in float64 NumPy: S = q k^T scale, P = softmax(S), O = P v."""
    s = numpy.einsum("...id,...jd->...ij", q, k) * scale
    s = numpy.where(visible, s, -numpy.inf)
    m = s.max(axis=-1, keepdims=True)
    m = numpy.where(numpy.isfinite(m), m, 0.0)
    p = numpy.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    return numpy.einsum("...ij,...jd->...id", p / numpy.where(l > 0, l, 1.0), v)


def _visible(lq, lk, causal=False, window=None):
    i = numpy.arange(lq)[:, None]
    j = numpy.arange(lk)[None, :]
    diag = 0 if causal == "top_left" else lk - lq
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0
    ok = numpy.ones((lq, lk), bool)
    if left >= 0:
        ok &= j >= i + diag - left
    if right >= 0:
        ok &= j <= i + diag + right
    return ok


def self_check(on_gpu: bool) -> bool:
    rng = numpy.random.default_rng()
    dtypes = ["float16", "bfloat16", "float32", "float64"]
    worst = {}
    ok = True
    for dtype_name in dtypes:
        try:
            dtype = _dtype(dtype_name)
        except ImportError as error:  # a NumPy-only install: bfloat16 needs ml_dtypes
            print(f"  self-check {dtype_name:9s} skipped: {error.name} is not installed")
            continue
        for lead, lq, lk, d, dv, options in CHECKS:
            # The reference sees exactly the rounded inputs the backend sees.
            args = [rng.standard_normal(lead + shape).astype(dtype) for shape in ((lq, d), (lk, d), (lk, dv))]
            q, k, v = (x.astype(numpy.float64) for x in args)
            ref = _dense(q, k, v, 1 / numpy.sqrt(d), _visible(lq, lk, **options))
            if on_gpu:
                import cupy

                args = [cupy.asarray(x) for x in args]
            out = cuflash.attention(*args, **options)
            out = out.get() if hasattr(out, "get") else out
            err = float(numpy.max(numpy.abs(out.astype(numpy.float64) - ref)))
            worst[dtype_name] = max(worst.get(dtype_name, 0.0), err)
        bound = {"float16": 5e-3, "bfloat16": 3e-2, "float32": 1e-5, "float64": 1e-12}[dtype_name]
        status = "ok" if worst[dtype_name] <= bound else "FAILED"
        ok &= status == "ok"
        print(f"  self-check {dtype_name:9s} max |error| vs float64 = {worst[dtype_name]:.2e}  (bound {bound:.0e})  {status}")
    return ok


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return numpy.dtype(ml_dtypes.bfloat16)
    return numpy.dtype(name)


# --------------------------------------------------------------------------- timing

def small_timing(on_gpu: bool) -> None:
    if not on_gpu:
        b, h, l, d = 1, 4, 1024, 64
        rng = numpy.random.default_rng(0)
        q, k, v = (rng.standard_normal((b, h, l, d)).astype(numpy.float32) for _ in range(3))
        start = time.perf_counter()
        cuflash.attention(q, k, v)
        elapsed = time.perf_counter() - start
        flops = 4 * b * h * l * l * d
        print(f"  CPU backend, float32 (B={b}, H={h}, L={l}, D={d}): {elapsed * 1e3:.1f} ms, {flops / elapsed / 1e9:.1f} GFLOP/s")
        return
    import cupy

    b, h, l, d = 4, 16, 2048, 64
    for dtype_name in ("float16", "bfloat16", "float32"):
        try:
            dtype = _dtype(dtype_name)
        except ImportError:
            continue
        q, k, v = (cupy.random.standard_normal((b, h, l, d), dtype=numpy.float32).astype(dtype) for _ in range(3))
        flops = 4 * b * h * l * l * d
        t_flash = _time_gpu(lambda: cuflash.attention(q, k, v))
        if dtype_name == "bfloat16":  # CuPy has no bfloat16 matmul
            print(f"  {dtype_name:9s} B={b} H={h} L={l} D={d}: cuflash {flops / t_flash / 1e12:6.1f} TFLOP/s "
                  "(naive CuPy attention has no bfloat16 matmul)")
            continue
        t_naive = _time_gpu(lambda: _naive_cupy(q, k, v))
        print(
            f"  {dtype_name:9s} B={b} H={h} L={l} D={d}: cuflash {flops / t_flash / 1e12:6.1f} TFLOP/s, "
            f"naive CuPy {flops / t_naive / 1e12:6.1f} TFLOP/s  ({t_naive / t_flash:.1f}x)"
        )


def _naive_cupy(q, k, v):
    """Standard attention in CuPy: matmul, softmax (fp32 for 16-bit inputs), matmul."""
    import cupy

    s = cupy.matmul(q, cupy.swapaxes(k, -1, -2)).astype(cupy.float32 if q.dtype.itemsize < 4 else q.dtype)
    s *= 1 / numpy.sqrt(q.shape[-1])
    s -= s.max(axis=-1, keepdims=True)
    p = cupy.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return cupy.matmul(p.astype(q.dtype), v)


def _time_gpu(fn, repeats: int = 10) -> float:
    import cupy

    fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(numpy.median(times))


# --------------------------------------------------------------------------- warmup

_MASKS = {"dense": False, "causal": True, "window": True, "local": True}


def _names(text: str, allowed, what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise SystemExit(f"python -m cuflash warmup: unknown {what} {', '.join(unknown) or repr(text)}; "
                         f"expected a comma-separated list of {', '.join(allowed)}")
    return names


def _head_dims(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.split(",")]
    except ValueError:
        dims = []
    if not dims or any(not 1 <= d <= 256 for d in dims):
        raise SystemExit(f"python -m cuflash warmup: --head-dim {text!r}: expected comma-separated "
                         "integers from 1 to 256")
    return dims


def warmup(argv) -> int:
    """Precompile the named Variants (forward and backward) into CuPy's disk cache (or check them
    offline where no GPU of the arch is here)."""
    from ._gpu import kernels, tiles

    parser = argparse.ArgumentParser(prog="python -m cuflash warmup", description=warmup.__doc__)
    parser.add_argument("--dtype", default="float16,bfloat16,float32,float64")
    parser.add_argument("--head-dim", default="64,128", help="head dims D (= Dv) to prepare, comma-separated")
    parser.add_argument("--mask", default="dense,causal",
                        help="dense (no mask), causal (or window/local: any causal or local mask), or both")
    parser.add_argument("--precision", default="highest",
                        help="float32's precision= values to prepare (highest, ieee, tf32), comma-separated")
    parser.add_argument("--forward-only", action="store_true", help="skip the backward's kernels")
    parser.add_argument("--mods", action="store_true",
                        help="also the score modifiers' kernels (softcap, ALiBi, a bias or a mask: one form per "
                             "dtype and head dim)")
    parser.add_argument("--dropout", action="store_true",
                        help="also attention dropout's kernels (training with dropout_p > 0)")
    parser.add_argument("--inference", action="store_true",
                        help="also the inference kernels: the split-KV decode kernel and its combine (float16, "
                             "bfloat16), the KV-cache append and merge_attention's, for these dtypes and head dims")
    parser.add_argument("--all", action="store_true",
                        help="every Variant the dispatcher can select, and every inference kernel")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile in this many processes")
    parser.add_argument("--arch", default=None,
                        help="e.g. 80, 90a: defaults to the visible GPUs'; without a matching GPU the "
                             "kernels are compile-checked with NVRTC but cannot enter CuPy's cache")
    args = parser.parse_args(argv)
    dtypes = _names(args.dtype, tiles.DTYPES, "--dtype")
    masks = _names(args.mask, tuple(_MASKS), "--mask")
    head_dims = _head_dims(args.head_dim)
    precisions = _names(args.precision, _spec.PRECISIONS, "--precision")

    devices = gpu_devices()
    device_archs = {}
    for i, _, cc in devices:
        device_archs.setdefault(kernels.arch_for_capability(*map(int, cc.split("."))), i)
    archs = [args.arch] if args.arch else (list(device_archs) or ["80", "90a"])
    variants = []
    for arch in archs:
        if args.all:
            variants += tiles.all_variants(arch)
        # (masked, score modifiers, dropout): the plain forms of the masks asked for, then the
        # modifiers' form and the dropout form (each one per dtype and head dim, any mask).
        forms = [(_MASKS[mask], False, False) for mask in masks]
        if args.mods:
            forms.append((True, True, False))
        if args.dropout:
            forms.append((True, True, True))
        for dtype in () if args.all else dtypes:
            for d in head_dims:
                for masked, mods, dropout in dict.fromkeys(forms):
                    for keys in (0, math.inf):  # short rows may take their own tile (tiles.select)
                        for precision in tiles.precisions_of(dtype, precisions):
                            for short in (False, True):  # (tiles.SHORT_ROWS)
                                variants.append(tiles.select(dtype, d, d, masked, arch, keys, mods, precision,
                                                             short=short, dropout=dropout))
                    if not args.forward_only:
                        for precision in tiles.precisions_of(dtype, precisions):
                            for short in (False, True):  # short rows may take their own tile (tiles.SHORT_ROWS)
                                variants += tiles.select_backward(dtype, d, d, masked, arch, mods, precision,
                                                                  short=short, dropout=dropout)
        if args.all or args.inference:
            variants += _inference_kernels(tiles.DTYPES if args.all else dtypes,
                                           (64, 128) if args.all else head_dims, arch)
    variants = list(dict.fromkeys(variants))
    bar = _progress(len(variants))
    jobs = [(variant, device_archs.get(variant.arch)) for variant in variants]
    if args.jobs > 1 and len(jobs) > 1:
        import concurrent.futures
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # CUDA does not survive fork
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            for message in pool.map(kernels.warm, jobs):
                bar(message)
    else:
        for job in jobs:
            bar(kernels.warm(job))
    return 0


def _inference_kernels(dtypes, head_dims, arch) -> list:
    """The kernels of attention_with_kvcache and merge_attention for ``dtypes`` on ``arch``: the
    decode kernel and its combine (float16, bfloat16 at the head dims' buckets), the device
    append (one per element width) and the merge."""
    from ._gpu import decode, kvcache_append, merge

    out = []
    for dtype in dtypes:
        if dtype in ("float16", "bfloat16"):
            out += decode.kernels_for(dtype, head_dims, arch)
        out.append(kvcache_append.kernel(numpy.dtype(dtype if dtype != "bfloat16" else "float16").itemsize, arch))
        out.append(merge.merge_kernel(dtype, arch))
    return out


def bench(argv) -> int:
    """``benchmarks/bench.py`` of the checkout this cuflash runs from, in its own process (the
    benchmarks are not part of the installed package)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
    if not script.is_file():
        print("python -m cuflash bench: the benchmarks ship with the repository, not the package: "
              "run this from a checkout of cuflash (pip install -e .), or run benchmarks/bench.py",
              file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *argv])


def _progress(total: int):
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="kernel")

        def step(message: str) -> None:
            bar.set_postfix_str(message[:60])
            bar.write(message)
            bar.update(1)
    except ImportError:
        count = [0]

        def step(message: str) -> None:
            count[0] += 1
            print(f"[{count[0]}/{total}] {message}", flush=True)

    return step


# --------------------------------------------------------------------------- main

COMMANDS = {"warmup": warmup, "bench": bench}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if argv and argv[0] == "--version":
        print(f"cuflash {cuflash.__version__}")
        return 0
    if argv:
        print(f"python -m cuflash: unknown argument {argv[0]!r}; expected no argument (report, "
              f"self-check, timing), {', '.join(COMMANDS)}, --help or --version", file=sys.stderr)
        return 2
    devices = report()
    on_gpu = bool(devices)
    print("self-check against a float64 dense reference:")
    ok = self_check(on_gpu)
    print("timing:")
    small_timing(on_gpu)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
