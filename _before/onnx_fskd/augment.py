"""Unlabeled augmentation: extra fit rows made from the samples (horizontal flips, optional shifts).

The fit only needs input statistics, and a flipped or slightly shifted natural image is as likely an
input as the original, so these copies add rows to every Gram matrix for free. They go to the fit rows
only: the held-out guard keeps judging on real samples. Only image inputs (rank 4, NCHW or NHWC with
1–4 channels) are augmented; ``auto`` flips them and leaves every other model alone."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .correct import Rows
from .data import InputSpec, Samples

AUGMENTATIONS = ("auto", "none", "flip", "flip+shift")
SHIFT = 2  # pixels, in each of the four directions


@dataclass(frozen=True)
class Augmentation:
    kind: str    # what was applied: none | flip | flip+shift
    added: int   # extra fit rows


def image_width_axis(spec: InputSpec) -> int | None:
    """The width axis of an image input (3 for NCHW, 2 for NHWC), or None for other inputs."""
    shape = spec.shape
    if len(shape) != 4 or not np.issubdtype(spec.dtype, np.floating):
        return None
    if shape[1] is not None and shape[1] <= 4 and (shape[3] is None or shape[3] > 4):
        return 3
    if shape[3] is not None and shape[3] <= 4 and (shape[1] is None or shape[1] > 4):
        return 2
    return None


def augment_fit_rows(samples: Samples, rows: Rows, specs: list[InputSpec], kind: str) -> tuple[Samples, Rows, Augmentation]:
    """``samples`` ordered fit rows then held rows; returns them with the augmented copies of the fit
    rows appended to the fit range, and what was done."""
    axes = {spec.name: image_width_axis(spec) for spec in specs}
    images = [name for name, axis in axes.items() if axis is not None]
    if kind == "none" or not images:
        return samples, rows, Augmentation("none", 0)
    kind = "flip" if kind == "auto" else kind
    copies = [lambda x, axis: np.flip(x, axis=axis)]
    if kind == "flip+shift":
        copies += [lambda x, axis, s=s, a=a: _shift(x, axis - a, s) for s in (-SHIFT, SHIFT) for a in (0, 1)]
    arrays = {}
    for name, array in samples.arrays.items():
        fit, held = array[rows.fit], array[rows.held]
        axis = axes.get(name)
        extra = [make(fit, axis) if axis is not None else fit for make in copies]
        arrays[name] = np.ascontiguousarray(np.concatenate([fit, *extra, held]))
    added = len(copies) * (rows.fit.stop - rows.fit.start)
    fit_stop = rows.fit.stop + added
    labels = None if samples.labels is None else np.concatenate(
        [samples.labels[rows.fit]] * (1 + len(copies)) + [samples.labels[rows.held]])
    return (Samples(arrays, labels), Rows(slice(0, fit_stop), slice(fit_stop, fit_stop + rows.held.stop - rows.held.start)),
            Augmentation(kind, added))


def _shift(images: np.ndarray, axis: int, step: int) -> np.ndarray:
    """Shift along a spatial axis by ``step`` pixels, repeating the edge (no wrap-around)."""
    size = images.shape[axis]
    index = np.clip(np.arange(size) - step, 0, size - 1)
    return np.take(images, index, axis=axis)
