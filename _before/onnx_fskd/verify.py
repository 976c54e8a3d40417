"""Verify a merge: the checker passes, ONNX Runtime loads it, and it computes what the student with
explicit Q nodes computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from .errors import FskdError
from .graph import GraphIndex
from .metrics import relative_error
from .model_io import check
from .points import CorrectionPoint
from .runtime import make_session, run_batched, session_device, session_precision
from .solve import Adapter

# Merged vs explicit-Q model, both in full float32 (CPU, or CUDA with TF32 off: see runtime.make_session).
EXACTNESS_TOLERANCE = 1e-4


def with_explicit_adapters(student: onnx.ModelProto, adapters: list[tuple[CorrectionPoint, Adapter]]) -> onnx.ModelProto:
    """The student with y ← Q·y + d inserted as real nodes after each point: the reference for the merge."""
    model = onnx.ModelProto()
    model.CopyFrom(student)
    graph = GraphIndex(model)
    inserted: dict[str, list[onnx.NodeProto]] = {}
    for point, adapter in adapters:
        producer = graph.producer[point.output]
        pre = f"{point.output}/before_Q"
        producer.output[list(producer.output).index(point.output)] = pre
        nodes, inits = point.explicit_q(pre, point.output, adapter.q, adapter.d)
        inserted[producer.name] = nodes
        model.graph.initializer.extend(inits)
    ordered = []
    for node in list(model.graph.node):
        ordered.append(node)
        ordered.extend(inserted.get(node.name, []))
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


def check_model(model: onnx.ModelProto) -> None:
    try:
        check(model)
    except Exception as exc:
        raise FskdError(f"internal: the merged model fails onnx.checker: {str(exc).splitlines()[0]}") from None


def exactness(merged_outputs: dict[str, np.ndarray], explicit: onnx.ModelProto, feeds: dict[str, np.ndarray],
              providers: list[str], batch_size: int, fixed_batch: int | None) -> float:
    """Largest relative error over the outputs between the merged model (its outputs on ``feeds``) and the
    explicit-Q model."""
    outputs = [o.name for o in explicit.graph.output]
    want = run_batched(make_session(explicit, providers, exact=True), feeds, outputs, batch_size, fixed_batch)
    return max(relative_error(merged_outputs[name], want[name]) for name in outputs)


def verified_on(session: ort.InferenceSession) -> str:
    """Where the merge check ran, for the report: 'cpu' or 'cuda (use_tf32=0)'."""
    device = session_device(session)
    return device if device == "cpu" else f"{device} ({'use_tf32=0' if session_precision(session) == 'fp32' else 'tf32'})"
