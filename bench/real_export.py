"""A real PyTorch export through `fit`: does the written model keep the student's own graph?

An EfficientNet-style net (TF-"same" padding computed at run time from the input's shape, as timm's
Conv2dSame does: Shape/Gather/Sub/Max/Concat/Pad; depthwise-separable blocks with squeeze-excitation;
BatchNorm) is exported twice with torch.onnx (teacher, and a student with perturbed weights), then
recovered. Prints node counts in and out, whether every node is the student's own (op, name, inputs
past added biases, attributes), the merge's exactness, and the held-out figure the report prints
against the error on unseen samples.

    nice python bench/real_export.py            # needs torch (bench only), ~1 min on 2 cores
"""

from __future__ import annotations

import io
import math
import sys
import time

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from onnx_fskd.data import Samples
from onnx_fskd.metrics import relative_error
from onnx_fskd.pipeline import FitConfig, fit
from onnx_fskd.runtime import make_session, run_batched


class SameConv(nn.Conv2d):
    """TF 'same' padding computed from the input's size at run time (timm's Conv2dSame)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Block(nn.Module):
    def __init__(self, cin, cout, expand, stride):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        self.depthwise = nn.Sequential(SameConv(mid, mid, 3, stride, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, max(mid // 4, 4), 1), nn.SiLU(),
                                nn.Conv2d(max(mid // 4, 4), mid, 1), nn.Sigmoid())
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = self.depthwise(self.expand(x))
        h = self.project(h * self.se(h))
        return x + h if self.residual else h


class EfficientNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(SameConv(3, 16, 3, 2, bias=False), nn.BatchNorm2d(16), nn.SiLU())
        self.blocks = nn.Sequential(Block(16, 16, 1, 1), Block(16, 24, 4, 2), Block(24, 24, 4, 1),
                                    Block(24, 40, 4, 2), Block(40, 40, 4, 1))
        self.head = nn.Sequential(nn.Conv2d(40, 64, 1, bias=False), nn.BatchNorm2d(64), nn.SiLU())
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        h = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def export(net: nn.Module) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(net.eval(), torch.zeros(2, 3, 64, 64), buffer, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    model.ir_version = 10  # onnxruntime refuses newer IR versions
    return model


def main() -> None:
    torch.manual_seed(0)
    teacher_net = EfficientNetish()
    for module in teacher_net.modules():  # non-trivial BN statistics, as after training
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    student_net = EfficientNetish()
    student_net.load_state_dict(teacher_net.state_dict())
    with torch.no_grad():
        for p in student_net.parameters():
            if p.dim() == 4:  # perturb every conv, depthwise included (a diagonal Q cannot undo that exactly)
                p.add_(0.3 * p.std() * torch.randn_like(p))
    teacher, student = export(teacher_net), export(student_net)
    rng = np.random.default_rng(0)
    train = rng.normal(size=(256, 3, 64, 64)).astype(np.float32)
    unseen = rng.normal(size=(256, 3, 64, 64)).astype(np.float32)
    start = time.perf_counter()
    result = fit(teacher, student, Samples({"input": train}), FitConfig())
    seconds = time.perf_counter() - start
    out = result.model
    ops = lambda m: sorted({n.op_type for n in m.graph.node})  # noqa: E731
    same = all(a.op_type == b.op_type and a.name == b.name and list(a.output) == list(b.output)
               and list(b.input) == list(a.input)[:len(b.input)] and len(a.input) - len(b.input) in (0, 1)
               and [x.name for x in a.attribute] == [x.name for x in b.attribute]
               for a, b in zip(out.graph.node, student.graph.node))
    added = {t.name for t in out.graph.initializer} - {t.name for t in student.graph.initializer}
    run = lambda m, x: run_batched(make_session(m, ["CPUExecutionProvider"]), {"input": x}, ["logits"], 64)["logits"]  # noqa: E731
    want = run(teacher, unseen)
    report = result.report
    print(f"torch {torch.__version__}, {sys.platform}; nodes: student {len(student.graph.node)}, written "
          f"{len(out.graph.node)}; same nodes in order: {same}; new initializers: {len(added)} (biases)")
    print(f"student ops: {', '.join(ops(student))}")
    print(f"points: {len(report.points)} fitted, {sum(p.status == 'kept' for p in report.points)} kept, "
          f"{len(report.skipped)} skipped; exactness {report.exactness:.1e}; fit {seconds:.1f} s")
    print(f"output relative error vs teacher: student {relative_error(run(student, unseen), want):.4f}, "
          f"written model on unseen samples {relative_error(run(out, unseen), want):.2e}; the report's "
          f"{report.measured_on} figure {report.after.relative_error:.2e}, its in-sample figure of the written "
          f"model {report.written_in_sample.relative_error:.2e}")


if __name__ == "__main__":
    main()
