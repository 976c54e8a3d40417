"""What a first write of fresh memory costs on this machine, against rewriting memory already held.

    python bench/first_touch.py [--size-gib 2] [--delays 0,1,3,6,12,25]

Each step maps SIZE of fresh anonymous memory (a NumPy array above glibc's mmap threshold), writes
every page once and unmaps it, then sleeps DELAY seconds before the next step. Memory freed a moment
ago costs about the kernel's page zeroing (0.17–0.29 s/GiB on the development VM). On a VM whose balloon
driver reports freed pages to the host (virtio_balloon free page reporting), memory freed longer ago has
been handed back to the host and must be backed again, and the cost grows with the delay. The fit frees and
reallocates gigabytes in short-lived sessions and batches, so this is part of its time here
(BENCHMARKS.md, "Fresh memory on this VM")."""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np


def touch_seconds(nbytes: int) -> tuple[float, float]:
    """(wall, system) seconds to map and write ``nbytes`` of fresh memory."""
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
    block = np.ones(nbytes // 8)
    wall, system = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
    del block
    return wall, system


def free_page_reporting() -> str:
    """Whether a virtio balloon with free page reporting (feature bit 5) is bound, as a phrase."""
    for device in Path("/sys/bus/virtio/drivers/virtio_balloon").glob("virtio*"):
        features = (device / "features").read_text().strip()
        return f"virtio balloon, free page reporting {'on' if features[5:6] == '1' else 'off'}"
    return "no virtio balloon"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--delays", default="0,1,3,6,12,25", help="seconds slept before each step, comma-separated")
    args = parser.parse_args()
    nbytes = int(args.size_gib * 2**30)
    held = np.ones(nbytes // 8)
    start = time.perf_counter()
    held[:] = 2.0  # memory already held: the write alone
    rewrite = (time.perf_counter() - start) / args.size_gib
    del held
    print(f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores; {free_page_reporting()}; "
          f"{args.size_gib:g} GiB per step")
    print(f"rewriting memory already held: {rewrite:.2f} s/GiB")
    print("| slept before (s) | first write (s/GiB) | of it system time (s/GiB) |")
    print("|---|---|---|")
    for delay in (float(d) for d in args.delays.split(",")):
        time.sleep(delay)
        wall, system = touch_seconds(nbytes)
        print(f"| {delay:g} | {wall / args.size_gib:.2f} | {system / args.size_gib:.2f} |")


if __name__ == "__main__":
    main()
