"""Structured channel pruning of an ONNX model by dependency groups, with the map ``fit`` reads.

Node names, graph inputs and graph outputs stay those of the (normalised) teacher; only constants
shrink (and a depthwise Conv's group count). The student's metadata gets the teacher→student map with
the kept teacher channels of every correction point, so ``fit`` has nothing to infer."""

from __future__ import annotations

import re

import numpy as np
import onnx

from ..errors import FskdError, UsageError
from ..graph import GraphIndex
from ..normalize import normalise
from ..ops import linear_op_for
from ..ops.base import attribute
from ..pairing import MapEntry
from ..points import find_points
from . import slicing
from .groups import Group, find_groups
from .importance import CRITERIA, global_counts, importance, kept_channels, per_layer_counts
from .result import CompressResult, LayerChange, write_map


def check_prune_options(ratio: float, criterion: str = "l1", exclude: str | None = None, round_to: int = 1,
                        head_ratio: float | None = None) -> re.Pattern | None:
    """Validate the options (UsageError, exit 2) before any work; returns the compiled --exclude."""
    if not 0 <= ratio < 1:
        raise UsageError(f"--ratio must be in [0, 1) (the fraction of channels to remove), got {ratio}")
    if head_ratio is not None and not 0 <= head_ratio < 1:
        raise UsageError(f"--head-ratio must be in [0, 1) (the fraction of attention heads to remove), got {head_ratio}")
    if criterion not in CRITERIA:
        raise UsageError(f"--criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if round_to < 1:
        raise UsageError(f"--round-to must be at least 1, got {round_to}")
    try:
        return re.compile(exclude) if exclude else None
    except re.error as exc:
        raise UsageError(f"--exclude {exclude!r} is not a valid regular expression: {exc}") from None


def prune_model(model: onnx.ModelProto, ratio: float, criterion: str = "l1", global_: bool = False,
                exclude: str | None = None, round_to: int = 1, prune_residual: bool = False,
                seed: int = 0, head_ratio: float | None = None) -> CompressResult:
    """Remove ``ratio`` of the output channels of every prunable group (or of all of them, with ``global_``),
    and ``head_ratio`` (default ``ratio``) of the heads of every attention block (whole heads, per block)."""
    pattern = check_prune_options(ratio, criterion, exclude, round_to, head_ratio)
    teacher = normalise(model)
    graph = GraphIndex(teacher)
    groups, notes = _prunable(find_groups(graph), pattern, prune_residual)
    rng = np.random.default_rng(seed)
    scores = []
    for group in groups:
        score, note = importance(graph, group, criterion, rng)
        scores.append(score)
        if note:
            notes.append(note)
    counts = _counts(groups, scores, ratio, ratio if head_ratio is None else head_ratio, global_, round_to)
    removals = slicing.Removals()
    for group, score, count in zip(groups, scores, counts):
        kept = kept_channels(score, count)
        removals.add(group, np.setdiff1d(np.arange(group.channels), kept))
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    slicing.apply(student, removals)
    _validate(student)
    entries = _map_entries(graph, student, removals)
    write_map(student, entries)
    return CompressResult(student, entries, notes, _layer_changes(graph, GraphIndex(student)),
                          len(model.graph.node) - len(teacher.graph.node))


def _counts(groups: list[Group], scores: list[np.ndarray], ratio: float, head_ratio: float, global_: bool,
            round_to: int) -> list[int]:
    """Channels each group keeps: heads per block at ``head_ratio`` (``round_to`` counts channels, not
    heads), the other groups at ``ratio``, per layer or under one global threshold."""
    channel_groups = [index for index, group in enumerate(groups) if not group.heads]
    chosen = [groups[i] for i in channel_groups]
    if global_:
        counts = global_counts(chosen, [scores[i] for i in channel_groups], ratio, round_to)
    else:
        counts = per_layer_counts(chosen, ratio, round_to)
    result = dict(zip(channel_groups, counts))
    for index, group in enumerate(groups):
        if group.heads:
            result[index] = per_layer_counts([group], head_ratio, 1)[0]
    return [result[index] for index in range(len(groups))]


def _prunable(groups: list[Group], pattern: re.Pattern | None, prune_residual: bool) -> tuple[list[Group], list[str]]:
    notes: list[str] = []
    prunable = []
    for group in groups:
        names = ", ".join(group.producers or [group.root])
        if group.refused:
            notes.append(f"{names}: not pruned, {group.refused}")
        elif pattern is not None and any(pattern.search(name) for name in group.producers):
            notes.append(f"{names}: excluded by --exclude")
        elif group.residual and not prune_residual:
            notes.append(f"{names}: coupled by a residual Add, kept; --prune-residual prunes them as one group")
        elif group.channels < 2:
            notes.append(f"{names}: a single output channel, kept")
        else:
            prunable.append(group)
    notes = list(dict.fromkeys(notes))
    if not prunable:
        reasons = "; ".join(notes) if notes else "the model has no Conv, Gemm or MatMul with constant weights"
        raise FskdError(f"no prunable layer: {reasons}")
    return prunable, notes


def _validate(student: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(student, full_check=True)
    except Exception as exc:  # checker and strict shape inference raise several types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FskdError(f"internal: the pruned model is not valid ({first})") from None


def _map_entries(teacher: GraphIndex, student: onnx.ModelProto, removals: slicing.Removals) -> list[MapEntry]:
    """Every student correction point → the teacher point of the same name, with the kept teacher channels."""
    teacher_points = find_points(teacher).by_name()
    s_graph = GraphIndex(student)
    entries = []
    for point in find_points(s_graph).points:
        t_point = teacher_points.get(point.name)
        if t_point is None:
            continue
        removed = removals.tensors.get(s_graph.node_by_name[point.name].output[0], set())
        kept = tuple(i for i in range(t_point.channels) if i not in removed)
        entries.append(MapEntry(teacher=point.name, student=point.name, kept=kept))
    return entries


def layer_shape(graph: GraphIndex, node: onnx.NodeProto) -> tuple[int, int] | None:
    """(input channels, output channels) of a Conv/Gemm/MatMul with a constant weight."""
    op = linear_op_for(node)
    weight = graph.constant(node.input[1]) if op is not None and len(node.input) > 1 else None
    if weight is None or weight.ndim < 2:
        return None
    major = op.to_output_major(node, weight)
    groups = int(attribute(node, "group", 1)) if node.op_type == "Conv" else 1
    return major.shape[1] * groups, major.shape[0]


def _layer_changes(teacher: GraphIndex, student: GraphIndex) -> list[LayerChange]:
    changes = []
    for node in teacher.nodes:
        before = layer_shape(teacher, node)
        if before is None or node.name not in student.node_by_name:
            continue
        after = layer_shape(student, student.node_by_name[node.name])
        changes.append(LayerChange(node.name, node.op_type, f"{before[0]}→{before[1]}",
                                   f"{after[0]}→{after[1]}", (node.name,)))
    return changes
