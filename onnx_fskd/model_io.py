"""Load models (external data included) and write them atomically, keeping IR version and opsets."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx

from .errors import FskdError, UsageError
from .shapes import weightless_copy

# Protobuf refuses to serialise a single message above 2 GiB; larger models must use external data.
_PROTOBUF_LIMIT = 2**31 - 1


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model with its external data and check it; raise FskdError with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise FskdError(f"model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf raises DecodeError, missing external files raise OSError
        raise FskdError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise FskdError(f"{path} is not a valid ONNX model: its graph has no nodes")
    try:
        check(model)
    except Exception as exc:  # onnx.checker.ValidationError and friends
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FskdError(f"{path} is not a valid ONNX model: {first}") from None
    return model


def check(model: onnx.ModelProto) -> None:
    """onnx.checker, which refuses protos over 2 GiB: those are checked without their weight bytes."""
    onnx.checker.check_model(model if model.ByteSize() < _PROTOBUF_LIMIT else weightless_copy(model))


def check_output_path(out: str | os.PathLike, inputs: list[str | os.PathLike], force: bool) -> Path:
    """Refuse to overwrite an input or an existing file (without force), or to write into a missing folder."""
    out = Path(out)
    for src in inputs:
        if src is not None and out.resolve() == Path(src).resolve():
            raise UsageError(f"output {out} is the same file as input {src}; choose another -o")
    if out.exists() and not force:
        raise UsageError(f"output {out} exists; pass --force to overwrite it")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise FskdError(f"cannot write {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise FskdError(f"cannot write {out}: folder {parent} is not writable")
    return out


def save_model_atomic(model: onnx.ModelProto, out: str | os.PathLike, like: onnx.ModelProto | None = None) -> None:
    """Write into a temporary folder beside the target, then rename, so a failure never leaves half a model.

    ``like`` is the model whose IR version and opsets the output must keep (onnx 1.23 would otherwise
    stamp IR 14, which current onnxruntime refuses).
    """
    out = Path(out)
    if like is not None:
        opsets = [onnx.helper.make_opsetid(o.domain, o.version) for o in like.opset_import]
        model.ir_version = like.ir_version
        del model.opset_import[:]
        model.opset_import.extend(opsets)
    external = model.ByteSize() > _PROTOBUF_LIMIT
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=str(out.resolve().parent)))
    try:
        staged = staging / out.name
        if external:
            data_name = f"{out.name}.data"
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # saving as external data strips the weights from the proto it is given
            onnx.save_model(copy, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(staging / data_name, out.parent / data_name)
        else:
            onnx.save_model(model, str(staged))
        os.replace(staged, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
