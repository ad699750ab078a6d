"""Compiling kernel Variants (``variant.py``): at run time, memoized, or offline.

``get_kernel(variant)`` compiles the Variant with NVRTC through ``cupy.RawModule`` on first use
(logged), memoized per device in this process and cached on disk by CuPy across processes.
A bad disk cache entry costs a compile, never a crash or a wrong kernel (``CheckedCache``).
``compile_offline(variant, arch)`` runs the same source and options through NVRTC directly,
with no GPU, and returns the cubin and ptxas's resource report: CI uses it to prove that every
Variant the dispatcher can select compiles for sm_80 and sm_90a without spilling.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path

from .variant import Variant

logger = logging.getLogger("cuflash")

def source_dir() -> Path:
    """``cuda_src/``: beside the package in a checkout, inside it once installed."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "cuda_src", here.parent / "cuda_src"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cuflash: cuda_src/ not found next to {here}")


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """A digest of every file under cuda_src/.

    CuPy's disk cache keys on the compiled source text and the options, not on headers reached
    through ``-I``. The digest goes into the options, so editing any header changes the key and
    a stale kernel can never be loaded.
    """
    h = hashlib.sha256()
    root = source_dir()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix in (".cu", ".cuh"):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(b"\0")
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:16]


def arch_for_capability(major: int, minor: int) -> str:
    """The NVRTC target for a device. Hopper gets sm_90a: wgmma and setmaxnreg need it."""
    cc = f"{major}{minor}"
    return "90a" if cc == "90" else cc


def cuda_include_dirs() -> list[str]:
    """Directories holding cuda_fp16.h / cuda_bf16.h for NVRTC (pip wheels or a toolkit)."""
    dirs = []
    try:
        import nvidia  # the nvidia-cuda-runtime wheel

        for base in getattr(nvidia, "__path__", []):
            for sub in ("cu13/include", "cu12/include", "cuda_runtime/include"):
                p = Path(base) / sub
                if (p / "cuda_fp16.h").is_file():
                    dirs.append(str(p))
    except ImportError:
        pass
    for env in ("CUDA_PATH", "CUDA_HOME"):
        root = os.environ.get(env)
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            dirs.append(str(Path(root) / "include"))
    if (Path("/usr/local/cuda/include") / "cuda_fp16.h").is_file():
        dirs.append("/usr/local/cuda/include")
    return list(dict.fromkeys(dirs))


def compile_options(variant: Variant) -> tuple[str, ...]:
    """NVRTC options shared by the run-time and the offline path (minus -arch, added by each)."""
    opts = [
        "-std=c++17",
        f"-I{source_dir()}",
        f"-DCUFLASH_SRC_DIGEST=0x{source_digest()}ull",
    ]
    opts += [f"-I{d}" for d in cuda_include_dirs()]
    return tuple(opts)


def kernel_source(variant: Variant) -> str:
    return (source_dir() / f"{variant.kernel}.cu").read_text()


# --------------------------------------------------------------------------- run time
#
# Compilation runs in a thread pool: NVRTC releases the GIL, so the kernels one call needs (the
# backward's three, or a forward's backward compiled ahead while the forward runs) compile side
# by side instead of one after another. Each (Variant, device) is built once: the first caller
# submits it, every later caller waits on the same future.

_kernels: dict[tuple[Variant, int], object] = {}
_builds: dict[tuple[Variant, int], concurrent.futures.Future] = {}
_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _current_device() -> int:
    import cupy

    return cupy.cuda.Device().id


# --- importing ahead -------------------------------------------------------------------------
# A program that imports an adapter (cuflash.torch, cuflash.hf) and then builds its model pays
# CuPy's import (0.4-1 s) inside its first attention call, i.e. its first training step, unless
# the import ran meanwhile. ``import_ahead`` runs it on a daemon thread. The same thread then
# starts NVRTC: a process's first compile pays more than the next ones (NVRTC loading its
# builtins and code generator, once per process, whichever thread: 0.65 s on a 2-core VM, about
# 0.05 s on the lent H100's host), which would otherwise land on the first call's slowest kernel.

_IMPORT_AHEAD: threading.Thread | None = None


def import_ahead() -> None:
    """Start importing CuPy and cuflash's GPU modules on a daemon thread (once), where CuPy is
    installed and CUFLASH_IMPORT_AHEAD is not "0". The first call that needs them waits for that
    import instead of doing its own (Python's import locks); a fork waits for it first, so that a
    child never inherits a half-imported module. Errors are left to that first call to raise."""
    global _IMPORT_AHEAD
    if _IMPORT_AHEAD is not None or os.environ.get("CUFLASH_IMPORT_AHEAD", "1") == "0":
        return
    import importlib.util

    if importlib.util.find_spec("cupy") is None:
        return
    _IMPORT_AHEAD = threading.Thread(target=_import_gpu_modules, name="cuflash-import-ahead", daemon=True)
    os.register_at_fork(before=_finish_import_ahead)
    _IMPORT_AHEAD.start()


def _finish_import_ahead() -> None:
    # (A fork inside the import itself goes on; the bound keeps a fork made while holding a lock
    # the import waits for from hanging for good.)
    if threading.current_thread() is not _IMPORT_AHEAD:
        _IMPORT_AHEAD.join(timeout=60.0)


def _import_gpu_modules() -> None:
    import importlib

    try:
        for name in ("cupy", f"{__package__}.plan"):  # (plan imports the other GPU modules)
            importlib.import_module(name)
        _start_nvrtc()
    except Exception:  # (the first call that needs them raises, with its own traceback)
        pass


_NVRTC_STARTED = False


def _start_nvrtc() -> None:
    """Compile an empty kernel with NVRTC, once per process: NVRTC's one-time start is paid here
    instead of inside the first kernel's build. No GPU is touched (a cubin for the oldest arch
    this NVRTC targets, discarded)."""
    global _NVRTC_STARTED
    if _NVRTC_STARTED:
        return
    from cupy_backends.cuda.libs import nvrtc

    arch = min(nvrtc.getSupportedArchs())
    program = nvrtc.createProgram("__global__ void cuflash_start_nvrtc() {}", "start_nvrtc.cu", (), ())
    try:
        nvrtc.compileProgram(program, (f"-arch=sm_{arch}",))
        nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)
    _NVRTC_STARTED = True


_ALREADY_CURRENT = contextlib.nullcontext()


def made_current(device: int):
    """A context under which CUDA device ``device`` is current (the caller's restored after):
    kernels load for it and launch on its current stream, arrays are allocated there. Where it is
    current already (the common case) a no-op that costs one comparison."""
    import cupy

    if device == cupy.cuda.runtime.getDevice():
        return _ALREADY_CURRENT
    return cupy.cuda.Device(device)


_DEVICE_ATTRIBUTES: dict[tuple[int, str], int] = {}


def device_attribute(name: str) -> int:
    """A CUDA device attribute of CuPy's current device (queried once per device): the SM count,
    the L2 size, ... that the planners size grids and splits by."""
    import cupy

    device = cupy.cuda.Device()
    key = (device.id, name)
    if key not in _DEVICE_ATTRIBUTES:
        _DEVICE_ATTRIBUTES[key] = int(device.attributes[name])
    return _DEVICE_ATTRIBUTES[key]


def _submit(variant: Variant, device: int) -> concurrent.futures.Future:
    global _pool
    key = (variant, device)
    # The digest (every file under cuda_src/ read and hashed) once, here: builds submitted side by
    # side would each compute it before lru_cache holds it (a cached first step on the H200 read
    # the sources four times over, 40 ms of its 146).
    source_digest()
    with _lock:
        future = _builds.get(key)
        if future is None:
            if _pool is None:
                _pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="cuflash-nvrtc")
            future = _pool.submit(_build_on, variant, device)
            _builds[key] = future
    return future


def prefetch(variants, device: int | None = None) -> None:
    """Start compiling ``variants`` in the background (no-op for those built or building)."""
    device = _current_device() if device is None else device
    for variant in variants:
        if (variant, device) not in _kernels:
            _submit(variant, device)


def get_kernel(variant: Variant, device: int | None = None):
    """The compiled ``cupy.RawKernel`` for ``variant`` on ``device`` (default: CuPy's current
    one), memoized; a build in flight is waited for, not repeated."""
    device = _current_device() if device is None else device
    key = (variant, device)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = _submit(variant, device).result()
        _kernels[key] = kernel
    return kernel


def loaded() -> list[str]:
    """The kernel families this process has loaded (``Variant.kernel``, a helper's source stem):
    what a diagnostic run (benchmarks/sanitize.py) reports it exercised."""
    return sorted({variant.kernel for variant, _ in list(_kernels)})


def function_pointer(variant: Variant, device: int) -> int:
    """The kernel's ``CUfunction`` handle on ``device`` (the module stays loaded for the process)."""
    return get_kernel(variant, device).kernel.ptr


def forget() -> None:
    """Drop the memoized kernels (tests and tuning scripts: the next use compiles, or loads from
    CuPy's disk cache, again). Plans hold their kernels: ``plan.forget`` drops both."""
    with _lock:
        _kernels.clear()
        _builds.clear()


def _build_on(variant: Variant, device: int):
    import cupy

    with cupy.cuda.Device(device):
        return _build(variant)


def _build(variant: Variant):
    import cupy

    options = compile_options(variant)
    if variant.arch.endswith("a"):
        # CuPy adds -arch=sm_90 of its own; NVRTC honours the arch-specific target beside it.
        options += (f"-arch=sm_{variant.arch}",)
    logger.info("cuflash: compiling %s (first use in this process; CuPy caches it on disk)", variant)
    start = time.perf_counter()
    cache = cache_guard()
    for attempt in range(2):
        if cache is not None:
            cache.begin()
        try:
            module = cupy.RawModule(
                code=kernel_source(variant),
                options=options,
                name_expressions=(variant.name_expression,),
            )
            kernel = module.get_function(variant.name_expression)
            break
        except _load_errors() as error:
            # A cache entry whose checksum holds but which the driver refuses (written by another
            # CuPy, or damaged before it was checksummed): compile afresh, once, over it.
            served = cache.served() if cache is not None else []
            if attempt or not served:
                raise
            logger.warning("cuflash: %s: the cached binary %s did not load (%s); compiling it again",
                           variant, ", ".join(served), error)
            cache.distrust(served)
    if variant.shared_mem > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = variant.shared_mem
    logger.info("cuflash: %s ready in %.2f s (cached)", variant, time.perf_counter() - start)
    return kernel


def _load_errors() -> tuple[type[BaseException], ...]:
    """What loading a bad module raises: the driver's error (CUDA_ERROR_INVALID_IMAGE, ...)."""
    from cupy_backends.cuda.api import driver

    return (driver.CUDADriverError,)


# --------------------------------------------------------------------------- the disk cache
#
# CuPy (>= 14) keeps compiled kernels in CUPY_CACHE_DIR through a backend object
# (cupy.cuda.compiler._kernel_cache_backend): each file is the SHA-1 of its payload followed by
# the payload, written to a temporary file and renamed over the entry, so a truncated or
# corrupted file fails the checksum and is compiled again, and concurrent writers never expose a
# half-written file. What the checksum cannot catch, CheckedCache does: a file that cannot be
# read (a directory, no permission, an I/O error) is a miss instead of an exception; a payload
# whose checksum holds but whose layout does not (CuPy would fail decoding its names, or hand
# the driver something that is no cubin) is a miss; a payload the driver still refuses is
# compiled again (``_build``, which distrusts that entry in this process until it is rewritten);
# and a cache that cannot be written (disk full, read-only) costs the next process a compile,
# not this call its result. CuPy 13 has no backend object: it checks the SHA-1 itself and
# always recompiles modules with name expressions, which is all cuflash builds.

_CUBIN_MAGICS = (b"\x7fELF",)  # NVRTC cubins are ELF images
_PTX_START = (b"//", b".version", b".target")  # or PTX text, when NVRTC cannot target the arch
_NAMES_MAGIC = b"\x93CUPYNE\x00"  # cupy.cuda.compiler._cache_payload_magic


def plausible_payload(payload: bytes) -> bool:
    """Whether a ``.cubin`` cache payload has the layout CuPy writes: a cubin (ELF) or PTX, with,
    for modules built from name expressions, CuPy's header of UTF-8 mangled names before it."""
    import struct

    if payload.startswith(_NAMES_MAGIC):
        position = len(_NAMES_MAGIC)
        try:
            (count,) = struct.unpack_from("<I", payload, position)
            position += 4
            for _ in range(count):
                (size,) = struct.unpack_from("<I", payload, position)
                position += 4
                if position + size > len(payload):
                    return False
                payload[position:position + size].decode("utf-8")
                position += size
        except (struct.error, UnicodeDecodeError):
            return False
        payload = payload[position:]
    return payload.startswith(_CUBIN_MAGICS) or payload.lstrip().startswith(_PTX_START)


class CheckedCache:
    """A CuPy kernel cache backend around another (CuPy's disk cache): see the section's notes.

    ``begin()`` / ``served()``: the entries this thread was served since it began a build (the
    compile runs in the thread that calls RawModule). ``distrust(names)``: serve them no more in
    this process, until a fresh compile rewrites them.
    """

    def __init__(self, inner):
        self.inner = inner
        self._local = threading.local()
        self._distrusted: set[str] = set()
        self._warned_save = False

    def begin(self) -> None:
        self._local.served = []

    def served(self) -> list[str]:
        return list(getattr(self._local, "served", ()))

    def distrust(self, names) -> None:
        self._distrusted.update(names)

    def load(self, name: str):
        if name in self._distrusted:
            return None
        try:
            payload = self.inner.load(name)
        except OSError as error:
            logger.warning("cuflash: kernel cache entry %s cannot be read (%s); compiling instead", name, error)
            return None
        if payload is None:
            return None
        if name.endswith(".cubin") and not plausible_payload(payload):
            logger.warning("cuflash: kernel cache entry %s is not a kernel CuPy wrote; compiling instead", name)
            return None
        served = getattr(self._local, "served", None)
        if served is not None:
            served.append(name)
        return payload

    def save(self, name: str, cubin: bytes, source: str) -> None:
        try:
            self.inner.save(name, cubin, source)
        except OSError as error:
            if not self._warned_save:
                self._warned_save = True
                logger.warning("cuflash: cannot write the kernel cache (%s): kernels work, but each new process "
                               "compiles them again", error)
            return
        self._distrusted.discard(name)

    def __getattr__(self, attribute):  # anything else a backend offers, the inner one answers
        if attribute == "inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(attribute)
        return getattr(self.inner, attribute)


_guard_lock = threading.Lock()


def cache_guard() -> CheckedCache | None:
    """CuPy's current kernel cache backend, wrapped in a CheckedCache (installed once, and again
    if someone replaced it); None where CuPy has no backend object (CuPy 13)."""
    try:
        from cupy.cuda import compiler
    except ImportError:
        return None
    backend = getattr(compiler, "_kernel_cache_backend", None)
    setter = getattr(compiler, "_set_kernel_cache_backend", None)
    if backend is None or setter is None:
        return None
    with _guard_lock:
        backend = compiler._kernel_cache_backend
        if not isinstance(backend, CheckedCache):
            backend = CheckedCache(backend)
            setter(backend)
    return backend


def warm(job: tuple[Variant, int | None]) -> str:
    """Compile one Variant: into CuPy's disk cache on ``device`` (a GPU of its arch), or, with
    no such GPU (``device`` None), an offline NVRTC check. A module-level function so that
    ``python -m cuflash warmup`` can hand it to worker processes."""
    variant, device = job
    if device is not None:
        import cupy

        with cupy.cuda.Device(device):
            get_kernel(variant)
        return f"{variant}: cached"
    build = compile_offline(variant)
    return (f"{variant}: compiles ({build.registers} registers, {build.spill_bytes} bytes spilled; "
            "no GPU of this arch here to cache it on)")


# --------------------------------------------------------------------------- offline

@dataclasses.dataclass
class OfflineBuild:
    variant: Variant
    cubin: bytes
    log: str

    @property
    def registers(self) -> int:
        m = re.search(r"Used (\d+) registers", self.log)
        return int(m.group(1)) if m else -1

    @property
    def spill_bytes(self) -> int:
        return sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", self.log))

    @property
    def stack_bytes(self) -> int:
        m = re.search(r"(\d+) bytes stack frame", self.log)
        return int(m.group(1)) if m else 0

    @property
    def wgmma_serialized(self) -> bool:
        """ptxas's C7511: it made every wgmma wait for the one before (e.g. "insufficient register
        resources for the wgmma pipeline"), with no spill to show for it (session 54's "ahead"
        patch ran at 0.68x so on the GPU in session 55, at 231 registers and no spills)."""
        return "C7511" in self.log or "wgmma.mma_async instructions are serialized" in self.log


def compile_offline(variant: Variant, extra_source: str = "") -> OfflineBuild:
    """Compile ``variant`` for ``variant.arch`` with NVRTC and no GPU; ptxas's report in ``log``."""
    from cupy_backends.cuda.libs import nvrtc

    source = kernel_source(variant) + extra_source
    options = compile_options(variant) + (
        f"-arch=sm_{variant.arch}",
        "-Xptxas=-v",
        "--device-as-default-execution-space",
        "-ftz=true",  # as CuPy compiles at run time
    )
    prog = nvrtc.createProgram(source, f"{variant.kernel}.cu", (), ())
    try:
        nvrtc.addNameExpression(prog, variant.name_expression)
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as e:
            raise RuntimeError(
                f"NVRTC failed on {variant}:\n{nvrtc.getProgramLog(prog)}"
            ) from e
        log = nvrtc.getProgramLog(prog)
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return OfflineBuild(variant, cubin, log)
