"""Prune and fit graphs shaped like third-party exports, end to end through the CLI.

1. A small BERT-style encoder (2 layers, width 64, 4 heads, FFN 256, Erf-GELU, LayerNorm, masked mean
   pooling → a 64-d embedding; int64 input_ids + attention_mask, dynamic batch and sequence) trained in
   torch on scikit-learn's digits (each 8×8 image read row by row as 64 intensity tokens, the bottom rows
   cropped at random so sequences are padded), exported with torch.onnx. Pruned with
   `onnx-fskd prune --ratio 0.5 --head-ratio 0.25` (FFN neurons 50 %, heads 25 %), then `fit` with each
   solver. Reported: mean cosine of the student's embedding with the teacher's on held-out digits, and the
   digit accuracy of the teacher's linear head applied to each embedding.
2. An NHWC conv net (NHWC input; every conv wrapped Transpose → Conv → Transpose, its bias an Add and its
   BatchNorm Sub/Mul/Add constants; a residual block) trained on the same digits, `fit --prune 0.5`.

    nice python bench/real_graphs.py            # a few minutes on 2 shared cores; writes into out/real_graphs/
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "out" / "real_graphs"  # ignored by git
WIDTH, HEADS, FFN, LAYERS, SEQ = 64, 4, 256, 2, 64
torch.set_num_threads(1)


def digit_tokens(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, mask, labels, images NHWC, split index): intensity 0..16 → token 1..17, 0 = padding."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    images, labels = digits.images[order], digits.target[order]
    rows = rng.integers(5, 9, len(labels))                      # keep the top 5..8 pixel rows
    mask = (np.arange(SEQ)[None, :] < rows[:, None] * 8).astype(np.int64)
    ids = (images.reshape(len(labels), -1).astype(np.int64) + 1) * mask
    nhwc = (images[..., None] / 16.0).astype(np.float32)
    return ids, mask, labels.astype(np.int64), nhwc, order


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.ffn1, self.ffn2 = nn.Linear(WIDTH, FFN), nn.Linear(FFN, WIDTH)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, s = x.shape[0], x.shape[1]
        head = WIDTH // HEADS
        q, k, v = (layer(x).view(n, s, HEADS, head).transpose(1, 2) for layer in (self.q, self.k, self.v))
        scores = q @ k.transpose(2, 3) / head**0.5 + bias
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, s, WIDTH)
        x = self.ln1(x + self.o(context))
        return self.ln2(x + self.ffn2(nn.functional.gelu(self.ffn1(x))))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(18, WIDTH), nn.Parameter(torch.randn(SEQ, WIDTH) * 0.1)
        self.ln = nn.LayerNorm(WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.ln(self.tokens(input_ids) + self.positions[: input_ids.shape[1]])
        keep = attention_mask.to(torch.float32)
        bias = ((1.0 - keep) * -1e4)[:, None, None, :]
        for block in self.blocks:
            x = block(x, bias)
        weights = keep[:, :, None]
        return (x * weights).sum(1) / weights.sum(1)


class NhwcNet(nn.Module):
    """Trained as NCHW convs with BN; exported NHWC with every conv wrapped in Transposes and BN as constants."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, 3, padding=1, bias=False)
                                   for cin, cout in ((1, 32), (32, 64), (64, 32), (32, 64)))
        self.bns = nn.ModuleList(nn.BatchNorm2d(c.out_channels) for c in self.convs)
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(c.out_channels)) for c in self.convs)
        self.fc = nn.Linear(64, 10)

    def unit(self, i: int, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
        """NHWC in, NHWC out: Transpose → Conv → Transpose → bias Add → BN (Sub/Mul/Add when exporting)."""
        y = self.convs[i](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1) + self.bias[i]
        bn = self.bns[i]
        if self.training:
            y = bn(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        else:
            y = (y - bn.running_mean) * (bn.weight / torch.sqrt(bn.running_var + bn.eps)) + bn.bias
        return torch.relu(y) if relu else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stem = self.unit(0, x)
        x = torch.relu(stem + self.unit(2, self.unit(1, stem), relu=False))
        return self.fc(self.unit(3, x).mean(dim=(1, 2)))


def train(model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, head: nn.Module | None,
          epochs: int) -> None:
    params = list(model.parameters()) + (list(head.parameters()) if head else [])
    optimiser = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(64):
            out = model(*(x[batch] for x in inputs))
            loss = nn.functional.cross_entropy(head(out) if head else out, labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()


def export(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: list[str], output: str, path: Path,
           dynamic: dict) -> None:
    torch.onnx.export(model, inputs, str(path), input_names=names, output_names=[output], dynamic_axes=dynamic,
                      opset_version=17, dynamo=False)


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"onnx-fskd {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def transformer(ids, mask, labels) -> list[dict]:
    train_rows, calib_rows, test_rows = slice(0, 1000), slice(1000, 1300), slice(1300, None)
    torch.manual_seed(0)
    model, head = Encoder(), nn.Linear(WIDTH, 10)
    tensors = (torch.from_numpy(ids[train_rows]), torch.from_numpy(mask[train_rows]))
    start = time.perf_counter()
    train(model, tensors, torch.from_numpy(labels[train_rows]), head, epochs=30)
    print(f"transformer trained in {time.perf_counter() - start:.0f} s")
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "embedding": {0: "batch"}}
    teacher = OUT / "encoder.onnx"
    export(model, tensors, ["input_ids", "attention_mask"], "embedding", teacher, dynamic)
    np.savez(OUT / "tokens_calib.npz", input_ids=ids[calib_rows], attention_mask=mask[calib_rows])
    test = {"input_ids": ids[test_rows], "attention_mask": mask[test_rows]}
    w, b = head.weight.detach().numpy(), head.bias.detach().numpy()
    student = OUT / "encoder_pruned.onnx"
    shapes = ["--input-shapes", f"input_ids:1,{SEQ} attention_mask:1,{SEQ}"]
    print(cli("prune", str(teacher), "--ratio", "0.5", "--head-ratio", "0.25", "-o", str(student), "--force", *shapes))
    want = run(teacher, test)
    rows = [{"model": "teacher", "cosine": 1.0, "accuracy": float(np.mean(np.argmax(want @ w.T + b, 1) == labels[test_rows]))}]
    got = run(student, test)
    rows.append({"model": "pruned (FFN 50 %, heads 25 %)", "cosine": cosine(got, want),
                 "accuracy": float(np.mean(np.argmax(got @ w.T + b, 1) == labels[test_rows]))})
    # The FFN neurons and heads the pruner kept (L1), or re-chosen from the samples (--reselect, the default).
    for solver, reselect in (("q", "--no-reselect"), ("q", "--reselect"), ("full", "--no-reselect"), ("full", "--reselect")):
        fitted = OUT / f"encoder_fit_{solver}{reselect}.onnx"
        start = time.perf_counter()
        print(cli("fit", str(teacher), "--student", str(student), "--data", str(OUT / "tokens_calib.npz"), "-o", str(fitted),
                  "--solver", solver, reselect, "--force", "--report", str(OUT / f"encoder_fit_{solver}{reselect}.json")))
        seconds = time.perf_counter() - start
        got = run(fitted, test)
        rows.append({"model": f"fit --solver {solver} {reselect} ({seconds:.0f} s)", "cosine": cosine(got, want),
                     "accuracy": float(np.mean(np.argmax(got @ w.T + b, 1) == labels[test_rows]))})
    return rows


def nhwc(images, labels) -> list[dict]:
    train_rows, calib_rows, test_rows = slice(0, 1000), slice(1000, 1300), slice(1300, None)
    torch.manual_seed(0)
    model = NhwcNet()
    train(model, (torch.from_numpy(images[train_rows]),), torch.from_numpy(labels[train_rows]), None, epochs=15)
    teacher = OUT / "nhwc.onnx"
    export(model, (torch.from_numpy(images[:2]),), ["input"], "logits", teacher, {"input": {0: "N"}, "logits": {0: "N"}})
    np.save(OUT / "images_calib.npy", images[calib_rows])
    test = {"input": images[test_rows]}
    rows = []
    want = run(teacher, test)
    rows.append({"model": "teacher", "accuracy": float(np.mean(np.argmax(want, 1) == labels[test_rows])), "relative_error": 0.0})
    for solver in ("q", "full"):
        fitted, student = OUT / f"nhwc_fit_{solver}.onnx", OUT / "nhwc_pruned.onnx"
        print(cli("fit", str(teacher), "--prune", "0.5", "--data", str(OUT / "images_calib.npy"), "-o", str(fitted),
                  "--student-out", str(student), "--solver", solver, "--force", "--report", str(OUT / f"nhwc_fit_{solver}.json")))
        for name, path in (("pruned 50 %", student), (f"fit --solver {solver}", fitted)):
            if name.startswith("pruned") and solver == "full":
                continue
            got = run(path, test)
            rows.append({"model": name, "accuracy": float(np.mean(np.argmax(got, 1) == labels[test_rows])),
                         "relative_error": float(np.linalg.norm(got - want) / np.linalg.norm(want))})
    return rows


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    ids, mask, labels, images, _ = digit_tokens()
    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()}, {date.today()}")
    print(f"padding: {1 - mask.mean():.0%} of tokens")
    results = {"transformer": transformer(ids, mask, labels), "nhwc": nhwc(images, labels)}
    print(json.dumps(results, indent=1))
    (OUT / "real_graphs.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
