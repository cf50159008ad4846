"""glibc malloc settings for CPU training, and the bytes malloc has handed out.

torch's CPU tensors come from glibc ``malloc``.  With glibc's defaults every block above a
(dynamic, at most 32 MiB) threshold is ``mmap``-ed and returned with ``munmap`` when freed,
and the top of the heap is trimmed back to the OS: a training step that allocates and frees
the same activations every step then pays a page fault per 4 KiB page, every step.  On the
2-core development machine that was ~15% of a DiT-S/2 training step, most of it kernel time
(measured: 6.5 -> 7.4 train samples/s, sys time 9.8 s -> 2.3 s for the same bench command;
see docs/speed.md).  This is what jemalloc / tcmalloc are usually preloaded for on CPU
training; here the same effect comes from two ``mallopt`` calls, no extra library:

- ``M_MMAP_THRESHOLD`` = 1 GiB: blocks below it come from the heap, not from fresh mmaps;
- ``M_TRIM_THRESHOLD`` = 2 GiB - 1: freed memory at the top of the heap stays mapped.

So the process keeps its peak heap mapped; nothing else changes (same kernels, same
results).  ``HARNESS_MALLOC=system`` leaves glibc's defaults.  Because a kept heap makes
resident memory a poor measure of peak use, CPU peak memory is measured from ``mallinfo2``
(bytes in use, all arenas) where glibc has it (``in_use_bytes``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 2**31 - 1

_state: dict = {"mode": None}


@functools.lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018  (glibc only; musl has no mallopt)
    except (OSError, AttributeError):
        return None
    return libc


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]


def tune() -> str:
    """Apply the settings once per process; returns the mode now in force:
    ``tuned``, ``system`` (HARNESS_MALLOC=system), or ``unavailable`` (not glibc)."""
    if _state["mode"] is not None:
        return _state["mode"]
    if os.environ.get("HARNESS_MALLOC", "").lower() in ("system", "default", "off", "0"):
        _state["mode"] = "system"
        return "system"
    libc = _libc()
    ok = libc is not None
    if ok:
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
            bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _state["mode"] = "tuned" if ok else "unavailable"
    return _state["mode"]


def mode() -> str:
    """The mode in force (``system`` if ``tune()`` was never called)."""
    return _state["mode"] or "system"


@functools.lru_cache(maxsize=1)
def _mallinfo2():
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None  # glibc >= 2.33
    if fn is not None:
        fn.restype, fn.argtypes = _Mallinfo2, []
    return fn


def in_use_bytes() -> int | None:
    """Bytes malloc has handed out and not yet freed (heap + mmapped blocks, all arenas);
    None without glibc >= 2.33."""
    fn = _mallinfo2()
    if fn is None:
        return None
    m = fn()
    return int(m.uordblks + m.hblkhd)
