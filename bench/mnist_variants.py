"""The fit's options compared on the shipped MNIST pairs (100 unlabeled samples from samples/calib.npz,
accuracy on the 1000 labeled digits of samples/test.npz). Prints a Markdown table.

    python bench/mnist_variants.py"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx

from onnx_fskd.data import input_specs, load_samples
from onnx_fskd.metrics import accuracy, relative_error, top1_agreement
from onnx_fskd.pipeline import FitConfig, fit
from onnx_fskd.runtime import make_session, run_batched

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
# The closed-form fit alone (re-selection and augmentation off), then the per-point solver policy and
# the stages before the fit (re-selection, flips) on top of each solver.
_PLAIN = dict(reselect=False, augment="none")
VARIANTS = [
    dict(_PLAIN, solver="q"), dict(_PLAIN, solver="q", residual_target="plain"),
    dict(_PLAIN, solver="q", points="block-ends"), dict(_PLAIN, solver="q", mode="parallel"), dict(_PLAIN, solver="full"), dict(_PLAIN, solver="full", residual_target="plain"),
    dict(_PLAIN, solver="full", points="block-ends"), dict(_PLAIN, solver="full", mode="parallel"),
    dict(_PLAIN, solver="auto"),
    dict(solver="q", augment="none"), dict(solver="full", augment="none"), dict(solver="auto", augment="none"),
    dict(solver="q", augment="flip"), dict(solver="full", augment="flip"), dict(solver="auto", augment="flip"),
]


def logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run_batched(make_session(model, ["CPUExecutionProvider"]), {"input": x}, ["logits"], 250)["logits"]


def main() -> None:
    test = np.load(SAMPLES / "test.npz")
    print("| net | solver | mode | points | residual target | re-selection | augmentation | test accuracy | "
          "agreement with teacher | output rel. error | fit time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for net in ("vgg", "resnet"):
        teacher = onnx.load(SAMPLES / f"{net}_teacher.onnx")
        student = onnx.load(SAMPLES / f"{net}_student.onnx")
        calib = load_samples(SAMPLES / "calib.npz", input_specs(student))
        reference = logits(teacher, test["input"])
        for name, model in (("teacher", teacher), ("student (no recovery)", student)):
            out = logits(model, test["input"])
            print(f"| {net} | {name} | | | | | | {accuracy(out, test['labels']):.1%} | "
                  f"{top1_agreement(out, reference):.1%} | {relative_error(out, reference):.3f} | |")
        for variant in VARIANTS:
            config = FitConfig(**variant)
            start = time.perf_counter()
            result = fit(teacher, student, calib, config)
            seconds = time.perf_counter() - start
            out = logits(result.model, test["input"])
            changed = sum(g["changed"] for g in result.report.reselection)
            reselection = f"{changed} ch. changed" if config.reselect else "off"
            print(f"| {net} | {config.solver} | {config.mode} | {config.points} | {config.residual_target} | "
                  f"{reselection} | {config.augment} | "
                  f"{accuracy(out, test['labels']):.1%} | {top1_agreement(out, reference):.1%} | "
                  f"{relative_error(out, reference):.3f} | {seconds:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
