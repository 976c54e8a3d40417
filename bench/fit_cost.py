"""Fit wall time against one teacher forward + one student forward over the same samples.

    python bench/fit_cost.py [--net resnet18|mobilenet] [--samples 256] [--batch 32]

Both timings run in this process on the same machine, after a warm-up. Prints a Markdown row."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from nets import mobilenet_v2ish, perturbed, resnet18  # noqa: E402

from onnx_fskd.data import Samples  # noqa: E402
from onnx_fskd.pipeline import FitConfig, fit  # noqa: E402
from onnx_fskd.runtime import make_session, resolve_providers, run_batched  # noqa: E402


def forward_seconds(model, feeds, providers, batch) -> float:
    session = make_session(model, providers)
    run_batched(session, {k: v[:batch] for k, v in feeds.items()}, ["logits"], batch)  # warm-up
    start = time.perf_counter()
    run_batched(session, feeds, ["logits"], batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--net", choices=["resnet18", "mobilenet"], default="resnet18")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--provider", default="auto")
    parser.add_argument("--mode", default="sequential")
    parser.add_argument("--points", default="auto")
    args = parser.parse_args()
    teacher = {"resnet18": resnet18, "mobilenet": mobilenet_v2ish}[args.net]()
    student = perturbed(teacher)
    providers = resolve_providers(args.provider)
    feeds = {"input": np.random.default_rng(0).normal(size=(args.samples, 3, 224, 224)).astype(np.float32)}
    passes = forward_seconds(teacher, feeds, providers, args.batch) + forward_seconds(student, feeds, providers, args.batch)
    start = time.perf_counter()
    result = fit(teacher, student, Samples(feeds), FitConfig(batch_size=args.batch, provider=args.provider, mode=args.mode, points=args.points))
    fit_time = time.perf_counter() - start
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.report.seconds.items())
    print(f"| {args.net} | {args.points} | {args.batch} | {args.samples} | {result.report.provider} | {len(result.report.points)} | {passes:.1f} s "
          f"| {fit_time:.1f} s | **{fit_time / passes:.2f}** | {stages} |")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")


if __name__ == "__main__":
    main()
