"""Load models (external data included) and write them atomically, keeping IR version and opsets."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import external_data_helper

from .errors import FskdError
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


def external_data_files(path: str | os.PathLike) -> list[Path]:
    """The external-data files an ONNX model file references (none for anything unreadable)."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a model (samples, a map): nothing more to protect
        return []
    locations = {info.value for tensor in external_data_helper._get_all_tensors(model)
                 if external_data_helper.uses_external_data(tensor)
                 for info in tensor.external_data if info.key == "location"}
    return [path.parent / location for location in sorted(locations)]


def write_model(model: onnx.ModelProto, path: Path, like: onnx.ModelProto | None = None) -> list[Path]:
    """Write binary protobuf (whatever the extension: onnx would write text for .json or .txt), with
    external data beside it above protobuf's 2 GiB limit. Returns the files written.

    ``like`` is the model whose IR version and opsets the output must keep (onnx 1.23 would otherwise
    stamp IR 14, which current onnxruntime refuses)."""
    if like is not None:
        opsets = [onnx.helper.make_opsetid(o.domain, o.version) for o in like.opset_import]
        model.ir_version = like.ir_version
        del model.opset_import[:]
        model.opset_import.extend(opsets)
    if model.ByteSize() <= _PROTOBUF_LIMIT:
        onnx.save_model(model, str(path), format="protobuf")
        return [path]
    data_name = f"{path.name}.data"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving as external data strips the weights from the proto it is given
    onnx.save_model(copy, str(path), format="protobuf", save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    return [path, path.parent / data_name]
