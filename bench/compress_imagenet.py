"""Prune (or decompose) an ImageNet-size MobileNetV2-like graph with random weights, recover it with fit,
and compare params, MACs and ONNX Runtime latency of teacher, student and recovered model.

    python bench/compress_imagenet.py [--prune 0.5 | --decompose 0.5] [--samples 64]"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from nets import mobilenet_v2ish  # noqa: E402

from onnx_fskd.compare import model_figures  # noqa: E402
from onnx_fskd.data import Samples  # noqa: E402
from onnx_fskd.pipeline import FitConfig, fit, make_student  # noqa: E402
from onnx_fskd.runtime import resolve_providers  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prune", type=float, default=None)
    parser.add_argument("--decompose", type=float, default=None)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    if args.prune is None and args.decompose is None:
        args.prune = 0.5
    teacher = mobilenet_v2ish()
    rng = np.random.default_rng(0)
    samples = Samples({"input": rng.normal(size=(args.samples, 3, 224, 224)).astype(np.float32)})
    start = time.perf_counter()
    compressed = make_student(teacher, args.prune, args.decompose)
    compress_s = time.perf_counter() - start
    start = time.perf_counter()
    result = fit(teacher, compressed.model, samples, FitConfig(batch_size=args.batch))
    fit_s = time.perf_counter() - start
    figures = model_figures({"teacher": teacher, "student": compressed.model, "recovered": result.model},
                            samples.take(slice(0, args.batch)), resolve_providers("auto"), args.batch, repeats=10)
    how = f"prune {args.prune}" if args.prune is not None else f"decompose {args.decompose}"
    print(f"{how}: compress {compress_s:.1f} s, fit {fit_s:.1f} s on {args.samples} samples "
          f"({len(result.report.points)} points, {len(result.report.rejected)} rejected); output relative error "
          f"vs teacher {result.report.before.relative_error:.3f} → {result.report.after.relative_error:.3f}")
    keys = list(figures[0].latency_ms)
    print("| model | params | MACs / sample | " + " | ".join(f"latency {k} (ms)" for k in keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for f in figures:
        print(f"| {f.name} | {f.params / 1e6:.2f} M | {f.macs / 1e6:.0f} M | "
              + " | ".join(f"{f.latency_ms[k]:.1f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
