"""A RAM budget for the activations the fit caches (``--max-memory``).

The runners cache boundary tensors for every sample, so their memory grows with the sample count.
Past the budget, new cache buffers are memory-mapped from an unlinked temporary file instead of RAM:
the fit does the same work in one pass, and the kernel pages the cache out to disk instead of the
process being killed. (Processing samples in chunks instead would rerun the net, at every point and
for every chunk, from the last boundary held for it: up to points / 2 extra passes.) The file has no
name on disk from the start, so nothing is left behind however the process ends; its space is
reserved up front (posix_fallocate), so a full disk is a clear error, not a crash on first write."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import weakref

import numpy as np

from .errors import FskdError

# Share of the RAM available at the start that the cache may use by default.
DEFAULT_SHARE = 0.5
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from '512M', '1.5G', '2GB', '4096' (binary units: 1K = 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if match is None:
        raise FskdError(f"--max-memory must be a size such as 512M, 1.5G or 4096 (bytes), got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def available_ram() -> int | None:
    """RAM the system can give without swapping (Linux MemAvailable, else free pages), or None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def default_budget() -> int | None:
    """DEFAULT_SHARE of the available RAM, or None (no limit) where the system does not say."""
    available = available_ram()
    return None if available is None else int(available * DEFAULT_SHARE)


class ActivationMemory:
    """Where cache buffers come from: RAM while the live RAM buffers stay within ``limit`` bytes
    (None: no limit), a memory-mapped temporary file beyond. Counts what it handed out, for the report."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.in_ram = 0          # bytes of RAM buffers from here still alive
        self.peak_in_ram = 0
        self.mapped = 0          # bytes of mapped buffers still alive
        self.peak_mapped = 0

    def fits(self, nbytes: int) -> bool:
        return self.limit is None or self.in_ram + nbytes <= self.limit

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array, in RAM if it fits the budget, else mapped from a temporary file."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if self.fits(nbytes):
            array = np.empty(shape, dtype)
            self.in_ram += nbytes
            self.peak_in_ram = max(self.peak_in_ram, self.in_ram)
            weakref.finalize(array, self._released_ram, nbytes)
            return array
        array = _mapped(shape, dtype, nbytes)
        self.mapped += nbytes
        self.peak_mapped = max(self.peak_mapped, self.mapped)
        weakref.finalize(array, self._released_mapped, nbytes)
        return array

    def summary(self) -> dict[str, int | None]:
        return {"limit_bytes": self.limit, "peak_in_ram_bytes": self.peak_in_ram,
                "peak_mapped_bytes": self.peak_mapped}

    def _released_ram(self, nbytes: int) -> None:
        self.in_ram -= nbytes

    def _released_mapped(self, nbytes: int) -> None:
        self.mapped -= nbytes


def _mapped(shape: tuple[int, ...], dtype: np.dtype, nbytes: int) -> np.ndarray:
    """An array backed by an anonymous temporary file (unlinked on creation), its disk space reserved."""
    with tempfile.TemporaryFile(prefix="onnx-fskd-") as file:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(file.fileno(), 0, max(nbytes, 1))
            elif shutil.disk_usage(tempfile.gettempdir()).free < nbytes:  # no reservation here: check instead
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FskdError(f"the activation cache is over --max-memory and {tempfile.gettempdir()} has no room "
                                f"for {nbytes / 2**20:.0f} MB more of it: free disk space, point TMPDIR at a "
                                f"larger disk, raise --max-memory or use fewer samples") from None
            raise
        # The mapping keeps the file alive after it is closed here; the space is freed with the array.
        return np.memmap(file, dtype=dtype, mode="r+", shape=shape)

