"""Output comparisons shared by fit's report and eval."""

from __future__ import annotations

import numpy as np


def relative_error(output: np.ndarray, reference: np.ndarray) -> float:
    """||output - reference|| / ||reference|| over the whole batch, in float64."""
    diff = np.linalg.norm((output.astype(np.float64) - reference.astype(np.float64)).ravel())
    norm = np.linalg.norm(reference.astype(np.float64).ravel())
    return float(diff / norm) if norm > 0 else float(diff)


def _classes(logits: np.ndarray) -> np.ndarray:
    return logits.reshape(len(logits), -1).argmax(axis=1)


def top1_agreement(output: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of samples whose arg-max class is the same in both outputs."""
    return float(np.mean(_classes(output) == _classes(reference)))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of logits against integer labels."""
    return float(np.mean(_classes(logits) == np.asarray(labels).reshape(-1)))
