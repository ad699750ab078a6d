"""The compiled-kernel cache: a damaged entry costs a compile, never a crash or a wrong kernel, and
an edited source never runs a kernel compiled from the old one.

Without a GPU: CuPy's disk cache backend (what it detects by itself: every file carries the SHA-1
of its payload), cuflash's ``kernels.CheckedCache`` around it (unreadable entries, checksummed
payloads of the wrong layout, entries the driver refuses, a cache that cannot be written),
``kernels._build``'s second compile over an entry the driver refuses (with a stand-in for
``cupy.RawModule``), and the source digest in the compile options (every file NVRTC can include
is digested; an edit anywhere changes the options; NVRTC reads the headers from the digested
directory).

With a GPU (marked gpu): eight processes starting cold on one empty CUPY_CACHE_DIR all get
correct results and leave only valid entries; truncated, corrupted and checksummed-but-bogus
entries are rebuilt by the next process; a header edited to ``#error`` fails to compile instead
of loading the kernel cached before the edit.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("cupy_backends.cuda.libs.nvrtc")

from cuflash._gpu import kernels  # noqa: E402

compiler = pytest.importorskip("cupy.cuda.compiler")
REPO = Path(kernels.__file__).resolve().parents[2]

needs_backend = pytest.mark.skipif(not hasattr(compiler, "_kernel_cache_backend"),
                                   reason="CuPy < 14 has no kernel cache backend object")


def _disk(path):
    from cupy.cuda._compiler_cache import DiskKernelCacheBackend

    return DiskKernelCacheBackend(str(path))


def _payload(cubin=b"\x7fELF" + bytes(range(200))):
    """A cache payload as CuPy writes one for a module built from one name expression."""
    return compiler._encode_cache_payload(["_ZN7cuflash3fwdIfEEvv"], cubin)


def _write_checksummed(directory, name, payload):
    """An entry whose SHA-1 holds, whatever its payload: what only a buggy or foreign writer makes."""
    digest = hashlib.sha1(payload).hexdigest().encode("ascii")
    (Path(directory) / name).write_bytes(digest + payload)


NAME = "0123456789abcdef0123456789abcdef01234567.cubin"


# --- CuPy's own checks ---------------------------------------------------------------------------


@needs_backend
@pytest.mark.parametrize("damage", ["empty", "hash-only", "truncated-payload", "one-byte-short", "flipped-payload",
                                    "flipped-hash", "appended"])
def test_cupy_detects_a_truncated_or_corrupted_file(tmp_path, damage):
    """What cuflash relies on CuPy for: a damaged file is a miss (then compiled and rewritten)."""
    disk = _disk(tmp_path)
    disk.save(NAME, _payload(), "source")
    assert disk.load(NAME) == _payload()
    path = tmp_path / NAME
    data = bytearray(path.read_bytes())
    if damage == "empty":
        data = bytearray()
    elif damage == "hash-only":
        data = data[:40]
    elif damage == "truncated-payload":
        data = data[:len(data) // 2]
    elif damage == "one-byte-short":
        data = data[:-1]
    elif damage == "flipped-payload":
        data[-7] ^= 0x40
    elif damage == "flipped-hash":
        data[3] = ord("0") if data[3] != ord("0") else ord("1")
    else:
        data += b"\0"
    path.write_bytes(bytes(data))
    assert disk.load(NAME) is None


# --- CheckedCache -----------------------------------------------------------------------------------


@needs_backend
def test_checked_cache_serves_good_entries_and_records_them(tmp_path):
    cache = kernels.CheckedCache(_disk(tmp_path))
    cache.save(NAME, _payload(), "source")
    cache.begin()
    assert cache.load(NAME) == _payload()
    assert cache.served() == [NAME]
    (tmp_path / NAME).write_bytes((tmp_path / NAME).read_bytes()[:100])  # truncated: CuPy's miss
    cache.begin()
    assert cache.load(NAME) is None and cache.served() == []


@needs_backend
@pytest.mark.parametrize("payload", [
    compiler._encode_cache_payload([], b"")[:8] + b"\x01\x00\x00\x00\x04\x00\x00\x00\xff\xfe\xfd\xfc\x7fELF...",
    compiler._encode_cache_payload([], b"")[:8] + b"\x05\x00\x00\x00\x10\x00\x00\x00short",
    compiler._encode_cache_payload([], b"")[:8] + b"\x01\x00",
    _payload(b"MZ this is no cubin"),
    _payload(b""),
    b"garbage that is neither ELF nor PTX",
], ids=["names-not-utf8", "names-past-the-end", "header-cut", "not-elf", "empty-cubin", "bare-garbage"])
def test_a_checksummed_payload_of_the_wrong_layout_is_a_miss(tmp_path, caplog, payload):
    """The checksum holds, the layout does not: CuPy would fail decoding the names (a
    UnicodeDecodeError out of RawModule) or hand the driver garbage; cuflash compiles instead."""
    _write_checksummed(tmp_path, NAME, payload)
    assert _disk(tmp_path).load(NAME) == payload  # CuPy itself serves it
    with caplog.at_level(logging.WARNING, logger="cuflash"):
        assert kernels.CheckedCache(_disk(tmp_path)).load(NAME) is None
    assert "not a kernel CuPy wrote" in caplog.text


def test_cupy_would_crash_on_names_that_are_not_utf8():
    """Why the layout check matters: CuPy's decoder raises instead of reporting a miss."""
    payload = compiler._encode_cache_payload([], b"")[:8] + b"\x01\x00\x00\x00\x02\x00\x00\x00\xff\xfe\x7fELF"
    with pytest.raises(UnicodeDecodeError):
        compiler._decode_cache_payload(payload, 1)


@pytest.mark.parametrize("payload", [
    _payload(), b"\x7fELF\x02\x01\x01", b"//\n// Generated by NVIDIA NVVM Compiler\n.version 8.8\n",
    _payload(b"\n.version 9.0\n.target sm_90a\n"),
], ids=["names-and-elf", "bare-elf", "bare-ptx", "names-and-ptx"])
def test_payloads_cupy_writes_are_plausible(payload):
    assert kernels.plausible_payload(payload)


@needs_backend
def test_other_kinds_of_entries_pass_through_unchecked(tmp_path):
    """LTO-IR and other entries (other CuPy users in the process) are not cuflash's to judge."""
    cache = kernels.CheckedCache(_disk(tmp_path))
    name = NAME.replace(".cubin", ".ltoir")
    cache.save(name, b"\x00LTO-IR bytes", "source")
    assert cache.load(name) == b"\x00LTO-IR bytes"


@needs_backend
def test_an_unreadable_entry_is_a_miss(tmp_path, caplog):
    (tmp_path / NAME).mkdir()  # a directory where the file should be
    with pytest.raises(OSError):
        _disk(tmp_path).load(NAME)
    with caplog.at_level(logging.WARNING, logger="cuflash"):
        assert kernels.CheckedCache(_disk(tmp_path)).load(NAME) is None
    assert "cannot be read" in caplog.text


@needs_backend
def test_a_cache_that_cannot_be_written_costs_only_the_next_process(tmp_path, caplog):
    disk = _disk(tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache")
    (tmp_path / "cache").write_text("a file where the directory was")
    with pytest.raises(OSError):
        disk.save(NAME, _payload(), "source")
    cache = kernels.CheckedCache(disk)
    with caplog.at_level(logging.WARNING, logger="cuflash"):
        cache.save(NAME, _payload(), "source")
        cache.save(NAME, _payload(), "source")
    assert caplog.text.count("cannot write the kernel cache") == 1
    assert cache.load(NAME) is None


@needs_backend
def test_a_distrusted_entry_is_served_again_only_once_rewritten(tmp_path):
    cache = kernels.CheckedCache(_disk(tmp_path))
    cache.save(NAME, _payload(), "source")
    cache.distrust([NAME])
    assert cache.load(NAME) is None
    cache.save(NAME, _payload(b"\x7fELF fresh"), "source")
    assert cache.load(NAME) == _payload(b"\x7fELF fresh")


@needs_backend
def test_the_guard_wraps_whatever_backend_cupy_has(monkeypatch, tmp_path):
    monkeypatch.setattr(compiler, "_kernel_cache_backend", _disk(tmp_path))
    guard = kernels.cache_guard()
    assert isinstance(guard, kernels.CheckedCache) and compiler._kernel_cache_backend is guard
    assert kernels.cache_guard() is guard  # installed once
    replacement = _disk(tmp_path / "other")
    compiler._set_kernel_cache_backend(replacement)
    again = kernels.cache_guard()
    assert again is not guard and again.inner is replacement and compiler._kernel_cache_backend is again
    assert again._cache_dir == str(tmp_path / "other")  # the inner backend's attributes show through


# --- _build: an entry the driver refuses is compiled again ------------------------------------------


class FakeDriverError(Exception):
    """Stands in for CUDADriverError (CUDA_ERROR_INVALID_IMAGE), which needs libcuda to build."""


class FakeRawModule:
    """cupy.RawModule's part of the cache protocol: load the entry; if there is none, compile and
    save; 'load' into the driver, which refuses payloads marked REFUSED."""

    calls = []
    refuse_fresh = False

    def __init__(self, code, options, name_expressions):
        self.options = options
        FakeRawModule.calls.append(options)

    def get_function(self, name):
        backend = compiler._kernel_cache_backend
        payload = backend.load(NAME)
        if payload is None:
            payload = _payload(b"\x7fELF REFUSED" if FakeRawModule.refuse_fresh else b"\x7fELF compiled")
            backend.save(NAME, payload, "source")
        if b"REFUSED" in payload:
            raise FakeDriverError("CUDA_ERROR_INVALID_IMAGE")
        return FakeKernel(payload)


class FakeKernel:
    def __init__(self, payload):
        self.payload = payload
        self.max_dynamic_shared_size_bytes = 0


@pytest.fixture
def fake_cupy(monkeypatch, tmp_path):
    cupy = pytest.importorskip("cupy")
    if not hasattr(compiler, "_kernel_cache_backend"):
        pytest.skip("CuPy < 14 has no kernel cache backend object")
    monkeypatch.setattr(cupy, "RawModule", FakeRawModule)
    monkeypatch.setattr(compiler, "_kernel_cache_backend", _disk(tmp_path))
    monkeypatch.setattr(kernels, "_load_errors", lambda: (FakeDriverError,))
    monkeypatch.setattr(FakeRawModule, "calls", [])
    monkeypatch.setattr(FakeRawModule, "refuse_fresh", False)
    return tmp_path


def _a_variant():
    from cuflash._gpu import tiles

    return tiles.select("float32", 64, 64, False, "80")


def test_build_compiles_again_over_an_entry_the_driver_refuses(fake_cupy, caplog):
    _write_checksummed(fake_cupy, NAME, _payload(b"\x7fELF REFUSED by the driver"))
    with caplog.at_level(logging.WARNING, logger="cuflash"):
        kernel = kernels._build(_a_variant())
    assert kernel.payload == _payload(b"\x7fELF compiled")
    assert len(FakeRawModule.calls) == 2
    assert "did not load" in caplog.text and NAME in caplog.text
    assert _disk(fake_cupy).load(NAME) == _payload(b"\x7fELF compiled")  # rewritten for the next process
    FakeRawModule.calls.clear()
    assert kernels._build(_a_variant()).payload == _payload(b"\x7fELF compiled")  # served, once
    assert len(FakeRawModule.calls) == 1


def test_build_does_not_loop_when_a_fresh_compile_is_refused_too(fake_cupy):
    _write_checksummed(fake_cupy, NAME, _payload(b"\x7fELF REFUSED"))
    FakeRawModule.refuse_fresh = True
    with pytest.raises(FakeDriverError):
        kernels._build(_a_variant())
    assert len(FakeRawModule.calls) == 2


def test_build_raises_at_once_when_nothing_came_from_the_cache(fake_cupy):
    FakeRawModule.refuse_fresh = True
    with pytest.raises(FakeDriverError):
        kernels._build(_a_variant())
    assert len(FakeRawModule.calls) == 1


def test_build_passes_the_source_digest_to_cupy(fake_cupy, monkeypatch, tmp_path):
    """The options CuPy keys its cache on carry the digest, and an edited header changes them."""
    copy = tmp_path / "cuda_src"
    shutil.copytree(kernels.source_dir(), copy)
    monkeypatch.setattr(kernels, "source_dir", lambda: copy)
    kernels.source_digest.cache_clear()
    try:
        kernels._build(_a_variant())
        header = copy / "params.cuh"
        header.write_text(header.read_text() + "\n// edited\n")
        kernels.source_digest.cache_clear()
        kernels._build(_a_variant())
    finally:
        kernels.source_digest.cache_clear()
    before, after = FakeRawModule.calls[0], FakeRawModule.calls[-1]
    digests = [next(o for o in options if o.startswith("-DCUFLASH_SRC_DIGEST=")) for options in (before, after)]
    assert digests[0] != digests[1]


# --- the source digest -------------------------------------------------------------------------------


def test_every_file_nvrtc_can_include_is_digested():
    """The digest reads .cu and .cuh files only: anything else under cuda_src/ could change a kernel
    without changing the options (and so be served stale from CuPy's cache)."""
    undigested = [p.name for p in kernels.source_dir().rglob("*") if p.is_file() and p.suffix not in (".cu", ".cuh")]
    assert not undigested, f"files under cuda_src/ that source_digest() ignores: {undigested}"


@pytest.fixture
def source_copy(tmp_path, monkeypatch):
    copy = tmp_path / "cuda_src"
    shutil.copytree(kernels.source_dir(), copy)
    monkeypatch.setattr(kernels, "source_dir", lambda: copy)
    kernels.source_digest.cache_clear()
    yield copy
    kernels.source_digest.cache_clear()


def _digest_after(change):
    kernels.source_digest.cache_clear()
    before = kernels.source_digest()
    change()
    kernels.source_digest.cache_clear()
    return before, kernels.source_digest()


@pytest.mark.parametrize("name", sorted(p.name for p in kernels.source_dir().iterdir() if p.suffix in (".cu", ".cuh")))
def test_editing_any_source_changes_the_digest(source_copy, name):
    path = source_copy / name
    before, after = _digest_after(lambda: path.write_text(path.read_text() + "\n// one more line\n"))
    assert before != after


@pytest.mark.parametrize("change", ["add-header", "remove-header", "rename-header", "whitespace"])
def test_adding_removing_or_renaming_a_header_changes_the_digest(source_copy, change):
    header = source_copy / "mask.cuh"

    def apply():
        if change == "add-header":
            (source_copy / "new_feature.cuh").write_text("#pragma once\n")
        elif change == "remove-header":
            header.unlink()
        elif change == "rename-header":
            header.rename(source_copy / "mask2.cuh")
        else:
            header.write_text(header.read_text() + " ")

    before, after = _digest_after(apply)
    assert before != after


class _Probe:
    """A Variant-shaped description of a tiny kernel in a copied source dir (compile_offline
    reads ``kernel``, ``name_expression`` and ``arch``)."""

    kernel = "probe"
    name_expression = "cuflash::probe<float>"
    arch = "80"


def _nvrtc_available():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return bool(kernels.cuda_include_dirs())
    except Exception:
        return False


@pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC or the CUDA headers are not installed")
def test_nvrtc_reads_the_headers_of_the_digested_directory(tmp_path, monkeypatch):
    """Headers come from source_dir() through -I, the directory the digest covers: an edit there
    is what NVRTC compiles (here an #error), not some other copy."""
    source = tmp_path / "cuda_src"
    source.mkdir()
    (source / "probe.cuh").write_text("#pragma once\nnamespace cuflash { constexpr int kProbe = 3; }\n")
    (source / "probe.cu").write_text(textwrap.dedent("""\
        #include "probe.cuh"
        namespace cuflash {
        template <typename T> __global__ void probe(T* x) { x[threadIdx.x] *= T(kProbe); }
        template __global__ void probe<float>(float*);
        }
    """))
    monkeypatch.setattr(kernels, "source_dir", lambda: source)
    kernels.source_digest.cache_clear()
    try:
        first = kernels.source_digest()
        assert kernels.compile_offline(_Probe()).cubin
        (source / "probe.cuh").write_text('#pragma once\n#error "edited header"\n')
        kernels.source_digest.cache_clear()
        assert kernels.source_digest() != first
        with pytest.raises(RuntimeError, match="edited header"):
            kernels.compile_offline(_Probe())
    finally:
        kernels.source_digest.cache_clear()


# --- on a GPU: cold starts, damaged entries, edited headers ------------------------------------------

CHILD = textwrap.dedent("""\
    import os, sys, pathlib
    import numpy, cupy, ml_dtypes
    import cuflash
    from cuflash._gpu import kernels
    if len(sys.argv) > 1:  # a copied cuda_src/
        kernels.source_dir = lambda: pathlib.Path(sys.argv[1])
    rng = numpy.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    cases = (("float16", True, 2e-2), ("bfloat16", False, 6e-2), ("float32", True, 1e-4))
    wanted = os.environ.get("CHILD_DTYPES")  # fewer kernels to compile where a test needs only some
    for dtype, causal, tol in (c for c in cases if not wanted or c[0] in wanted.split(",")):
        dt = numpy.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else numpy.dtype(dtype)
        q, k, v, dout = (rng.standard_normal((1, 2, 97, 64)).astype(dt) for _ in range(4))
        out, lse = cuflash.attention(*(cupy.asarray(x) for x in (q, k, v)), causal=causal, return_lse=True)
        grads = cuflash.attention_backward(*(cupy.asarray(x) for x in (dout, q, k, v)), out, lse, causal=causal)
        want_out, want_lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)  # the CPU backend
        want = cuflash.attention_backward(dout, q, k, v, want_out, want_lse, causal=causal)
        for name, got, ref in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (want_out, want_lse, *want)):
            got = cupy.asnumpy(got).astype(numpy.float64)
            ref = numpy.asarray(ref, numpy.float64)
            err = numpy.abs(got - ref).max() / max(1.0, numpy.abs(ref).max())
            assert numpy.isfinite(got).all() and err < tol, (dtype, name, err)
    print("CHILD OK")
""")


def _env(cache_dir, dtypes=None):
    env = dict(os.environ)
    if dtypes:
        env["CHILD_DTYPES"] = dtypes
    env["CUPY_CACHE_DIR"] = str(cache_dir)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    return env


def _run_children(cache_dir, count=1, args=(), timeout=600, dtypes=None):
    """Start ``count`` children at once (output to files: a full pipe must not stall one), wait."""
    logs = Path(cache_dir).parent / "logs"
    logs.mkdir(exist_ok=True)
    started = []
    for i in range(count):
        out, err = (open(logs / f"{len(list(logs.iterdir()))}-{i}.{kind}", "w+") for kind in ("out", "err"))
        process = subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], env=_env(cache_dir, dtypes),
                                   stdout=out, stderr=err, text=True)
        started.append((process, out, err))
    results = []
    for process, out, err in started:
        process.wait(timeout=timeout)
        out.seek(0)
        err.seek(0)
        results.append((process.returncode, out.read(), err.read()))
        out.close()
        err.close()
    return results


def _entries(cache_dir):
    return sorted(p for p in Path(cache_dir).iterdir() if p.is_file())


def _assert_valid_cache(cache_dir):
    names = [p.name for p in _entries(cache_dir)]
    strays = [n for n in names if not re.fullmatch(r"[0-9a-f]{40}\.(cubin|ltoir|hsaco)(\.cu)?", n)]
    assert not strays, f"files other than cache entries left behind (unfinished writes?): {strays}"
    disk = _disk(cache_dir)
    for name in names:
        if name.endswith(".cubin"):
            payload = disk.load(name)
            assert payload is not None and kernels.plausible_payload(payload), name
    return names


@pytest.mark.gpu
@needs_backend
def test_eight_processes_cold_on_one_empty_cache_all_get_correct_results(tmp_path):
    cache_dir = tmp_path / "kernel_cache"
    cache_dir.mkdir()
    results = _run_children(cache_dir, count=8)
    for rc, stdout, stderr in results:
        assert rc == 0 and "CHILD OK" in stdout, stderr[-3000:]
    names = _assert_valid_cache(cache_dir)
    assert names, "nothing was cached"
    # A ninth process finds everything on disk and agrees.
    (rc, stdout, stderr), = _run_children(cache_dir)
    assert rc == 0 and "CHILD OK" in stdout, stderr[-3000:]
    assert _assert_valid_cache(cache_dir) == names


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory):
    """A kernel cache one child filled (float16 kernels only), for each damage case to copy."""
    cache_dir = tmp_path_factory.mktemp("filled") / "kernel_cache"
    cache_dir.mkdir()
    (rc, stdout, stderr), = _run_children(cache_dir, dtypes="float16")
    assert rc == 0 and "CHILD OK" in stdout, stderr[-3000:]
    return cache_dir


@pytest.mark.gpu
@needs_backend
@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "checksummed-bogus-cubin", "checksummed-bad-names",
                                    "empty", "directory"])
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, filled_cache, damage):
    cache_dir = tmp_path / "kernel_cache"
    shutil.copytree(filled_cache, cache_dir)
    entries = [p for p in _entries(cache_dir) if p.suffix == ".cubin"]
    assert entries
    for path in entries:
        data = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(data[: len(data) // 3])
        elif damage == "flip-byte":
            corrupted = bytearray(data)
            corrupted[len(data) // 2] ^= 0xFF
            path.write_bytes(bytes(corrupted))
        elif damage == "checksummed-bogus-cubin":  # passes the checksum and the layout check: the driver refuses it
            payload = compiler._encode_cache_payload(["_Z5bogusv"], b"\x7fELF" + os.urandom(4096))
            _write_checksummed(cache_dir, path.name, payload)
        elif damage == "checksummed-bad-names":  # passes the checksum; CuPy's decoder would raise
            _write_checksummed(cache_dir, path.name, b"\x93CUPYNE\x00\x01\x00\x00\x00\x02\x00\x00\x00\xff\xfe\x7fELF")
        elif damage == "empty":
            path.write_bytes(b"")
        else:
            path.unlink()
            path.mkdir()
    (rc, stdout, stderr), = _run_children(cache_dir, dtypes="float16")
    assert rc == 0 and "CHILD OK" in stdout, stderr[-3000:]
    if damage != "directory":  # a directory in the way cannot be replaced; it is compiled around
        _assert_valid_cache(cache_dir)


@pytest.mark.gpu
@needs_backend
def test_an_edited_header_never_serves_the_kernel_cached_before(tmp_path):
    cache_dir, source = tmp_path / "kernel_cache", tmp_path / "cuda_src"
    cache_dir.mkdir()
    shutil.copytree(kernels.source_dir(), source)
    (rc, stdout, stderr), = _run_children(cache_dir, args=[source], dtypes="float16")
    assert rc == 0 and "CHILD OK" in stdout, stderr[-3000:]
    cached = set(p.name for p in _entries(cache_dir))
    header = source / "params.cuh"
    original = header.read_text()
    header.write_text(original + '\n#error "edited after caching"\n')
    (rc, stdout, stderr), = _run_children(cache_dir, args=[source], dtypes="float16")
    assert rc != 0 and "edited after caching" in stderr, "a kernel compiled before the edit was served"
    header.write_text(original + "\n// a harmless edit\n")
    (rc, stdout, stderr), = _run_children(cache_dir, args=[source], dtypes="float16")
    assert rc == 0 and "CHILD OK" in stdout, stderr[-3000:]
    assert set(p.name for p in _entries(cache_dir)) - cached, "the edited sources were not compiled afresh"
