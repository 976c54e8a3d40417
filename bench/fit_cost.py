"""Fit wall time against one teacher forward + one student forward over the same samples.

    python bench/fit_cost.py [--net resnet18|mobilenet] [--samples 256] [--batch 32] [--solver q|auto|full]
                             [--augment auto|none] [--stats-positions auto|all] [--max-memory SIZE]
                             [--prefault SIZE] [--repeat N]

The floor is one teacher and one student forward over the samples given. ``--augment auto`` (the fit's
default) adds a flipped copy of every fit sample, so the fit processes 1.8× those samples: compare
``--augment none`` for the cost of the fit's machinery per sample.

Both timings run in this process on the same machine, after a warm-up. Prints a Markdown row and the
fit's profile: runtime (teacher) and runtime (student), the segment runs of each net (session set-up
and ORT), statistics (in-graph probes, or NumPy sums on the host), solve (the small ridge systems),
verify, and the rest. Memory: the process's peak RSS, and on Linux the peak of its anonymous memory
(RSS less file-backed pages, which is what ``--max-memory`` bounds: the cache past it lives in a
mapped file the kernel can page out). The fit's system time, its minor page faults and how far its
anonymous memory grew are printed too: on a VM whose balloon driver reports freed memory to the host,
a first write costs about ten times a rewrite of memory already held, and ``--prefault SIZE`` (e.g. 4G)
touches and frees that much heap before the fit, inside the fit's retained heap (heap.py), so that the
fit's first writes land on memory the host already backs (BENCHMARKS.md, "Fresh memory on this VM")."""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import os
import platform
import resource
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from nets import mobilenet_v2ish, perturbed, resnet18  # noqa: E402

import onnx_fskd.correct as correct  # noqa: E402
from onnx_fskd.data import Samples  # noqa: E402
from onnx_fskd.probes import StatsProbe  # noqa: E402
from onnx_fskd.segments import SegmentRunner  # noqa: E402
from onnx_fskd.stats import GramStats  # noqa: E402
from onnx_fskd.pipeline import FitConfig, fit  # noqa: E402
import onnx_fskd.runtime as runtime  # noqa: E402
from onnx_fskd.runtime import make_session, resolve_providers, run_batched  # noqa: E402

try:
    from onnx_fskd.heap import retained_heap  # noqa: E402
except ImportError:  # older versions, measured for comparison
    retained_heap = contextlib.nullcontext


def forward_seconds(model, feeds, providers, batch) -> float:
    # The fit's precision (no TF32 on CUDA), and cuDNN's fastest algorithms: the best steady forward.
    session = make_session(model, providers, exact=True, tuned=True)
    run_batched(session, {k: v[:batch] for k, v in feeds.items()}, ["logits"], batch)  # warm-up
    start = time.perf_counter()
    run_batched(session, feeds, ["logits"], batch)
    return time.perf_counter() - start


class Profile:
    """Wall time spent inside chosen functions, by category (outermost call only: no double counting)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._depth = 0

    def wrap(self, owner, name: str, category) -> None:
        """``category``: a name, or a function of the call's first argument that gives one."""
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if self._depth:
                return original(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
                label = category(args[0]) if callable(category) else category
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)


class AnonymousPeak:
    """Peak RssAnon of this process, sampled every 20 ms from /proc/self/status (Linux; None elsewhere)."""

    def __init__(self):
        self.peak: int | None = None
        self.start: int | None = None  # RssAnon when the sampling started
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self.start = self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _read() -> int | None:
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:")) * 1024
        except (OSError, StopIteration):
            return None

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            now = self._read()
            if now is None:
                return
            self.peak = max(self.peak or 0, now)


class SessionCount:
    """How many ORT sessions the fit creates and their total set-up time, whatever thread creates them
    (set-up is part of "runtime" and "statistics" in the profile; on CUDA it is a large part)."""

    def __init__(self):
        self.count, self.seconds, self._lock = 0, 0.0, threading.Lock()
        base, counter = runtime.ort.InferenceSession, self

        class Counted(base):
            def __init__(self, *args, **kwargs):
                start = time.perf_counter()
                super().__init__(*args, **kwargs)
                with counter._lock:
                    counter.count += 1
                    counter.seconds += time.perf_counter() - start

        self._base, self._counted = base, Counted

    def __enter__(self):
        runtime.ort.InferenceSession = self._counted
        return self

    def __exit__(self, *exc):
        runtime.ort.InferenceSession = self._base


def profiled() -> Profile:
    profile = Profile()
    # The fit makes the teacher's runner first, then the student's (pipeline._fit_points). Weak references:
    # holding the runners (and their caches) past the fit would change what it measures.
    roles: weakref.WeakKeyDictionary[SegmentRunner, str] = weakref.WeakKeyDictionary()
    original_init = SegmentRunner.__init__

    def init(runner, *args, **kwargs):
        original_init(runner, *args, **kwargs)
        roles[runner] = "runtime (student)" if len(roles) % 2 else "runtime (teacher)"

    SegmentRunner.__init__ = init
    profile.wrap(SegmentRunner, "_run_segment", lambda runner: roles[runner])
    profile.wrap(StatsProbe, "__init__", "statistics")
    profile.wrap(StatsProbe, "accumulate", "statistics")
    profile.wrap(GramStats, "add", "statistics")
    profile.wrap(correct, "solve_adapter", "solve")
    profile.wrap(correct, "solve_weights", "solve")
    return profile


def fit_once(args: argparse.Namespace, teacher, student, feeds: dict[str, np.ndarray], providers: list[str],
             profile: Profile, passes, before: float) -> tuple[float, float, float]:
    """One fit between two floor measurements (``before`` given, the after-floor run here), its report
    printed: (fit seconds, floor seconds, after-floor seconds)."""
    kept_heap = contextlib.ExitStack()
    if args.prefault is not None:
        from onnx_fskd.memory import parse_size

        kept_heap.enter_context(retained_heap())  # entered before the fit's own, left after it: kept throughout
        np.ones(parse_size(args.prefault) // 8)  # written, then freed at once: the heap keeps the pages
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    options = dict(batch_size=args.batch, provider=args.provider, mode=args.mode, points=args.points,
                   solver=args.solver, augment=args.augment)
    if args.stats_positions != "auto":  # older versions (measured for comparison) have no such option
        options["stats_positions"] = args.stats_positions
    if args.max_memory is not None:
        from onnx_fskd.memory import parse_size

        options["max_memory"] = parse_size(args.max_memory)
    # cProfile (Python 3.12+) records every thread: the memory sampler's waits would swallow the fit's own time.
    profiler = cProfile.Profile() if args.cprofile else contextlib.nullcontext()
    sampler = contextlib.nullcontext(AnonymousPeak()) if args.cprofile else AnonymousPeak()
    with kept_heap, sampler as anonymous, SessionCount() as sessions, profiler:
        result = fit(teacher, student, Samples(feeds), FitConfig(**options))
        fit_time = time.perf_counter() - start
        fit_usage = resource.getrusage(resource.RUSAGE_SELF)
    if args.cprofile:
        profiler.dump_stats(args.cprofile)
    after = passes()
    floor = min(before, after)  # the machine may be shared: the fastest forward is the conservative floor
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.report.seconds.items())
    print(f"| {args.net} | {args.solver} | {args.augment} | {args.batch} | {args.samples} | {result.report.samples_fit + result.report.samples_augmented + result.report.samples_heldout} | {result.report.provider} | {len(result.report.points)} | {floor:.3g} s "
          f"| {fit_time:.1f} s | **{fit_time / floor:.2f}** | {stages} |")
    print(f"peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB"
          + (f", peak anonymous memory during the fit: {anonymous.peak / 2**30:.2f} GB" if anonymous.peak else "")
          + (f"; cache peaks {result.report.memory['peak_in_ram_bytes'] / 2**30:.2f} GB in RAM, "
             f"{result.report.memory['peak_mapped_bytes'] / 2**30:.2f} GB mapped "
             f"(budget {result.report.memory['limit_bytes'] / 2**30:.2f} GB)" if getattr(result.report, "memory", None)
             else ""))
    print(f"forward floor measured before the fit {before:.3g} s, after it {after:.3g} s")
    # A minor fault maps a 4 KiB page, or a 2 MiB one where NumPy asked for transparent huge pages: the
    # count times 4 KiB is a lower bound of the memory written afresh; the anonymous memory's growth
    # (peak less start) is what the fit held beyond what the process already had.
    grown = (f"; anonymous memory grew by {(anonymous.peak - anonymous.start) / 2**30:.2f} GiB during it"
             if anonymous.peak and anonymous.start else "")
    print(f"fit: system time {fit_usage.ru_stime - usage.ru_stime:.1f} s, user {fit_usage.ru_utime - usage.ru_utime:.1f} s; "
          f"minor page faults {fit_usage.ru_minflt - usage.ru_minflt} "
          f"({(fit_usage.ru_minflt - usage.ru_minflt) * resource.getpagesize() / 2**30:.2f} GiB as 4 KiB pages, a lower bound)"
          + grown + (f"; {args.prefault} prefaulted before it (included in the peaks above)" if args.prefault else ""))
    print(f"sessions created by the fit: {sessions.count}, {sessions.seconds:.1f} s set-up in all"
          + (f" (CUDA options of the fit's sessions: {runtime.session_providers(providers, True)[0][1]})"
             if result.report.provider == "cuda" else ""))
    split = dict(profile.seconds, verify=result.report.seconds.get("verify", 0.0))
    split["other"] = fit_time - sum(split.values())
    print("profile: " + ", ".join(f"{k} {v:.1f}s ({100 * v / fit_time:.0f}%)" for k, v in split.items()))
    statistics = {p.statistics for p in result.report.points}
    print(f"statistics computed in: {', '.join(sorted(statistics))}; points kept: "
          f"{sum(p.status == 'kept' for p in result.report.points)}/{len(result.report.points)}, "
          f"held-out output error {result.report.before.relative_error:.4f} → {result.report.after.relative_error:.4f}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; "
          f"code: {Path(correct.__file__).parent}")
    return fit_time, floor, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--net", choices=["resnet18", "mobilenet"], default="resnet18")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--provider", default="auto")
    parser.add_argument("--mode", default="sequential")
    parser.add_argument("--points", default="auto")
    parser.add_argument("--solver", default="q", help="q, full or auto (the fit's default)")
    parser.add_argument("--augment", default="auto", help="auto (the fit's default: flips for images) or none")
    parser.add_argument("--stats-positions", default="auto", help="auto (a grid of conv output positions) or all")
    parser.add_argument("--max-memory", default=None, help="the fit's --max-memory (e.g. 1G); default: the fit's")
    parser.add_argument("--prefault", default=None, metavar="SIZE",
                        help="touch and free SIZE (e.g. 4G) of heap just before the fit, kept for it (see above)")
    parser.add_argument("--cuda-option", action="append", default=[], metavar="KEY=VALUE",
                        help="CUDA provider option for the fit's sessions, for comparison (repeatable), e.g. "
                             "cudnn_conv_algo_search=EXHAUSTIVE (ORT's default; the fit uses HEURISTIC)")
    parser.add_argument("--cprofile", default=None, metavar="FILE",
                        help="also write the fit's cProfile statistics to FILE (pstats; adds overhead to the timing)")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="fit N times, each between two floor measurements, and print the median ratio: on a "
                             "shared machine one run's ratio can be 20 %% off")
    args = parser.parse_args()
    teacher = {"resnet18": resnet18, "mobilenet": mobilenet_v2ish}[args.net]()
    student = perturbed(teacher)
    providers = resolve_providers(args.provider)
    feeds = {"input": np.random.default_rng(0).normal(size=(args.samples, 3, 224, 224)).astype(np.float32)}
    def passes() -> float:
        # Under the fit's allocator settings (heap.py) too: the floor is the best a forward can do.
        with retained_heap():
            return forward_seconds(teacher, feeds, providers, args.batch) + forward_seconds(student, feeds, providers, args.batch)

    ratios: list[tuple[float, float]] = []  # (fit seconds, floor seconds) per repeat
    last_floor = passes()  # each fit's floor before it is the last one's after it
    runtime.UNTUNED_CUDA_OPTIONS.update(option.split("=", 1) for option in args.cuda_option)  # the fits' sessions only
    profile = profiled()
    for _ in range(max(args.repeat, 1)):
        gc.collect()  # the last fit's runners gone: profiled() tells teacher from student by their order
        profile.seconds.clear()
        fit_time, floor, last_floor = fit_once(args, teacher, student, feeds, providers, profile, passes, last_floor)
        ratios.append((fit_time, floor))
    if len(ratios) > 1:
        fits, floors = [f for f, _ in ratios], [f for _, f in ratios]
        print(f"over {len(ratios)} fits: ratio median {float(np.median([f / g for f, g in ratios])):.2f} "
              f"({', '.join(f'{f / g:.2f}' for f, g in ratios)}), fit {min(fits):.1f}–{max(fits):.1f} s, "
              f"floor {min(floors):.3g}–{max(floors):.3g} s")


if __name__ == "__main__":
    main()
