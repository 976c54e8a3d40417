"""heap.retained_heap: freed memory stays in the process inside it, and goes back to the kernel after."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest

from onnx_fskd import heap
from onnx_fskd.heap import retained_heap

BLOCK = 256 << 20
pytestmark = pytest.mark.skipif(heap._glibc() is None or not os.path.exists("/proc/self/statm"),
                                reason="glibc on Linux only (elsewhere retained_heap changes nothing)")


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _touch_and_free() -> None:
    block = np.ones(BLOCK // 8)
    del block


def test_a_freed_block_goes_back_to_the_kernel_outside():
    start = _rss()
    _touch_and_free()
    assert _rss() - start < BLOCK / 4


def test_a_freed_block_stays_inside_is_reused_and_is_returned_at_the_end():
    with retained_heap():
        start = _rss()
        _touch_and_free()
        held = _rss() - start
        assert held > 0.75 * BLOCK
        _touch_and_free()  # the same memory again, not another block
        assert _rss() - start < held + BLOCK / 4
    assert _rss() - start < BLOCK / 4


def test_nested_uses_keep_memory_until_the_outermost_ends():
    with retained_heap():
        start = _rss()
        with retained_heap():
            _touch_and_free()
        assert _rss() - start > 0.75 * BLOCK
    assert _rss() - start < BLOCK / 4


def test_glibc_settings_from_the_environment_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    assert heap._glibc() is None
    monkeypatch.delenv("MALLOC_MMAP_MAX_")
    assert heap._glibc() is not None


def _heap_bytes() -> int:
    """Size of the process's brk heap (address space, touched or not)."""
    with open("/proc/self/maps") as maps:
        return sum(int(end, 16) - int(start, 16) for start, end, name in
                   ((*line.split()[0].split("-"), line.split()[-1]) for line in maps) if name == "[heap]")


def test_a_freed_block_over_2_gib_stays_inside_too():
    """glibc trims a free top larger than any int threshold (2**31 − 1 at most): only −1 turns trimming
    off. The block is allocated, never touched, so the test costs no memory."""
    size = (9 << 30) // 4  # 2.25 GiB
    with retained_heap():
        block = np.empty(size, np.uint8)
        grown = _heap_bytes()
        assert grown >= size
        del block
        assert _heap_bytes() >= size
    assert _heap_bytes() < size


def test_buffer_pools_leave_freed_ram_to_the_retained_heap_and_keep_mapped_buffers():
    """Inside retained_heap a pool keeps no free RAM buffer (glibc keeps the memory for any allocation,
    ORT's arenas included) but still recycles mapped ones; outside, it keeps both."""
    from onnx_fskd.buffers import BufferPool
    from onnx_fskd.memory import ActivationMemory

    mb = 1 << 20
    for inside in (True, False):
        cache = ActivationMemory(limit=8 * mb)
        pool = BufferPool(memory=cache)
        with retained_heap() if inside else contextlib.nullcontext():
            assert heap.retaining() == inside
            in_ram, mapped = pool.empty((8 * mb,), np.uint8), pool.empty((8 * mb,), np.uint8)
            assert not isinstance(in_ram, np.memmap) and isinstance(mapped, np.memmap)
            pool.retire(in_ram)
            pool.retire(mapped)
            del in_ram, mapped
            pool._collect()  # what the next retire or empty does first
            pool._trim()
            kept = sorted(type(buffer).__name__ for buffer in pool._free)
            assert kept == (["memmap"] if inside else ["memmap", "ndarray"]), kept
            assert cache.in_ram == (0 if inside else 8 * mb)
