"""Side-by-side costs of teacher, student and recovered model: parameters, MACs and measured latency."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .costs import InputShapes, count_costs
from .data import Samples, input_specs
from .evaluation import latencies
from .runtime import make_session


@dataclass
class ModelFigures:
    name: str
    params: int
    macs: int  # per sample
    latency_ms: dict[str, float]


def model_figures(models: dict[str, onnx.ModelProto], samples: Samples, providers: list[str],
                  batch_size: int, repeats: int = 20, input_shapes: InputShapes | None = None) -> list[ModelFigures]:
    """Params, MACs per sample (``input_shapes`` fixes dynamic dimensions) and ORT latency (warm-up, median
    of repeats) for each named model."""
    figures = []
    for name, model in models.items():
        fixed = input_specs(model)[0].batch_dim
        cost = count_costs(model, batch=1, input_shapes=input_shapes)
        session = make_session(model, providers, tuned=True)  # latency: timed after a warm-up
        figures.append(ModelFigures(name, cost.params, cost.macs_per_sample,
                                    latencies(session, samples, fixed, batch_size, repeats)))
    return figures
