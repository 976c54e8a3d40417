"""Gradient polish: a short unlabeled distillation of the student's weights towards the teacher's
outputs, started from the closed-form fit (gradient steps from the raw pruned student help far less).

The ONNX student becomes a PyTorch module via onnx2torch (the optional ``polish`` extra; the plain fit
never imports torch). Only parameters that are exactly one float initializer of the ONNX graph are
trained (Conv/Gemm weights and biases, BN scales and shifts); BN running statistics stay frozen (eval
mode). The trained values are written back into those initializers by name, so the result is
node-for-node the student."""

from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import FskdError

INSTALL_HINT = "pip install 'onnx-fskd[polish]' (PyTorch and onnx2torch)"


@dataclass
class PolishResult:
    model: onnx.ModelProto
    parameters: int       # initializers trained
    loss_first: float     # relative squared output error on the first and last batches
    loss_last: float
    seconds: float


def require_torch() -> None:
    """Fail with one clear line, before any work, when the optional extra is missing."""
    try:
        _import_onnx2torch()
    except ImportError as exc:
        raise FskdError(f"--polish needs PyTorch and onnx2torch ({exc}); install them with {INSTALL_HINT}") from None


def _import_onnx2torch():
    """onnx2torch imports torchvision at module level for its NMS/RoIAlign converters only. A torchvision
    built for another torch (e.g. the CPU torch next to PyPI's CUDA torchvision) fails to import; then
    stand in a module whose ops raise if ever called, so every other converter still works."""
    import torch  # noqa: F401

    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        stub, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")

        def unavailable(*args, **kwargs):
            raise FskdError("torchvision is not usable here: polish cannot run NMS or RoIAlign")

        ops.nms = ops.roi_align = ops.box_convert = unavailable
        stub.ops = ops
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = stub, ops
    import onnx2torch

    return onnx2torch


def polish_weights(student: onnx.ModelProto, inputs: dict[str, np.ndarray], targets: np.ndarray, steps: int,
                   lr: float, batch_size: int, seed: int = 0) -> PolishResult:
    """``steps`` Adam steps on mini-batches of ``inputs`` minimising ‖student(x) − target‖² / ‖target‖²."""
    onnx2torch = _import_onnx2torch()
    import torch

    start = time.perf_counter()
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # (not measured on a GPU yet)
    module = onnx2torch.convert(_copy(student)).eval()
    bindings = _bind_parameters(module, student)  # on the CPU; .to() keeps the same Parameter objects
    module.to(device)
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    for parameter, _, _ in bindings:
        parameter.requires_grad_(True)
    if not bindings:
        raise FskdError("--polish found no trainable weights the student's initializers map to")
    optimiser = torch.optim.Adam([p for p, _, _ in bindings], lr=lr)
    names = [i.name for i in student.graph.input if i.name in inputs]
    tensors = [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(device) for n in names]
    target = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32)).to(device)
    rng = np.random.default_rng(seed)
    losses = []
    count = len(target)
    for _ in range(steps):
        index = torch.from_numpy(rng.choice(count, size=min(batch_size, count), replace=False)).to(device)
        output = module(*[t[index] for t in tensors])
        want = target[index]
        loss = torch.sum((output - want) ** 2) / torch.sum(want**2).clamp_min(1e-12)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    polished = _copy(student)
    values = {name: transform(p.detach().cpu().numpy()) for p, name, transform in bindings}
    for tensor in polished.graph.initializer:
        if tensor.name in values:
            dtype = numpy_helper.to_array(tensor).dtype
            tensor.CopyFrom(numpy_helper.from_array(values[tensor.name].astype(dtype), tensor.name))
    return PolishResult(polished, len(bindings), losses[0] if losses else 0.0, losses[-1] if losses else 0.0,
                        round(time.perf_counter() - start, 3))


def _bind_parameters(module, model: onnx.ModelProto) -> list:
    """(torch parameter, initializer name, parameter → initializer array) for each parameter equal to
    exactly one float initializer, as is or transposed (onnx2torch turns Gemm(transB=0) into Linear)."""
    initializers = [(t.name, numpy_helper.to_array(t)) for t in model.graph.initializer
                    if t.data_type == onnx.TensorProto.FLOAT and t.dims]
    bindings = []
    for parameter in module.parameters():
        value = parameter.detach().numpy()
        matches = [(name, _same) for name, array in initializers if array.shape == value.shape and np.array_equal(array, value)]
        if value.ndim == 2:
            matches += [(name, _transposed) for name, array in initializers
                        if array.shape == value.T.shape and array.shape != value.shape and np.array_equal(array, value.T)]
        if len(matches) == 1:
            bindings.append((parameter, matches[0][0], matches[0][1]))
    return bindings


def _same(value: np.ndarray) -> np.ndarray:
    return value


def _transposed(value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value.T)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
