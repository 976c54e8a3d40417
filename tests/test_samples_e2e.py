"""End to end on the shipped MNIST pairs: a student pruned by another tool (torch, no metadata) is
recovered from the 100 unlabeled samples in samples/calib.npz; accuracy is counted on samples/test.npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_fskd.data import input_specs, load_samples
from onnx_fskd.metrics import accuracy
from onnx_fskd.pipeline import FitConfig, fit
from onnx_fskd.runtime import make_session, run_batched

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def test_accuracy(model: onnx.ModelProto, test: np.lib.npyio.NpzFile) -> float:
    session = make_session(model, ["CPUExecutionProvider"])
    return accuracy(run_batched(session, {"input": test["input"]}, ["logits"], 250)["logits"], test["labels"])


test_accuracy.__test__ = False  # a helper, not a test


# Accuracy points the recovered student may stay below its teacher (measured margins: README/BENCHMARKS).
TOLERANCE = {("vgg", "full"): 0.01, ("resnet", "full"): 0.03, ("vgg", "q"): 0.05, ("resnet", "q"): 0.05}


@pytest.mark.parametrize("net,solver", sorted(TOLERANCE))
def test_pruned_mnist_student_recovers(net, solver):
    teacher = onnx.load(SAMPLES / f"{net}_teacher.onnx")
    student = onnx.load(SAMPLES / f"{net}_student.onnx")
    assert not student.metadata_props  # pruned elsewhere: fit must infer the pairing itself
    calib = load_samples(SAMPLES / "calib.npz", input_specs(student))
    assert len(calib) == 100 and calib.labels is None
    test = np.load(SAMPLES / "test.npz")
    result = fit(teacher, student, calib, FitConfig(solver=solver))
    acc_teacher, acc_student, acc_fit = (test_accuracy(m, test) for m in (teacher, student, result.model))
    assert acc_student < acc_teacher - 0.3  # the student really is broken
    assert acc_fit >= acc_teacher - TOLERANCE[net, solver], (acc_teacher, acc_student, acc_fit)
    assert result.report.exactness <= 1e-4


def test_parallel_mode_warns_when_it_makes_the_student_worse():
    teacher = onnx.load(SAMPLES / "vgg_teacher.onnx")
    student = onnx.load(SAMPLES / "vgg_student.onnx")
    calib = load_samples(SAMPLES / "calib.npz", input_specs(student))
    report = fit(teacher, student, calib, FitConfig(mode="parallel")).report
    assert report.after.relative_error > report.before.relative_error
    assert len(report.warnings) == 1 and "--mode sequential" in report.warnings[0]
    assert fit(teacher, student, calib).report.warnings == []
