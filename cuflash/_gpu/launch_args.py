"""This thread's kernel arguments, one buffer for every launch.

Every cuflash kernel but the helpers takes one params struct by value: a launch hands the driver
an array holding the address of the struct's bytes (``argv_ptr``). Helper kernels take up to
HELPER_SLOTS scalars (``slots``, their addresses in ``slots_argv_ptr``). The driver copies the arguments
when a launch is issued (or captured into a graph), so a thread fills the same bytes launch after
launch: no array and no address lookup per call (numpy's ``.ctypes`` costs microseconds).
"""
from __future__ import annotations

import threading

import numpy

# Bytes of the params buffer: at least every params struct (tests/test_pipeline.py checks each).
CAPACITY = 2048

# Scalar arguments a helper kernel may take (key_bounds.cu takes six; mask tile spans nine).
HELPER_SLOTS = 16


class LaunchArgs(threading.local):
    """The params bytes (on a 64-byte boundary, as a tensor map inside them must), their address,
    their 8-byte words and 4-byte ints, and the one-entry argument array pointing at them; the helper kernels'
    slots and the array of their addresses."""

    def __init__(self):
        self._raw = numpy.zeros(CAPACITY + 64, dtype=numpy.uint8)
        start = -self._raw.ctypes.data % 64
        self.bytes = self._raw[start: start + CAPACITY]
        self.bytes_ptr = int(self.bytes.ctypes.data)
        self.words = self.bytes.view(numpy.uint64)
        self.ints = self.bytes.view(numpy.int32)
        self.argv = numpy.array([self.bytes_ptr], dtype=numpy.uint64)
        self.argv_ptr = int(self.argv.ctypes.data)
        self.slots = numpy.zeros(HELPER_SLOTS, dtype=numpy.int64)
        self.slots_argv = self.slots.ctypes.data + 8 * numpy.arange(HELPER_SLOTS, dtype=numpy.uint64)
        self.slots_argv_ptr = int(self.slots_argv.ctypes.data)


ARGS = LaunchArgs()


_DRIVER = None


def driver():
    """CuPy's driver module (``launchKernel``), imported on first use: importing cuflash needs no
    CUDA."""
    global _DRIVER
    if _DRIVER is None:
        from cupy_backends.cuda.api import driver as module

        _DRIVER = module
    return _DRIVER
