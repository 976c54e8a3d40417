"""Compress the shipped MNIST teachers with onnx-fskd itself (prune 0.5, decompose 0.5) and recover them
from the 100 unlabeled digits of samples/calib.npz. Prints a Markdown table.

    python bench/mnist_compress.py"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx

from onnx_fskd.costs import count_costs
from onnx_fskd.data import input_specs, load_samples
from onnx_fskd.metrics import accuracy
from onnx_fskd.pipeline import FitConfig, fit, make_student

sys.path.insert(0, str(Path(__file__).parent))
from mnist_variants import SAMPLES, logits  # noqa: E402



def test_accuracy(model: onnx.ModelProto, test) -> float:
    return accuracy(logits(model, test["input"]), test["labels"])


def main() -> None:
    test = np.load(SAMPLES / "test.npz")
    print("| teacher (accuracy) | compression | params left | MACs left | compressed | fit `q` | fit `full` | compress + fit time |")
    print("|---|---|---|---|---|---|---|---|")
    for net in ("vgg", "resnet"):
        teacher = onnx.load(SAMPLES / f"{net}_teacher.onnx")
        calib = load_samples(SAMPLES / "calib.npz", input_specs(teacher))
        t_cost = count_costs(teacher)
        for label, prune, rank in (("prune 0.5 (L1)", 0.5, None), ("decompose 0.5", None, 0.5)):
            start = time.perf_counter()
            student = make_student(teacher, prune, rank).model
            results = {solver: fit(teacher, student, calib, FitConfig(solver=solver)).model for solver in ("q", "full")}
            seconds = (time.perf_counter() - start) / 2
            s_cost = count_costs(student)
            print(f"| {net} ({test_accuracy(teacher, test):.1%}) | {label} | {s_cost.params / t_cost.params:.0%} | "
                  f"{s_cost.macs / t_cost.macs:.0%} | {test_accuracy(student, test):.1%} | "
                  f"{test_accuracy(results['q'], test):.1%} | {test_accuracy(results['full'], test):.1%} | {seconds:.1f} s |",
                  flush=True)


if __name__ == "__main__":
    main()
