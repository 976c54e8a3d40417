"""Sample loading: .npy, .npz (one array per input) or a folder of images, checked against the model's inputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from .errors import FskdError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
LABEL_KEY = "labels"


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

    size: tuple[int, int] | None = None  # (height, width); default: the model's input shape
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0
    layout: str = "nchw"


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
    if path.is_dir():
        samples = _load_image_folder(path, specs, images or ImageOptions())
    elif path.suffix == ".npy":
        samples = _load_npy(path, specs)
    elif path.suffix == ".npz":
        samples = _load_npz(path, specs)
    else:
        raise FskdError(f"samples must be a .npy file, a .npz file or a folder of images, got {path}")
    if num_samples is not None:
        if num_samples <= 0:
            raise FskdError(f"--num-samples must be positive, got {num_samples}")
        samples = samples.take(slice(0, num_samples))
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
    labels = content.pop(LABEL_KEY, None)
    names = [s.name for s in specs]
    if all(name in content for name in names):
        arrays = {name: content[name] for name in names}
    elif len(specs) == 1 and len(content) == 1:
        arrays = {names[0]: next(iter(content.values()))}
    else:
        missing = [n for n in names if n not in content]
        raise FskdError(f"{path} lacks arrays for model inputs {', '.join(missing)} (it has {', '.join(content) or 'none'})")
    return Samples(arrays, None if labels is None else np.asarray(labels))


def _read_array(loader, path: Path) -> np.ndarray:
    try:
        return loader()
    except Exception as exc:
        raise FskdError(f"cannot read samples {path}: {exc}") from None


def _load_image_folder(path: Path, specs: list[InputSpec], opts: ImageOptions) -> Samples:
    """Images directly in the folder, or in one sub-folder per class (sorted names give the labels)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a declared dependency
        raise FskdError("reading image folders needs pillow: pip install pillow") from None
    if len(specs) != 1:
        raise FskdError("an image folder feeds single-input models only")
    spec = specs[0]
    if opts.layout not in ("nchw", "nhwc"):
        raise FskdError(f"--layout must be nchw or nhwc, got {opts.layout}")
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
    mean = np.asarray(opts.mean, dtype=np.float32)
    std = np.asarray(opts.std, dtype=np.float32)
    batch = []
    for file, _ in files:
        try:
            with Image.open(file) as img:
                pixels = np.asarray(img.convert(mode).resize((size[1], size[0])), dtype=np.float32)
        except Exception as exc:
            raise FskdError(f"cannot read image {file}: {exc}") from None
        pixels = pixels.reshape(size[0], size[1], channels) * opts.scale
        pixels = (pixels - mean) / std
        batch.append(pixels if opts.layout == "nhwc" else pixels.transpose(2, 0, 1))
    labels = np.asarray([label for _, label in files], dtype=np.int64) if class_dirs else None
    return Samples({spec.name: np.stack(batch).astype(spec.dtype)}, labels)


def validate_samples(samples: Samples, specs: list[InputSpec], source: str) -> Samples:
    """Check count, shapes, dtypes and finiteness; cast floats to the model's float type."""
    checked = {}
    count = None
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
            array = array.astype(spec.dtype, copy=False)
        elif array.dtype != spec.dtype:
            if not (np.issubdtype(spec.dtype, np.integer) and np.issubdtype(array.dtype, np.integer)):
                raise FskdError(f"{source}: input {spec.name} expects {spec.dtype}, samples are {array.dtype}")
            array = array.astype(spec.dtype)
        checked[spec.name] = np.ascontiguousarray(array)
    labels = samples.labels
    if labels is not None and len(labels) != count:
        raise FskdError(f"{source}: {len(labels)} labels for {count} samples")
    return Samples(checked, labels)


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"
