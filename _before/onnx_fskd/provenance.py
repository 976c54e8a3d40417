"""Who wrote a model and from what: the producer stamp, dropping the internal channel map from a
recovered model, and the versions, options and input digests a report needs to reproduce a run."""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx

from . import __version__
from .pairing import MAP_METADATA_KEY

PRODUCER_NAME = "onnx-fskd"
_CHUNK = 1 << 20


def stamp_producer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Say in the model who wrote it (the input's producer otherwise stays, e.g. "pytorch")."""
    model.producer_name = PRODUCER_NAME
    model.producer_version = __version__
    return model


def drop_channel_map(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove the teacher→student map a compressor stored: it only means something to `fit`."""
    kept = [prop for prop in model.metadata_props if prop.key != MAP_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    return model


def versions() -> dict[str, str]:
    """The versions that decide a run's numbers (onnxruntime under whichever build is installed)."""
    found = {"onnx-fskd": __version__, "python": platform.python_version()}
    for name in ("onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "scipy", "onnx-graphsurgeon"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def digest(source: str | Path | onnx.ModelProto | Mapping[str, np.ndarray] | None) -> str | None:
    """SHA-256 of a file, of every file under a folder (names and bytes, sorted), of a model's bytes, or
    of arrays (names, dtypes, shapes and bytes); None when there is nothing to hash (data streamed from
    an iterator is hashed by the caller from the arrays it gathered)."""
    if source is None:
        return None
    sha = hashlib.sha256()
    if isinstance(source, onnx.ModelProto):
        sha.update(source.SerializeToString(deterministic=True))
    elif isinstance(source, Mapping):
        for name in sorted(source):
            array = np.ascontiguousarray(source[name])
            sha.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
            sha.update(array.tobytes())
    else:
        path = Path(source)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if path.is_dir():
                sha.update(str(file.relative_to(path)).encode() + b"\0")
            with open(file, "rb") as handle:
                while block := handle.read(_CHUNK):
                    sha.update(block)
    return sha.hexdigest()


def run_record(options: Mapping[str, object], seed: int,
               inputs: Mapping[str, str | Path | onnx.ModelProto | Mapping[str, np.ndarray] | None]) -> dict:
    """The report's ``run`` section: enough to rerun it and to know whether the inputs were the same."""
    return {"versions": versions(), "seed": seed,
            "options": {key: _plain(value) for key, value in options.items()},
            "inputs": {role: {"source": _describe(source), "sha256": digest(source)}
                       for role, source in inputs.items() if source is not None}}


def _describe(source) -> str:
    if isinstance(source, onnx.ModelProto):
        return "ModelProto"
    if isinstance(source, Mapping):
        return "arrays"
    return str(source)


def _plain(value):
    """JSON-safe option values: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value
