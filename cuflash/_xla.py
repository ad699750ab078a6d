"""XLA custom calls into cuflash without a compiled library: JAX's typed FFI, answered by Python.

Under ``jax.jit`` a function may call a *custom call target*: a C function XLA invokes with the
call's buffers (device pointers on a GPU, host pointers on the CPU) and, on a GPU, the CUDA
stream XLA runs the program on. ``jax.ffi`` registers such a function from a PyCapsule that
holds its address. Here the function is a ``ctypes.CFUNCTYPE`` callback: XLA calls into this
module, which reads the call frame (the structs of ``xla/ffi/api/c_api.h``, mirrored below),
views the buffers as NumPy arrays (CPU) or CuPy arrays (GPU, on XLA's stream, no copy) and runs a
Python function registered for the call. So a jitted program on a GPU runs cuflash's kernels on
its own buffers and stream, with no host round trip and nothing to build.

The FFI's C ABI is stable (versioned: XLA asks a handler its version through the metadata
extension, answered with the version of the API XLA hands over). A call is identified by a
64-bit attribute ``call_id`` (``register``): one id per distinct configuration, so that
repeated traces of one configuration reuse it and the table stays small.
"""
from __future__ import annotations

import ctypes
import functools
import threading
import traceback
import warnings

import numpy

TARGET = "cuflash_callback"
PLATFORMS = ("cpu", "CUDA")

# --- the C structs (xla/ffi/api/c_api.h) ---------------------------------------------------------

_METADATA_EXTENSION = 1          # XLA_FFI_Extension_Metadata
_EXECUTE = 3                     # XLA_FFI_ExecutionStage_EXECUTE
_SCALAR = 3                      # XLA_FFI_AttrType_SCALAR
_INVALID_ARGUMENT, _INTERNAL = 3, 13  # XLA_FFI_Error_Code
_S64 = 5                         # XLA_FFI_DataType_S64


class _ExtensionBase(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", ctypes.c_void_p)]


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion), ("traits", ctypes.c_uint32),
                ("state_type_id", ctypes.c_int64)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("dtype", ctypes.c_int),
                ("data", ctypes.c_void_p), ("rank", ctypes.c_int64), ("dims", ctypes.POINTER(ctypes.c_int64))]


class _Span(ctypes.Structure):  # Args and Rets: (size, types, pointers)
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("size", ctypes.c_int64),
                ("types", ctypes.POINTER(ctypes.c_int)), ("items", ctypes.POINTER(ctypes.c_void_p))]


class _ByteSpan(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Scalar(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("value", ctypes.c_void_p)]


class _Attrs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("size", ctypes.c_int64),
                ("types", ctypes.POINTER(ctypes.c_int)), ("names", ctypes.POINTER(ctypes.POINTER(_ByteSpan))),
                ("attrs", ctypes.POINTER(ctypes.c_void_p))]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("api", ctypes.c_void_p), ("ctx", ctypes.c_void_p), ("stage", ctypes.c_int), ("args", _Span),
                ("rets", _Span), ("attrs", _Attrs), ("future", ctypes.c_void_p)]


class _Api(ctypes.Structure):  # the leading fields; XLA's struct goes on
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("api_version", _ApiVersion),
                ("internal_api", ctypes.c_void_p), ("error_create", ctypes.c_void_p),
                ("error_get_message", ctypes.c_void_p), ("error_destroy", ctypes.c_void_p),
                ("handler_register", ctypes.c_void_p), ("stream_get", ctypes.c_void_p)]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("message", ctypes.c_char_p),
                ("errc", ctypes.c_int)]


class _StreamGetArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("ctx", ctypes.c_void_p),
                ("stream", ctypes.c_void_p)]


_ERROR_CREATE = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrorCreateArgs))
_STREAM_GET = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_StreamGetArgs))
_HANDLER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))


@functools.lru_cache(maxsize=None)
def _dtypes() -> dict:
    """XLA_FFI_DataType -> NumPy dtype, for what cuflash takes and returns (uint32: a dropout
    seed's two words)."""
    import ml_dtypes  # JAX's own dependency: bfloat16 for NumPy

    return {1: numpy.dtype(bool), 4: numpy.dtype(numpy.int32), 5: numpy.dtype(numpy.int64),
            8: numpy.dtype(numpy.uint32), 10: numpy.dtype(numpy.float16), 11: numpy.dtype(numpy.float32), 12: numpy.dtype(numpy.float64),
            16: numpy.dtype(ml_dtypes.bfloat16)}


# --- the calls' Python side ----------------------------------------------------------------------

_LOCK = threading.Lock()
_IDS: dict = {}        # a configuration's key -> its callback id
_CALLBACKS: dict = {}  # callback id -> fn(arrays, results, xp): reads arrays, writes results


def register(key, make_callback) -> int:
    """The callback id of configuration ``key`` (hashable), its callback made by
    ``make_callback()`` the first time: ``fn(arrays, results, xp)`` gets the call's operands and
    result buffers as arrays of ``xp`` (NumPy, or CuPy on XLA's stream) and fills the results."""
    with _LOCK:
        callback_id = _IDS.get(key)
        if callback_id is None:
            callback_id = _IDS[key] = len(_IDS) + 1
            _CALLBACKS[callback_id] = make_callback()
        return callback_id


def _view(buffer, dtypes, xp, device_id):
    """An array of ``xp`` over an XLA buffer (no copy)."""
    shape = tuple(buffer.dims[i] for i in range(buffer.rank))
    dtype = dtypes[buffer.dtype]
    nbytes = int(numpy.prod(shape, dtype=numpy.int64)) * dtype.itemsize
    if nbytes == 0:  # (XLA may hand over no address for an empty buffer)
        return xp.empty(shape, dtype)
    if xp is numpy:
        return numpy.frombuffer((ctypes.c_char * nbytes).from_address(buffer.data), dtype=dtype).reshape(shape)
    memory = xp.cuda.UnownedMemory(buffer.data or 0, nbytes, None, device_id)
    return xp.ndarray(shape, dtype, xp.cuda.MemoryPointer(memory, 0))


def _buffers(span):
    return [ctypes.cast(span.items[i], ctypes.POINTER(_Buffer)).contents for i in range(span.size)]


def _device_of(cupy, buffers) -> int:
    """The GPU that holds the call's buffers (XLA's device for this call)."""
    for buffer in buffers:
        if buffer.data:
            return int(cupy.cuda.runtime.pointerGetAttributes(buffer.data).device)
    return int(cupy.cuda.runtime.getDevice())


def _callback_id(attrs) -> int:
    for i in range(attrs.size):
        name = attrs.names[i].contents
        if attrs.types[i] == _SCALAR and ctypes.string_at(name.ptr, name.len) == b"call_id":
            scalar = ctypes.cast(attrs.attrs[i], ctypes.POINTER(_Scalar)).contents
            if scalar.dtype == _S64:
                return ctypes.cast(scalar.value, ctypes.POINTER(ctypes.c_int64)).contents.value
    raise ValueError("a cuflash custom call without its call_id attribute")


def _error(api, message: str, code: int):
    """An XLA_FFI_Error* that XLA reports as the call's failure."""
    create = _ERROR_CREATE(api.error_create)
    args = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message.encode(errors="replace"), code)
    return create(ctypes.byref(args))


def _stream(api, ctx) -> int:
    get = _STREAM_GET(api.stream_get)
    args = _StreamGetArgs(ctypes.sizeof(_StreamGetArgs), None, ctx, None)
    if get(ctypes.byref(args)):
        raise RuntimeError("XLA gave no CUDA stream to a cuflash custom call")
    return args.stream or 0


def _answer_metadata(frame) -> bool:
    """Fill the metadata XLA asks for (our ABI version: the API's own; no traits), if it asks."""
    extension = frame.extension_start
    if not extension or extension.contents.type != _METADATA_EXTENSION:
        return False
    metadata = ctypes.cast(extension, ctypes.POINTER(_MetadataExtension)).contents.metadata.contents
    version = ctypes.cast(frame.api, ctypes.POINTER(_Api)).contents.api_version if frame.api else None
    metadata.api_version.major_version = version.major_version if version else 0
    metadata.api_version.minor_version = version.minor_version if version else 1
    metadata.traits = 0  # not command-buffer safe: the callback allocates and may plan
    return True


def _handle(frame_pointer, on_gpu: bool):
    frame = frame_pointer.contents
    if _answer_metadata(frame) or frame.stage != _EXECUTE:
        return None
    api = ctypes.cast(frame.api, ctypes.POINTER(_Api)).contents
    try:
        callback = _CALLBACKS[_callback_id(frame.attrs)]
        dtypes = _dtypes()
        if not on_gpu:
            arrays = [_view(b, dtypes, numpy, None) for b in _buffers(frame.args)]
            results = [_view(b, dtypes, numpy, None) for b in _buffers(frame.rets)]
            callback(arrays, results, numpy)
            return None
        import cupy

        stream = _stream(api, frame.ctx)
        device_id = _device_of(cupy, _buffers(frame.args) + _buffers(frame.rets))
        arrays = [_view(b, dtypes, cupy, device_id) for b in _buffers(frame.args)]
        results = [_view(b, dtypes, cupy, device_id) for b in _buffers(frame.rets)]
        with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream; a raw handle has no protocol object
            warnings.simplefilter("ignore", DeprecationWarning)
            external = cupy.cuda.ExternalStream(stream, device_id)
        with cupy.cuda.Device(device_id), external:
            callback(arrays, results, cupy)
        return None
    except (TypeError, ValueError) as error:
        return _error(api, f"{type(error).__name__}: {error}", _INVALID_ARGUMENT)
    except BaseException:  # noqa: BLE001 - anything else must reach XLA as an error, not kill the process
        return _error(api, traceback.format_exc(), _INTERNAL)


# The callbacks must outlive every registration: kept here.
_HANDLERS = {"cpu": _HANDLER(lambda frame: _handle(frame, False)),
             "CUDA": _HANDLER(lambda frame: _handle(frame, True))}
_REGISTERED: dict = {}


def available(jax) -> bool:
    """Whether ``TARGET`` is registered with this JAX (once per process, for every platform it
    knows); False when its FFI cannot take it (a JAX without ``jax.ffi``)."""
    with _LOCK:
        if not _REGISTERED:
            ffi = getattr(jax, "ffi", None)
            for platform in PLATFORMS:
                ok = False
                if ffi is not None and hasattr(ffi, "register_ffi_target") and hasattr(ffi, "pycapsule"):
                    address = ctypes.cast(_HANDLERS[platform], ctypes.c_void_p).value
                    try:
                        ffi.register_ffi_target(TARGET, ffi.pycapsule(address), platform=platform)
                        ok = True
                    except Exception:  # noqa: BLE001 - a jaxlib without that platform
                        ok = False
                _REGISTERED[platform] = ok
        return _REGISTERED.get("cpu", False)


def call(jax, key, make_callback, result_shapes, *operands, vmap_method="sequential"):
    """The traced call of ``make_callback()``'s function on ``operands`` (arrays; no None),
    returning arrays of ``result_shapes`` (a tuple of jax.ShapeDtypeStruct); ``vmap_method`` as
    jax.ffi.ffi_call's."""
    callback_id = register(key, make_callback)
    run = jax.ffi.ffi_call(TARGET, result_shapes, vmap_method=vmap_method)
    return run(*operands, call_id=numpy.int64(callback_id))
