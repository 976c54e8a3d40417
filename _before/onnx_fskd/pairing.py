"""Pair teacher and student correction points and find which teacher channels each student kept.

Sources, in order: a map (--map file, or the metadata our compressor writes), identical node names,
then topology order. Kept channels come from the map, else from matching the student's weight rows
against the teacher's (inputs restricted by the producer's map, so layers pruned on both axes work),
else from activation correlation during the fit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from scipy.optimize import linear_sum_assignment

from .errors import FskdError
from .graph import GraphIndex
from .points import CorrectionPoint

MAP_METADATA_KEY = "onnx_fskd.map"
MAP_FORMAT = "onnx-fskd-map"

# Ops whose output channel c depends only on input channel c (so channel maps pass straight through).
CHANNEL_PRESERVING = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip",
    "Gelu", "Softplus", "Mish", "Swish", "Identity", "Dropout", "BatchNormalization", "MaxPool",
    "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize", "Upsample", "Pad",
    "InstanceNormalization", "Add", "Sub", "Mul", "Div", "Cast",
}
# Elementwise functions of one tensor (GELU as exported is Div → Erf → Add → Mul → Mul).
ELEMENTWISE_UNARY = {"Erf", "Exp", "Log", "Sqrt", "Abs", "Neg", "Reciprocal", "Softsign", "Celu", "ThresholdedRelu",
                     "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Not", "IsNaN", "IsInf"}
# What the channel mapper follows back: the kept indices survive these (a Transpose only moves the axis).
_MAPPED_THROUGH = CHANNEL_PRESERVING | ELEMENTWISE_UNARY | {"Transpose", "Pow", "Max", "Min"}


@dataclass(frozen=True, eq=False)
class PointPair:
    """A student point and its teacher counterpart; ``kept[i]`` is the teacher channel of student
    channel i (None: not known yet, resolved from weights or activations)."""

    teacher: CorrectionPoint
    student: CorrectionPoint
    source: str
    kept: np.ndarray | None = None


@dataclass(frozen=True)
class MapEntry:
    teacher: str
    student: str
    kept: tuple[int, ...] | None


def read_map(path: str | Path | None, student: onnx.ModelProto) -> tuple[list[MapEntry], str] | None:
    """The --map file if given, else our compressor's map in the student's metadata, else None."""
    if path is not None:
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise FskdError(f"cannot read --map {path}: {exc}") from None
        return parse_map(document, str(path)), "map"
    for prop in student.metadata_props:
        if prop.key == MAP_METADATA_KEY:
            source = f"the student's {MAP_METADATA_KEY} metadata"
            try:
                document = json.loads(prop.value)
            except ValueError as exc:
                raise FskdError(f"{source} is not valid JSON ({exc}); fix it, or pass --map MAP.json, "
                                f"which takes precedence") from None
            return parse_map(document, source), "metadata"
    return None


def parse_map(document: dict, source: str) -> list[MapEntry]:
    """The map's entries; FskdError for anything but the documented schema (see README)."""
    if not isinstance(document, dict) or not isinstance(document.get("points"), list):
        raise FskdError(f"{source}: a map is a JSON object with a 'points' list (see README, 'The channel map')")
    if document.get("format", MAP_FORMAT) != MAP_FORMAT or document.get("version", 1) != 1:
        raise FskdError(f"{source}: unknown map format {document.get('format')!r} version {document.get('version')!r}; "
                        f"expected {MAP_FORMAT!r} version 1")
    entries = []
    for index, item in enumerate(document["points"]):
        if not (isinstance(item, dict) and isinstance(item.get("teacher"), str) and isinstance(item.get("student"), str)):
            raise FskdError(f"{source}: point {index} needs 'teacher' and 'student' node names (strings)")
        kept = item.get("kept")
        if kept is not None and not (isinstance(kept, list)
                                     and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in kept)
                                     and len(set(kept)) == len(kept) and kept):
            raise FskdError(f"{source}: 'kept' of point {item['student']!r} must be null or a non-empty list of "
                            f"distinct non-negative integers (teacher channel indices), got {kept!r}")
        entries.append(MapEntry(item["teacher"], item["student"], None if kept is None else tuple(kept)))
    return entries


def _check_entry(entry: MapEntry, teacher: CorrectionPoint, student: CorrectionPoint, source: str) -> None:
    """A map may pair only ops of one kind and output rank, with kept channels in the teacher's range."""
    where = f"{source}: point {entry.student!r} ← {entry.teacher!r}"
    if (teacher.op_type, teacher.rank) != (student.op_type, student.rank):
        raise FskdError(f"{where} pairs a {student.op_type} (rank-{student.rank} output) with a {teacher.op_type} "
                        f"(rank {teacher.rank}); a map pairs ops of the same kind")
    if entry.kept is None and student.channels != teacher.channels:
        raise FskdError(f"{where}: 'kept' is null (same channels) but the student has {student.channels} channels "
                        f"and the teacher {teacher.channels}; list the teacher channels the student kept")
    if entry.kept is not None and (len(entry.kept) != student.channels or max(entry.kept) >= teacher.channels):
        raise FskdError(f"{where}: 'kept' lists {len(entry.kept)} channels up to {max(entry.kept)}, but the student "
                        f"has {student.channels} channels and the teacher {teacher.channels}")


def map_document(entries: list[MapEntry]) -> dict:
    """The JSON form of a map, as written into metadata by the compressor."""
    return {"format": MAP_FORMAT, "version": 1,
            "points": [{"teacher": e.teacher, "student": e.student, "kept": None if e.kept is None else list(e.kept)}
                       for e in entries]}


def pair_points(teacher: list[CorrectionPoint], student: list[CorrectionPoint],
                mapping: tuple[list[MapEntry], str] | None) -> list[PointPair]:
    """Student points with their teacher counterparts, in student order; unpaired students are left out."""
    teacher_by_name = {p.name: p for p in teacher}
    student_by_name = {p.name: p for p in student}
    if mapping is not None:
        entries, source = mapping
        pairs = []
        for entry in entries:
            if entry.teacher not in teacher_by_name:
                raise FskdError(f"{source}: teacher node {entry.teacher!r} is not a correction point of the teacher")
            if entry.student not in student_by_name:
                raise FskdError(f"{source}: student node {entry.student!r} is not a correction point of the student")
            _check_entry(entry, teacher_by_name[entry.teacher], student_by_name[entry.student], source)
            kept = None if entry.kept is None else np.asarray(entry.kept, dtype=np.int64)
            pairs.append(PointPair(teacher_by_name[entry.teacher], student_by_name[entry.student], source, kept))
        order = {p.name: i for i, p in enumerate(student)}
        return sorted(pairs, key=lambda pair: order[pair.student.name])
    by_name = [PointPair(teacher_by_name[p.name], p, "names") for p in student
               if p.name in teacher_by_name and teacher_by_name[p.name].op_type == p.op_type]
    if len(by_name) == len(student):
        return by_name
    if len(teacher) == len(student) and all(t.op_type == s.op_type for t, s in zip(teacher, student)):
        return [PointPair(t, s, "topology") for t, s in zip(teacher, student)]
    if by_name and len(by_name) * 2 >= len(student):
        return by_name
    raise FskdError(f"cannot pair points: the student has {len(student)} and the teacher {len(teacher)} "
                    f"(names match for {len(by_name)}); pass --map MAP.json")


class ChannelMapper:
    """Resolves kept channels point by point, in fit order, so that each point's input map is known."""

    def __init__(self, teacher: GraphIndex, student: GraphIndex):
        self.teacher = teacher
        self.student = student
        self.by_output: dict[str, PointPair] = {}

    def record(self, pair: PointPair) -> None:
        self.by_output[pair.student.output] = pair

    def from_weights(self, pair: PointPair) -> np.ndarray | None:
        """Kept channels by exact weight-row matching; None when the rows do not match exactly."""
        if pair.kept is not None:
            return pair.kept
        s, t = pair.student, pair.teacher
        if s.channels == t.channels and s.groups == t.groups:
            return np.arange(s.channels)
        try:
            in_kept, _ = self.channel_map(s.input)
        except _Unfollowable:
            in_kept = None
        if s.groups > 1 and s.groups == s.channels and in_kept is not None:
            return in_kept  # depthwise: output channel c reads input channel c only
        w_s = self._major(self.student, s)
        w_t = self._major(self.teacher, t)
        if s.groups == 1 and in_kept is not None and w_t.shape[1] > w_s.shape[1] and in_kept.max() < w_t.shape[1]:
            w_t = w_t[:, in_kept]
        if w_t.shape[1:] != w_s.shape[1:]:
            return None
        return _match_rows(w_s.reshape(len(w_s), -1), w_t.reshape(len(w_t), -1))

    def channel_map(self, tensor: str) -> tuple[np.ndarray | None, int | None]:
        """(teacher channel of each student channel or None for identity, teacher channel count)."""
        if tensor in self.by_output:
            pair = self.by_output[tensor]
            return pair.kept, pair.teacher.channels
        if tensor in self.student.graph_inputs:
            return None, None
        node = self.student.producer.get(tensor)
        if node is None:
            raise _Unfollowable(tensor)
        data = [i for i in node.input if i and not self.student.is_constant(i)]
        if node.op_type in _MAPPED_THROUGH and data:
            return self.channel_map(data[0])
        if node.op_type == "Flatten" and data:
            kept, teacher_channels = self.channel_map(data[0])
            shape = self.student.shapes.get(data[0])
            if kept is None or shape is None or None in shape[2:]:
                if kept is None:
                    return None, None
                raise _Unfollowable(tensor)
            spatial = int(np.prod(shape[2:]))
            return (kept[:, None] * spatial + np.arange(spatial)).reshape(-1), teacher_channels * spatial
        if node.op_type == "Concat":
            parts, offset = [], 0
            for name in data:
                kept, teacher_channels = self.channel_map(name)
                channels = self.student.shapes.get(name, (None, None))[1]
                if kept is None:
                    if channels is None:
                        raise _Unfollowable(tensor)
                    kept, teacher_channels = np.arange(channels), channels
                parts.append(kept + offset)
                offset += teacher_channels
            return np.concatenate(parts), offset
        raise _Unfollowable(tensor)

    @staticmethod
    def _major(graph: GraphIndex, point: CorrectionPoint) -> np.ndarray:
        node = graph.node_by_name[point.name]
        return point.op.to_output_major(node, graph.constant(point.weight)).astype(np.float64)


class _Unfollowable(Exception):
    """A tensor whose channel correspondence the mapper cannot trace."""


def _match_rows(student_rows: np.ndarray, teacher_rows: np.ndarray) -> np.ndarray | None:
    """Index of the teacher row equal to each student row (to float tolerance), or None."""
    norms_s = np.sum(student_rows**2, axis=1)
    norms_t = np.sum(teacher_rows**2, axis=1)
    dist = norms_s[:, None] + norms_t[None, :] - 2.0 * student_rows @ teacher_rows.T
    tolerance = 1e-8 * (norms_s[:, None] + norms_t[None, :]) + 1e-20
    matches = dist <= tolerance
    if not matches.any(axis=1).all():
        return None
    kept = np.empty(len(student_rows), dtype=np.int64)
    used: set[int] = set()
    for i, row in enumerate(matches):
        free = [j for j in np.flatnonzero(row) if j not in used]
        if not free:
            return None
        kept[i] = free[0]
        used.add(free[0])
    return kept


def match_activations(student_rows: np.ndarray, teacher_rows: np.ndarray) -> tuple[np.ndarray, float]:
    """Assign each student channel to the teacher channel it correlates with best (one-to-one).

    Used when weights do not match exactly (a student that was fine-tuned or folded differently)."""
    s = student_rows - student_rows.mean(axis=0)
    t = teacher_rows - teacher_rows.mean(axis=0)
    s /= np.linalg.norm(s, axis=0) + 1e-12
    t /= np.linalg.norm(t, axis=0) + 1e-12
    corr = s.T @ t
    rows, cols = linear_sum_assignment(-corr)
    kept = cols[np.argsort(rows)]
    return kept.astype(np.int64), float(corr[np.arange(len(kept)), kept].mean())
