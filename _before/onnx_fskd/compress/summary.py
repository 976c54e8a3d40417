"""Per-layer and total parameters and MACs of a compression, for the commands' tables (costs.count_costs)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from ..costs import InputShapes, count_costs
from .result import CompressResult


@dataclass(frozen=True)
class Row:
    name: str
    op_type: str
    before: str
    after: str
    params: tuple[int, int]
    macs: tuple[int, int]


def summarize(teacher: onnx.ModelProto, result: CompressResult, batch: int = 1,
              input_shapes: InputShapes | None = None) -> tuple[list[Row], Row]:
    """One row per changed layer (the student side sums the nodes that replaced it), and the totals."""
    t_cost, s_cost = (count_costs(model, batch, input_shapes) for model in (teacher, result.model))
    t_layers = {layer.name: layer for layer in t_cost.layers}
    s_layers = {layer.name: layer for layer in s_cost.layers}
    rows = []
    for change in result.layers:
        before = t_layers.get(change.name)
        after = [s_layers[name] for name in change.nodes if name in s_layers]
        rows.append(Row(change.name, change.op_type, change.before, change.after,
                        (before.params if before else 0, sum(layer.params for layer in after)),
                        (before.macs if before else 0, sum(layer.macs for layer in after))))
    total = Row("total", "", "", "", (t_cost.params, s_cost.params), (t_cost.macs, s_cost.macs))
    return rows, total
