"""Seconds of one ridge solve of the full solver's size (F unknowns, C targets, float64) by BLAS threads.

    python bench/solve_threads.py [--threads 1,2,4,8] [--repeat 3]

The systems are those of ResNet-18's 3×3 convs under ``--solver full``: F = 9·C_in + 1 unknowns against
C_out targets. ``solve.solve_threads`` picks the threads the fit uses for each size on this machine; the
table shows what each choice costs here (the best of ``--repeat`` runs)."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from onnx_fskd.solve import _solve_spd_here, blas_threads, solve_threads

SIZES = ((577, 64), (1153, 128), (2305, 256), (4609, 512))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", default="1,2,4,8")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    counts = [int(t) for t in args.threads.split(",") if int(t) <= cores]
    rng = np.random.default_rng(0)
    print(f"{cores} usable cores")
    print("| unknowns | targets | " + " | ".join(f"{t} thread{'s' * (t > 1)}" for t in counts) + " | the fit's choice |")
    print("|---" * (len(counts) + 3) + "|")
    for unknowns, targets in SIZES:
        a = rng.normal(size=(unknowns, unknowns))
        lhs = (a @ a.T / unknowns + np.eye(unknowns))[None]
        rhs = rng.normal(size=(1, unknowns, targets))
        cells = []
        for count in counts:
            with blas_threads(count):
                best = min(_timed(lambda: _solve_spd_here(lhs, rhs)) for _ in range(args.repeat))
            cells.append(f"{best:.3f} s")
        print(f"| {unknowns} | {targets} | " + " | ".join(cells) + f" | {solve_threads(unknowns)} |", flush=True)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
