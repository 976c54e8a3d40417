"""Normalise a loaded model so points can be found: every node named, constant sub-graphs
(Constant nodes, Identity of weights, static Shape→Reshape arithmetic) folded into initializers.

BatchNorm is deliberately NOT folded into the weights here: points.py treats op+BN as one linear map
and fuse.py merges through it, so the written student keeps its BN nodes and its exact graph."""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs

log = logging.getLogger(__name__)

_FOLDABLE = {"Constant", "Identity", "Shape", "ConstantOfShape"}


def normalise(model: onnx.ModelProto) -> onnx.ModelProto:
    """A normalised copy; models without constant sub-graphs come back node-for-node unchanged."""
    if any(node.op_type in _FOLDABLE for node in model.graph.node):
        model = _fold_constants(model)
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    used = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)
    return model


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx-graphsurgeon's folding (it evaluates with onnxruntime) keeps names and order of the nodes it leaves."""
    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup()
    folded = gs.export_onnx(graph)
    folded.ir_version = model.ir_version
    del folded.opset_import[:]
    folded.opset_import.extend(model.opset_import)
    del folded.metadata_props[:]
    folded.metadata_props.extend(model.metadata_props)
    folded.producer_name, folded.producer_version = model.producer_name, model.producer_version
    log.info("folded constant sub-graphs: %d → %d nodes", len(model.graph.node), len(folded.graph.node))
    return folded
