"""Reuse of large activation buffers between segments.

Fresh memory is expensive to touch the first time (the kernel faults in and zeroes every page: on the
development VM writing 800 MB the first time took 1.2 s, the second 0.04 s), and a fit allocates
boundary tensors of every point for every sample. Arrays the runner no longer needs are recycled into
new outputs instead of being returned to the OS. Fresh buffers come from an ActivationMemory (memory.py)
when one is given: RAM within its budget, a memory-mapped temporary file beyond.

While the fit's heap is retained (heap.py), freed RAM stays in the process anyway and glibc hands it to
whatever asks next, ORT's arenas and the other net's runner included: a pool then keeps only mapped
buffers. Keeping RAM buffers too held up to 1 GiB idle per runner while new arenas grew the heap: on the
MobileNet-like bench net (256 samples, `q`) the fit's anonymous memory peaked at 2.04–2.06 GB instead of
1.75–1.76 GB."""

from __future__ import annotations

import sys

import numpy as np

from .heap import retaining
from .memory import ActivationMemory

_MIN_BYTES = 1 << 22  # smaller arrays are cheap to allocate: not worth tracking
# Free memory a pool keeps for reuse. Nets narrow as they go, so the early wide buffers would otherwise
# stay allocated for nothing: the MobileNet-like fit's two pools held 5.3 GB of free buffers at 256 samples.
MAX_FREE_BYTES = 1 << 30


class BufferPool:
    """Retired arrays become reusable once nothing else references them (checked by refcount, so an
    array still held by a caller is never handed out again)."""

    def __init__(self, max_free_bytes: int = MAX_FREE_BYTES, memory: ActivationMemory | None = None) -> None:
        self._retired: list[np.ndarray] = []
        self._free: list[np.ndarray] = []
        self.max_free_bytes = max_free_bytes
        self.memory = memory

    def retire(self, array: np.ndarray) -> None:
        """Offer an array the runner has dropped; it is reused only once no one else holds it."""
        while isinstance(array.base, np.ndarray):
            array = array.base
        if array.nbytes >= _MIN_BYTES and array.flags.c_contiguous and array.flags.writeable:
            self._retired.append(array)
            del array
            self._collect()
            self._trim()

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Like np.empty, from a recycled buffer when one is large enough."""
        dtype = np.dtype(dtype)
        need = int(np.prod(shape)) * dtype.itemsize
        if need >= _MIN_BYTES:
            self._collect()
            fitting = [i for i, buffer in enumerate(self._free) if buffer.nbytes >= need]
            if fitting:
                best = min(fitting, key=lambda i: self._free[i].nbytes)
                buffer = self._free.pop(best)
                self._trim()
                return buffer.reshape(-1).view(np.uint8)[:need].view(dtype).reshape(shape)
            self._trim()
            if self.memory is not None:
                while self._free and not self.memory.fits(need):  # free buffers too small to reuse hold budget
                    self._free.pop()
                return self.memory.allocate(shape, dtype)
        return np.empty(shape, dtype)

    def _collect(self) -> None:
        # getrefcount: the list entry + the call's argument; anything above means someone still holds it.
        still_held = []
        for array in self._retired:
            (self._free if sys.getrefcount(array) <= 3 else still_held).append(array)
        self._retired = still_held

    def _trim(self) -> None:
        """Keep at most max_free_bytes of free buffers, giving back the largest first (the layers that
        needed them are behind); only mapped ones while the heap keeps freed RAM (see above)."""
        if retaining():
            self._free = [buffer for buffer in self._free if isinstance(buffer, np.memmap)]
        self._free.sort(key=lambda buffer: buffer.nbytes)
        while self._free and sum(buffer.nbytes for buffer in self._free) > self.max_free_bytes:
            self._free.pop()
