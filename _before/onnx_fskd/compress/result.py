"""What a compressor returns, and how its teacher→student map is stored in the student."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import onnx

from ..pairing import MAP_METADATA_KEY, MapEntry, map_document


@dataclass(frozen=True)
class LayerChange:
    """One teacher layer and what became of it: ``nodes`` are the student nodes that now compute it."""

    name: str
    op_type: str
    before: str   # e.g. "32→64" (input→output channels) or "rank 32"
    after: str
    nodes: tuple[str, ...]


@dataclass
class CompressResult:
    """The compressed student (map already in its metadata), the map itself, notes on every layer that
    was skipped or refused, with the reason, and how many nodes folding constant sub-graphs removed (the
    student is rebuilt from the folded copy)."""

    model: onnx.ModelProto
    entries: list[MapEntry]
    notes: list[str]
    layers: list[LayerChange] = field(default_factory=list)
    folded_nodes: int = 0


def write_map(model: onnx.ModelProto, entries: list[MapEntry]) -> None:
    """Store the map under pairing.MAP_METADATA_KEY, replacing a map an earlier compression left."""
    kept = [prop for prop in model.metadata_props if prop.key != MAP_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    prop = model.metadata_props.add()
    prop.key, prop.value = MAP_METADATA_KEY, json.dumps(map_document(entries))
