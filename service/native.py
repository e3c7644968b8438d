"""The C library, for the few glibc calls the service makes (``mallopt``, ``malloc_trim``);
imports nothing heavy, so the entry point can use it before NumPy is loaded."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The process's C library, or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
