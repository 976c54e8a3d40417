"""Sample loading: .npy, .npz (one array per input), a folder of .npz batches or of images, or (from the
Python API) arrays, feed dicts and CalibrationDataReader-like objects, checked against the model's inputs."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Union

import numpy as np
import onnx
from onnx import helper

from .errors import FskdError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
LABEL_KEY = "labels"
# An input of this name marks padded positions with 0 (the Hugging Face convention); batches of
# different lengths are padded to the longest with zeros, which this mask then hides from the metrics.
ATTENTION_MASK = "attention_mask"


class BatchReader(Protocol):
    """ONNX Runtime's CalibrationDataReader: ``get_next()`` returns one feed dict, then None."""

    def get_next(self) -> Mapping[str, np.ndarray] | None: ...


DataSource = Union[str, os.PathLike, Mapping[str, np.ndarray], Iterable[Mapping[str, np.ndarray]], BatchReader]


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its name, numpy dtype and shape (None where the dimension is symbolic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    @property
    def batch_dim(self) -> int | None:
        """The fixed batch size, or None when the batch dimension is dynamic."""
        return self.shape[0] if self.shape else None


@dataclass(frozen=True)
class ImageOptions:
    """How a folder of images becomes a tensor."""

    size: tuple[int, int] | None = None  # (height, width) of the centre crop; default: the model's input shape
    resize: int | None = None  # shorter side before the crop; default: just covers the crop (no margin)
    mean: tuple[float, ...] | None = None  # None: 0, with a warning (few real models were trained on that)
    std: tuple[float, ...] | None = None   # None: 1
    scale: float = 1.0 / 255.0
    layout: str = "nchw"
    channel_order: str = "rgb"  # or "bgr" (OpenCV/Caffe-trained models)


@dataclass
class Samples:
    """Model inputs stacked along the batch axis, plus labels when the data carries them."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def take(self, index: np.ndarray | slice) -> "Samples":
        labels = None if self.labels is None else self.labels[index]
        return Samples({k: v[index] for k, v in self.arrays.items()}, labels)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are not initializers (older exports list weights as inputs too)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)), dims))
    return specs


def load_samples(path: str | Path, specs: list[InputSpec], num_samples: int | None = None,
                 images: ImageOptions | None = None) -> Samples:
    """Read SAMPLES and validate it against the model's inputs; raise FskdError on anything unusable."""
    path = Path(path)
    if not path.exists():
        raise FskdError(f"samples not found: {path}")
    if _is_npz_folder(path):
        samples = _load_npz_folder(path, specs)
    elif path.is_dir():
        samples = _load_image_folder(path, specs, images or ImageOptions())
    elif path.suffix == ".npy":
        samples = _load_npy(path, specs)
    elif path.suffix == ".npz":
        samples = _load_npz(path, specs)
    else:
        raise FskdError(f"samples must be a .npy file, a .npz file, a folder of .npz batches or a folder of "
                        f"images, got {path}")
    if num_samples is not None:
        if num_samples <= 0:
            raise FskdError(f"--num-samples must be positive, got {num_samples}")
        samples = samples.take(slice(0, num_samples))
    log.info("read %d samples from %s", len(samples), path)
    return validate_samples(samples, specs, str(path))


def _load_npy(path: Path, specs: list[InputSpec]) -> Samples:
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise FskdError(f"a .npy file feeds single-input models only; this model has inputs {names}: use a .npz")
    return Samples({specs[0].name: _read_array(lambda: np.load(path, allow_pickle=False), path)})


def _load_npz(path: Path, specs: list[InputSpec]) -> Samples:
    try:
        archive = np.load(path, allow_pickle=False)
        content = {key: archive[key] for key in archive.files}
    except Exception as exc:
        raise FskdError(f"cannot read samples {path}: {exc}") from None
    return _pick_inputs(content, specs, str(path))


def _pick_inputs(content: Mapping[str, np.ndarray], specs: list[InputSpec], source: str) -> Samples:
    """The model's inputs by name (a lone array feeds a single-input model), labels under 'labels'."""
    content = dict(content)
    labels = content.pop(LABEL_KEY, None)
    names = [s.name for s in specs]
    if all(name in content for name in names):
        arrays = {name: np.asarray(content[name]) for name in names}
    elif len(specs) == 1 and len(content) == 1:
        arrays = {names[0]: np.asarray(next(iter(content.values())))}
    else:
        missing = [n for n in names if n not in content]
        raise FskdError(f"{source} lacks arrays for model inputs {', '.join(missing)} "
                        f"(it has {', '.join(content) or 'none'})")
    return Samples(arrays, None if labels is None else np.asarray(labels))


def _is_npz_folder(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.npz"))


def _load_npz_folder(path: Path, specs: list[InputSpec]) -> Samples:
    """One .npz per batch, in name order, stacked (and padded where sequence lengths differ)."""
    return concatenate_batches(_load_npz_folder_batches(path, specs), specs, str(path))


def _load_npz_folder_batches(path: Path, specs: list[InputSpec]) -> list[Samples]:
    return [_load_npz(file, specs) for file in sorted(path.glob("*.npz"))]


def concatenate_batches(batches: list[Samples], specs: list[InputSpec], source: str) -> Samples:
    """Stack batches along the batch axis. Batches whose other axes differ (sequence lengths) are padded
    with zeros to the longest, which is only sound when an attention_mask input marks the padding."""
    if not batches:
        raise FskdError(f"{source} holds no batches")
    arrays = {}
    for spec in specs:
        parts = [b.arrays[spec.name] for b in batches]
        if len({p.ndim for p in parts}) > 1:
            raise FskdError(f"{source}: batches of input {spec.name} have different ranks")
        longest = tuple(max(sizes) for sizes in zip(*(p.shape[1:] for p in parts)))
        if any(p.shape[1:] != longest for p in parts):
            if ATTENTION_MASK not in {s.name for s in specs}:
                raise FskdError(f"{source}: batches of input {spec.name} differ in shape past the batch axis "
                                f"and the model has no {ATTENTION_MASK} input to mark padding")
            parts = [np.pad(p, [(0, 0)] + [(0, want - got) for want, got in zip(longest, p.shape[1:])])
                     for p in parts]
        arrays[spec.name] = np.concatenate(parts)
    labels = [b.labels for b in batches]
    has_labels = [x is not None for x in labels]
    if any(has_labels) and not all(has_labels):
        raise FskdError(f"{source}: some batches carry labels and some do not")
    return Samples(arrays, np.concatenate(labels) if all(has_labels) else None)


def load_batches(path: str | Path, specs: list[InputSpec], num_samples: int | None = None,
                 images: ImageOptions | None = None) -> list[Samples]:
    """Like load_samples, but a folder of .npz files stays one Samples per file, each validated on its
    own, so batches of different sequence lengths can run as they are, unpadded (eval does)."""
    path = Path(path)
    if not _is_npz_folder(path):
        return [load_samples(path, specs, num_samples, images)]
    batches = _first(_load_npz_folder_batches(path, specs), num_samples)
    log.info("read %d samples in %d batches from %s", sum(map(len, batches)), len(batches), path)
    return [validate_samples(batch, specs, str(path)) for batch in batches]


def batches_from(data: DataSource, specs: list[InputSpec], num_samples: int | None = None,
                 images: ImageOptions | None = None) -> list[Samples]:
    """Validated batches from any form the Python API takes: a path (as on the command line), a dict
    of arrays, an iterable of feed dicts (one batch each), or an object with ``get_next()`` (ONNX
    Runtime's CalibrationDataReader), read until it returns None."""
    if isinstance(data, (str, os.PathLike)):
        return load_batches(data, specs, num_samples, images)
    if isinstance(data, Samples):
        batches, source = [data], "samples"
    elif isinstance(data, Mapping):
        batches, source = [_pick_inputs(data, specs, "data")], "data"
    else:
        if hasattr(data, "get_next"):
            feeds, source = iter(data.get_next, None), "the data reader"
        elif isinstance(data, Iterable):
            feeds, source = data, "the data iterable"
        else:
            raise FskdError("data must be a path, a dict of arrays, an iterable of feed dicts or an object with "
                            f"get_next(), got {type(data).__name__}")
        batches = []
        for feed in feeds:
            if not isinstance(feed, Mapping):
                raise FskdError(f"{source} gave a {type(feed).__name__}, expected a dict of input name → array")
            batches.append(_pick_inputs(feed, specs, source))
        if not batches:
            raise FskdError(f"{source} gave no batches")
    return [validate_samples(batch, specs, source) for batch in _first(batches, num_samples)]


def samples_from(data: DataSource, specs: list[InputSpec], num_samples: int | None = None,
                 images: ImageOptions | None = None) -> Samples:
    """All of ``data`` (see batches_from) as one Samples; batches of different lengths are padded."""
    batches = batches_from(data, specs, num_samples, images)
    return batches[0] if len(batches) == 1 else concatenate_batches(batches, specs, "data")


def _first(batches: list[Samples], num_samples: int | None) -> list[Samples]:
    """The leading batches that hold ``num_samples`` samples, the last one cut short."""
    if num_samples is None:
        return batches
    if num_samples <= 0:
        raise FskdError(f"--num-samples must be positive, got {num_samples}")
    kept, left = [], num_samples
    for batch in batches:
        if left <= 0:
            break
        kept.append(batch if len(batch) <= left else batch.take(slice(0, left)))
        left -= len(kept[-1])
    return kept


def _read_array(loader, path: Path) -> np.ndarray:
    try:
        return loader()
    except Exception as exc:
        raise FskdError(f"cannot read samples {path}: {exc}") from None


def _load_image_folder(path: Path, specs: list[InputSpec], opts: ImageOptions) -> Samples:
    """Images directly in the folder, or in one sub-folder per class (sorted names give the labels); each
    resized so its shorter side is ``opts.resize`` (aspect kept), then centre-cropped to the input size."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a declared dependency
        raise FskdError("reading image folders needs pillow: pip install pillow") from None
    if len(specs) != 1:
        raise FskdError("an image folder feeds single-input models only")
    spec = specs[0]
    if opts.layout not in ("nchw", "nhwc"):
        raise FskdError(f"--layout must be nchw or nhwc, got {opts.layout}")
    if opts.channel_order not in ("rgb", "bgr"):
        raise FskdError(f"--channel-order must be rgb or bgr, got {opts.channel_order}")
    if len(spec.shape) != 4:
        raise FskdError(f"input {spec.name} has rank {len(spec.shape)}; images need a rank-4 input")
    channel_axis = 1 if opts.layout == "nchw" else 3
    channels = spec.shape[channel_axis]
    spatial = spec.shape[2:4] if opts.layout == "nchw" else spec.shape[1:3]
    size = opts.size or (spatial if None not in spatial else None)
    if size is None:
        raise FskdError(f"input {spec.name} has dynamic height/width; pass --image-size")
    class_dirs = sorted(p for p in path.iterdir() if p.is_dir())
    if class_dirs:
        files = [(f, label) for label, d in enumerate(class_dirs) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, None) for f in sorted(path.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FskdError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {path}")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise FskdError(f"input {spec.name} has {channels} channels; images give 1 or 3")
    if opts.mean is None and opts.std is None:
        log.warning("images from %s are scaled to [0, 1] with mean 0 and std 1; most pretrained models expect "
                    "their training normalisation, e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225", path)
    mean = np.asarray(opts.mean or (0.0,), dtype=np.float32)
    std = np.asarray(opts.std or (1.0,), dtype=np.float32)
    batch = []
    for file, _ in files:
        try:
            with Image.open(file) as img:
                pixels = np.asarray(_resize_and_crop(img.convert(mode), size, opts.resize), dtype=np.float32)
        except Exception as exc:
            raise FskdError(f"cannot read image {file}: {exc}") from None
        pixels = pixels.reshape(size[0], size[1], channels) * opts.scale
        if channels == 3 and opts.channel_order == "bgr":
            pixels = pixels[:, :, ::-1]
        pixels = (pixels - mean) / std
        batch.append(pixels if opts.layout == "nhwc" else pixels.transpose(2, 0, 1))
    labels = np.asarray([label for _, label in files], dtype=np.int64) if class_dirs else None
    return Samples({spec.name: np.stack(batch).astype(spec.dtype)}, labels)


def _resize_and_crop(image, size: tuple[int, int], shorter_side: int | None):
    """torchvision's Resize(shorter_side) + CenterCrop(size): the aspect ratio is kept, the borders cut."""
    from PIL import Image

    height, width = size
    shorter = shorter_side or max(height, width)
    scale = shorter / min(image.width, image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           resample=Image.BILINEAR)  # as torchvision
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def validate_samples(samples: Samples, specs: list[InputSpec], source: str) -> Samples:
    """Check count, shapes, dtypes and finiteness; cast floats to the model's float type."""
    checked = {}
    count = None
    cast: list[str] = []
    for spec in specs:
        array = np.asarray(samples.arrays[spec.name])
        if array.ndim == 0 or len(array) == 0:
            raise FskdError(f"{source} holds no samples for input {spec.name}")
        if array.ndim != len(spec.shape):
            raise FskdError(f"{source}: input {spec.name} expects rank {len(spec.shape)} "
                            f"{_shape_text(spec.shape)}, samples have shape {array.shape}")
        for axis, (want, got) in enumerate(zip(spec.shape[1:], array.shape[1:]), start=1):
            if want is not None and want != got:
                raise FskdError(f"{source}: input {spec.name} expects shape {_shape_text(spec.shape)}, "
                                f"samples have shape {array.shape} (axis {axis} differs)")
        if count is not None and len(array) != count:
            raise FskdError(f"{source}: inputs have different sample counts ({count} and {len(array)})")
        count = len(array)
        if np.issubdtype(spec.dtype, np.floating):
            if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
                raise FskdError(f"{source}: input {spec.name} expects {spec.dtype}, samples are {array.dtype}")
            if not np.isfinite(array).all():
                raise FskdError(f"{source}: input {spec.name} contains NaN or Inf")
            if np.issubdtype(array.dtype, np.integer):
                cast.append(f"{spec.name} ({array.dtype} → {spec.dtype}, values {array.min()}..{array.max()})")
            array = array.astype(spec.dtype, copy=False)
        elif array.dtype != spec.dtype:
            if not (np.issubdtype(spec.dtype, np.integer) and np.issubdtype(array.dtype, np.integer)):
                raise FskdError(f"{source}: input {spec.name} expects {spec.dtype}, samples are {array.dtype}")
            array = array.astype(spec.dtype)
        checked[spec.name] = np.ascontiguousarray(array)
    if cast:  # raw 0–255 pixels fed to a network that expects normalised floats is a classic mistake
        log.warning("%s: integer samples cast to the model's float input as they are: %s; if the model expects "
                    "normalised values, save the samples normalised (e.g. x / 255, then the model's mean and std), "
                    "or give a folder of images with --scale/--mean/--std", source, "; ".join(cast))
    labels = None if samples.labels is None else class_labels(np.asarray(samples.labels), source)
    if labels is not None and len(labels) != count:
        raise FskdError(f"{source}: {len(labels)} labels for {count} samples")
    return Samples(checked, labels)


def class_labels(labels: np.ndarray, source: str) -> np.ndarray:
    """Integer class ids: (N,), (N, 1) and one-hot (N, classes) become (N,); other (N, T) integer labels
    (one per position of a rank-3 output) stay as they are."""
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    elif labels.ndim == 2 and np.isin(labels, (0, 1)).all() and (labels.sum(axis=1) == 1).all():
        labels = labels.argmax(axis=1)
    integral = np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and np.isfinite(labels).all() and (labels == np.round(labels)).all())
    if labels.ndim not in (1, 2) or not integral:
        raise FskdError(f"{source}: labels of shape {labels.shape} ({labels.dtype}) are neither class ids (N,) or "
                        f"(N, 1), nor one-hot (N, classes), nor one integer id per position (N, T)")
    return labels.astype(np.int64)


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"
