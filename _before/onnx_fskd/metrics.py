"""Output comparisons shared by fit's report and eval, chosen to fit the output: top-1 agreement for
class scores (per position for (N, seq, vocab) logits), cosine similarity for embeddings; positions an
attention mask marks as padding are left out of every metric."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .data import ATTENTION_MASK

METRICS = ("auto", "top1", "cosine")
# Ops whose output reads as class scores; a rank-2/3 float output from anything else (pooling, LayerNorm,
# division by a norm) is taken for an embedding. Shape-only ops in between are looked through.
_CLASS_SCORE_OPS = {"Gemm", "MatMul", "Softmax", "LogSoftmax", "Sigmoid"}
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"}


@dataclass(frozen=True)
class Comparison:
    """One output against its reference: the relative error, and agreement or cosine by the metric."""

    relative_error: float
    agreement: float | None = None
    cosine: float | None = None


def relative_error(output: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """||output - reference|| / ||reference|| over the whole batch (unmasked positions), in float64."""
    output, reference = _kept(output, mask), _kept(reference, mask)
    diff = np.linalg.norm((output.astype(np.float64) - reference.astype(np.float64)).ravel())
    norm = np.linalg.norm(reference.astype(np.float64).ravel())
    return float(diff / norm) if norm > 0 else float(diff)


def _classes(logits: np.ndarray) -> np.ndarray:
    """Arg-max per sample, or per position for rank-3 (N, seq, classes) logits."""
    if logits.ndim == 3:
        return logits.argmax(axis=2)
    return logits.reshape(len(logits), -1).argmax(axis=1)


def top1_agreement(output: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Fraction of samples (of unpadded positions, for rank-3 logits) whose arg-max class is the same."""
    same = _classes(output) == _classes(reference)
    return float(np.mean(same[_position_mask(same, mask)]))


def accuracy(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Top-1 accuracy of logits against integer labels (one per sample, or per position for rank-3)."""
    predicted = _classes(logits)
    correct = predicted == np.asarray(labels).reshape(predicted.shape)
    return float(np.mean(correct[_position_mask(correct, mask)]))


def cosine_similarity(output: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean cosine between output and reference vectors: one per sample, or per position for rank-3."""
    if output.ndim == 3:
        rows = _position_mask(output[..., 0], mask)
        a, b = output[rows], reference[rows]
    else:
        a, b = output.reshape(len(output), -1), reference.reshape(len(reference), -1)
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    return float(np.mean(np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 0.0)))


def compare(output: np.ndarray, reference: np.ndarray, metric: str, mask: np.ndarray | None = None) -> Comparison:
    """Relative error, plus top-1 agreement or cosine similarity as ``metric`` says."""
    error = relative_error(output, reference, mask)
    if metric == "cosine":
        return Comparison(error, cosine=cosine_similarity(output, reference, mask))
    return Comparison(error, agreement=top1_agreement(output, reference, mask))


def choose_metric(model: onnx.ModelProto, output_name: str, requested: str = "auto") -> str:
    """``top1`` for class scores, ``cosine`` for embeddings: rank-2/3 float outputs not produced by
    a classifier-like op (Gemm, MatMul, Softmax, ... or an Add of a MatMul's result, i.e. a bias)."""
    if requested != "auto":
        return requested
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get(output_name)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producers.get(node.input[0])
    if node is None:
        return "top1"
    if node.op_type == "Add":
        return "top1" if any(producers.get(i) is not None and producers[i].op_type in ("MatMul", "Gemm")
                             for i in node.input) else "cosine"
    return "top1" if node.op_type in _CLASS_SCORE_OPS else "cosine"


def padding_mask(feeds: dict[str, np.ndarray], output: np.ndarray) -> np.ndarray | None:
    """The attention_mask input (N, seq) as booleans, when there is one and a rank-3 output lines up with it."""
    mask = feeds.get(ATTENTION_MASK)
    if mask is None or output.ndim != 3 or mask.shape != output.shape[:2]:
        return None
    return np.asarray(mask) != 0


def as_rows(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Rank-3 (N, seq, C) outputs as one row per unpadded position, so batches of different lengths
    concatenate and every metric counts positions; other ranks stay per sample."""
    if values.ndim != 3:
        return values
    return values[mask] if mask is not None else values.reshape(-1, values.shape[-1])


def label_rows(labels: np.ndarray, values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Labels lined up with as_rows(values): one per sample, or (N, seq) per position for rank-3."""
    labels = np.asarray(labels)
    if values.ndim != 3:
        return labels.reshape(-1)
    labels = labels.reshape(values.shape[:2])
    return labels[mask] if mask is not None else labels.reshape(-1)


def _position_mask(per_position: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None or per_position.ndim != 2 or mask.shape != per_position.shape:
        return np.ones(per_position.shape, dtype=bool)
    return mask


def _kept(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return values if mask is None or values.ndim < 2 or mask.shape != values.shape[:2] else values[mask]
