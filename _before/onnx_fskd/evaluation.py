"""Evaluate a model on samples: accuracy, agreement with a reference, costs and ORT latency."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx
import onnxruntime as ort

from .costs import InputShapes, count_costs
from .data import InputSpec, Samples, input_specs
from .data import _shape_text as known_shape_text
from .errors import FskdError
from .metrics import METRICS, accuracy, as_rows, choose_metric, compare, label_rows, padding_mask, relative_error
from .runtime import DEFAULT_BATCH, make_session, resolve_providers, run_batched, session_device

WARMUP_RUNS = 3
DEFAULT_REPEATS = 20


@dataclass
class EvalResult:
    """What ``onnx-fskd eval`` reports; ``to_json`` keys are a stable interface for scripts."""

    accuracy: float | None
    agreement: float | None        # top-1 agreement with the reference (metric "top1")
    cosine: float | None           # mean cosine similarity with the reference (metric "cosine")
    relative_error: float | None   # of ``output``; every output's is in ``outputs``
    output: str                    # the output accuracy, agreement and cosine are measured on
    metric: str                    # "top1" or "cosine"
    outputs: dict[str, dict[str, float]]  # name → {"relative_error": ...} against the reference
    params: int
    macs: int  # per sample
    latency_ms: dict[str, float]
    samples: int
    provider: str

    def to_json(self) -> dict:
        return asdict(self)


def evaluate(model: onnx.ModelProto, samples: Samples | list[Samples], reference: onnx.ModelProto | None = None,
             providers: list[str] | None = None, batch_size: int = DEFAULT_BATCH,
             latency_batch: int | None = None, repeats: int = DEFAULT_REPEATS, output: str | None = None,
             metric: str = "auto", input_shapes: InputShapes | None = None) -> EvalResult:
    """Run ``model`` (and ``reference``) over all samples and measure it.

    ``samples`` may be a list of batches (a folder of .npz files), each run as it is, so text batches
    keep their own sequence lengths. Every output's relative error is measured against the reference;
    accuracy (with labels) and agreement or cosine (``metric``, by default chosen from the output: see
    metrics.choose_metric) on ``output``, the first by default. Positions an attention_mask input marks
    as padding count nowhere. With neither labels nor a reference there is nothing to report.
    """
    batches = samples if isinstance(samples, list) else [samples]
    labelled = all(batch.labels is not None for batch in batches)
    if not labelled and reference is None:
        raise FskdError("nothing to compare: samples carry no labels and no --reference given")
    if metric not in METRICS:
        raise FskdError(f"--metric must be one of {', '.join(METRICS)}, got {metric}")
    names = [value.name for value in model.graph.output]
    output = output or names[0]
    if output not in names:
        raise FskdError(f"--output {output}: the model has no such output (it has {', '.join(names)})")
    if reference is not None:
        _check_same_interface(model, reference)
    metric = choose_metric(model, output, metric)
    providers = providers or resolve_providers("auto")
    session = make_session(model, providers, tuned=True)
    ref_session = make_session(reference, providers, tuned=True) if reference is not None else None
    fixed_batch = _fixed_batch(input_specs(model))
    ref_fixed_batch = _fixed_batch(input_specs(reference)) if reference is not None else None
    ours: dict[str, list[np.ndarray]] = {name: [] for name in names}
    theirs: dict[str, list[np.ndarray]] = {name: [] for name in names}
    labels = []
    for batch in batches:
        values = run_batched(session, batch.arrays, names, batch_size, fixed_batch)
        expected = None if ref_session is None else run_batched(
            ref_session, batch.arrays, names, batch_size, ref_fixed_batch)
        masks = {name: padding_mask(batch.arrays, values[name]) for name in names}
        for name in names:
            ours[name].append(as_rows(values[name], masks[name]))
            if expected is not None:
                theirs[name].append(as_rows(expected[name], masks[name]))
        if labelled:
            labels.append(label_rows(batch.labels, values[output], masks[output]))
    selected = _stack(ours[output], output)
    comparison, per_output = None, {}
    if ref_session is not None:
        per_output = {name: {"relative_error": relative_error(_flat(ours[name]), _flat(theirs[name]))}
                      for name in names}
        comparison = compare(selected, _stack(theirs[output], output), metric)
    cost = count_costs(model, batch=1, input_shapes=input_shapes)
    return EvalResult(
        accuracy=accuracy(selected, np.concatenate(labels)) if labelled else None,
        agreement=comparison and comparison.agreement,
        cosine=comparison and comparison.cosine,
        relative_error=comparison and comparison.relative_error,
        output=output,
        metric=metric,
        outputs=per_output,
        params=cost.params,
        macs=cost.macs_per_sample,
        latency_ms=latencies(session, batches[0], fixed_batch, latency_batch or batch_size, repeats),
        samples=sum(len(batch) for batch in batches),
        provider=session_device(session),
    )


def _stack(parts: list[np.ndarray], name: str) -> np.ndarray:
    """One output's rows from all batches; per-sample metrics need the same shape past the first axis."""
    if len({part.shape[1:] for part in parts}) > 1:
        raise FskdError(f"output {name} has a different shape in each batch ({', '.join(str(p.shape) for p in parts)})"
                        f"; agreement needs one shape: pass --output with an output of fixed size, or one .npz")
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _flat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([part.ravel() for part in parts])


def _fixed_batch(specs: list[InputSpec]) -> int | None:
    return specs[0].batch_dim if specs else None


def latencies(session: ort.InferenceSession, samples: Samples, fixed_batch: int | None, batch_size: int,
              repeats: int = DEFAULT_REPEATS) -> dict[str, float]:
    """Latency at batch 1 and at ``batch_size`` (only the fixed size for a fixed-batch model), keyed "batch_N"."""
    sizes = [fixed_batch] if fixed_batch else sorted({1, batch_size})
    return {f"batch_{n}": _latency_ms(session, samples, n, repeats) for n in sizes}


def _latency_ms(session: ort.InferenceSession, samples: Samples, batch: int, repeats: int) -> float:
    """Median wall time of one run at ``batch`` after warm-up; samples repeat when there are too few."""
    rows = np.arange(batch) % len(samples)
    feeds = {name: array[rows] for name, array in samples.arrays.items()}
    for _ in range(WARMUP_RUNS):
        session.run(None, feeds)
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _check_same_interface(model: onnx.ModelProto, reference: onnx.ModelProto) -> None:
    """The reference must take the same inputs and give the same outputs, or the comparison is meaningless."""
    for kind, ours, theirs in (("inputs", _inputs(model), _inputs(reference)),
                               ("outputs", _outputs(model), _outputs(reference))):
        if len(ours) != len(theirs) or not all(_compatible(a, b) for a, b in zip(ours, theirs)):
            raise FskdError(f"reference {kind} differ from the model's: model has {_describe(ours)}, "
                            f"reference has {_describe(theirs)}")


# A graph input or output as compared: name, element type ("" for outputs) and shape (None: unknown).
Signature = tuple[str, str, tuple[int | None, ...] | None]


def _inputs(model: onnx.ModelProto) -> list[Signature]:
    return [(spec.name, str(spec.dtype), spec.shape) for spec in input_specs(model)]


def _outputs(model: onnx.ModelProto) -> list[Signature]:
    """Outputs compare by name and shape only: their precision does not stop the comparison."""
    return [(value.name, "", tuple(d.dim_value if d.HasField("dim_value") else None
                                   for d in value.type.tensor_type.shape.dim)
             if value.type.tensor_type.HasField("shape") else None) for value in model.graph.output]


def _compatible(a: Signature, b: Signature) -> bool:
    """Same name and type; shapes equal past the batch axis wherever both are known (run_batched handles batch)."""
    (name_a, type_a, shape_a), (name_b, type_b, shape_b) = a, b
    if name_a != name_b or type_a != type_b:
        return False
    if shape_a is None or shape_b is None:
        return True
    return len(shape_a) == len(shape_b) and all(
        x is None or y is None or x == y for x, y in zip(shape_a[1:], shape_b[1:]))


def _describe(values: list[Signature]) -> str:
    return ", ".join(" ".join(filter(None, (name, dtype, _shape_text(shape)))) for name, dtype, shape in values)


def _shape_text(shape: tuple[int | None, ...] | None) -> str:
    return "(?)" if shape is None else known_shape_text(shape)
