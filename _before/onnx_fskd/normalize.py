"""Normalise a loaded model for the analysis: every node named, constant sub-graphs (Constant nodes,
Identity of weights, static Shape→Reshape arithmetic) folded into initializers.

The folded copy is for *reading* only (finding points, their weights and chains). The merge writes into
``Normalised.original`` — the model as loaded, nodes only named — so the written student keeps its own
graph: fuse.ModelWriter maps each folded tensor back to the initializer or Constant that holds it.

BatchNorm is deliberately NOT folded into the weights here: points.py treats op+BN as one linear map
and fuse.py merges through it, so the written student keeps its BN nodes."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)

_FOLDABLE = {"Constant", "Identity", "Shape", "ConstantOfShape"}


@dataclass(frozen=True, eq=False)
class Normalised:
    """The model as loaded with every node named (``original``), its folded copy for the analysis
    (``folded``), and the names this changed (``renamed``: position → the name it had, None for none)."""

    original: onnx.ModelProto
    folded: onnx.ModelProto
    renamed: dict[int, str | None]

    def restore_names(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Give back the names this module changed, on a model with ``original``'s node list (the written one)."""
        for position, name in self.renamed.items():
            if name is None:
                model.graph.node[position].ClearField("name")
            else:
                model.graph.node[position].name = name
        return model


def normalise(model: onnx.ModelProto) -> onnx.ModelProto:
    """The folded, fully named copy the analysis reads (models without constant sub-graphs come back
    node-for-node unchanged). Use ``normalise_for_merge`` where the result is written back."""
    return normalise_for_merge(model).folded


def normalise_for_merge(model: onnx.ModelProto) -> Normalised:
    named = _copy(model)
    renamed = _name_nodes(named)
    folded = _fold_constants(_copy(named)) if any(n.op_type in _FOLDABLE for n in named.graph.node) else _copy(named)
    return Normalised(named, folded, renamed)


def _name_nodes(model: onnx.ModelProto) -> dict[int, str | None]:
    """Name unnamed nodes: the analysis finds nodes by name (onnxruntime already refuses repeated names)."""
    used = {node.name for node in model.graph.node if node.name}
    renamed: dict[int, str | None] = {}
    for index, node in enumerate(model.graph.node):
        if node.name:
            continue
        name = f"{node.op_type}_{index}"
        while name in used:
            name += "_"
        renamed[index] = "" if node.HasField("name") else None
        node.name = name
        used.add(name)
    return renamed


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx-graphsurgeon's folding (it evaluates with onnxruntime) keeps names and order of the nodes it
    leaves, and the names of the tensors it turns into initializers."""
    graph = gs.import_onnx(model)  # it renames tensors inside the proto it reads: give it a copy
    graph.fold_constants().cleanup()
    folded = gs.export_onnx(graph)
    folded.ir_version = model.ir_version
    del folded.opset_import[:]
    folded.opset_import.extend(model.opset_import)
    del folded.metadata_props[:]
    folded.metadata_props.extend(model.metadata_props)
    folded.producer_name, folded.producer_version = model.producer_name, model.producer_version
    log.info("folded constant sub-graphs for the analysis: %d → %d nodes", len(model.graph.node),
             len(folded.graph.node))
    return folded
