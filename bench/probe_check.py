"""The in-graph statistics against the float64 NumPy path on an ImageNet-size pair: same points kept,
same Q, same held-out errors.

    python bench/probe_check.py [--net mobilenet|resnet18] [--samples 32] [--batch 16]

Fits twice on the same samples, once with probes (``statistics: runtime``) and once with every point
forced onto the host path, and prints the largest differences."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from nets import mobilenet_v2ish, perturbed, resnet18  # noqa: E402

import onnx_fskd.pipeline as pipeline  # noqa: E402
from onnx_fskd.data import Samples  # noqa: E402
from onnx_fskd.pipeline import FitConfig, fit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--net", choices=["resnet18", "mobilenet"], default="mobilenet")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    teacher = {"resnet18": resnet18, "mobilenet": mobilenet_v2ish}[args.net]()
    student = perturbed(teacher)
    samples = Samples({"input": np.random.default_rng(0).normal(size=(args.samples, 3, 224, 224)).astype(np.float32)})
    config = FitConfig(batch_size=args.batch, provider="cpu", solver="q")
    in_graph = fit(teacher, student, samples, config)
    blocker = pipeline.probe_blocker
    pipeline.probe_blocker = lambda point, graph: "forced host path"
    try:
        on_host = fit(teacher, student, samples, config)
    finally:
        pipeline.probe_blocker = blocker
    a, b = in_graph.report, on_host.report
    assert {p.statistics for p in a.points} == {"runtime"} and {p.statistics for p in b.points} == {"host"}
    same_status = [p.status for p in a.points] == [p.status for p in b.points]
    q_diff = max(np.abs(in_graph.adapters[n].q - on_host.adapters[n].q).max() / np.abs(on_host.adapters[n].q).max()
                 for n in in_graph.adapters)
    err_diff = max(abs(p.error_after - r.error_after) / max(r.error_after, 1e-12) for p, r in zip(a.points, b.points))
    print(f"{args.net}, {args.samples} samples at 224x224, {len(a.points)} points: same kept/rejected: {same_status}; "
          f"max |ΔQ|/max|Q| {q_diff:.1e}; max relative Δ held-out error {err_diff:.1e}; output error "
          f"{a.after.relative_error:.5f} (runtime) vs {b.after.relative_error:.5f} (host)")


if __name__ == "__main__":
    main()
