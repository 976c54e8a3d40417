"""Keep freed memory in the process while the fit runs (glibc only; elsewhere nothing changes).

The fit creates dozens of short-lived ORT sessions, each with its own arena of batch intermediates, and
moves activations through large NumPy buffers. glibc serves every allocation over its mmap threshold
(at most 32 MiB) with a fresh mmap and returns it to the kernel on free, so the next session's arena
page-faults and zero-fills the same gigabytes again. While ``retained_heap`` is active, large blocks come
from the heap and freed memory stays there for the next allocation; on leaving, ``malloc_trim`` gives
the free part back to the kernel. MobileNet-like fit, 256 samples, 2-core VM: 12.5–12.7 s → 7.1–7.5 s,
peak RSS 2.6–3.0 GB either way (BENCHMARKS.md, "Freed memory kept in the process").

This sets process-wide allocator options (``mallopt``) for the duration: a jemalloc or tcmalloc build
has no such options and is left as it is, and so is a process started with glibc's own
``MALLOC_MMAP_MAX_`` or ``MALLOC_TRIM_THRESHOLD_`` (the user has chosen). Afterwards glibc's limits
are its defaults again, except that its mmap threshold no longer adapts (any ``mallopt`` stops that).
protobuf's upb backend calls ``malloc_trim(0)`` itself after every 10,000 message-arena frees (2–3
times in a MobileNet-like fit), which returns the free heap anyway; without those calls the fit took
as long, its probes still writing 1.25 of 1.36 GiB afresh (BENCHMARKS.md, "Fresh memory on this VM")."""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# glibc's mallopt parameters and their defaults (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_NEVER_TRIM = -1  # mallopt(3): -1 turns trimming off; any int threshold (2**31 − 1 at most) still trims a larger free top

_lock = threading.Lock()
_depth = 0  # retained_heap calls active; the settings change at the first and revert at the last
_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc and the user has not tuned it through the environment, else None."""
    if os.environ.get("MALLOC_MMAP_MAX_") is not None or os.environ.get("MALLOC_TRIM_THRESHOLD_") is not None:
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into the process: its C library among them
    except (OSError, TypeError):  # Windows has no such handle
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None  # not glibc (musl, macOS): nothing to set
    return libc


def retaining() -> bool:
    """Whether freed memory stays in the process now (a ``retained_heap`` is active on glibc)."""
    return _depth > 0 and _libc is not None


@contextmanager
def retained_heap() -> Iterator[None]:
    """Serve large allocations from glibc's heap and keep freed memory there until the outermost
    ``retained_heap`` ends; then return the free memory to the kernel. Nested and concurrent uses share
    one setting."""
    global _depth, _libc
    with _lock:
        if _depth == 0:
            _libc = _glibc()
            if _libc is not None:
                _libc.mallopt(_M_MMAP_MAX, 0)
                _libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _libc is not None:
                _libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                _libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                _libc.malloc_trim(0)
