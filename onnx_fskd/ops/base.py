"""What the pipeline needs to know about a linear op to fit and merge a Q after it."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import onnx

from ..graph import GraphIndex

_REGISTRY: dict[str, "LinearOp"] = {}


class LinearOp(ABC):
    """One op type. Weights are exchanged in output-major form (C_out, C_in, *kernel) so that
    Q acts on axis 0 for every kind; each kind converts to and from its own layout."""

    op_type: str
    channel_axis: int  # axis of the output tensor that holds the channels Q mixes

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.op_type] = cls()

    @abstractmethod
    def weight_name(self, node: onnx.NodeProto, graph: GraphIndex) -> str | None:
        """The initializer holding the weight, or None when the weight is computed at run time."""

    @abstractmethod
    def unsupported_reason(self, node: onnx.NodeProto, graph: GraphIndex) -> str | None:
        """Why this node cannot take a Q (attributes, layouts), or None when it can."""

    @abstractmethod
    def to_output_major(self, node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
        """Weight in (C_out, C_in, *kernel) form."""

    @abstractmethod
    def from_output_major(self, node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
        """Inverse of to_output_major."""

    def groups(self, node: onnx.NodeProto) -> int:
        """Output-channel groups: Q must be block-diagonal with this many blocks."""
        return 1

    def bias_slot(self, node: onnx.NodeProto) -> int | None:
        """Input index of the op's own bias (existing or to add), or None when the op has none."""
        return None

    def bias_scale(self, node: onnx.NodeProto) -> float:
        """The factor the op applies to its bias input (Gemm's beta)."""
        return 1.0

    @abstractmethod
    def explicit_q(self, name: str, source: str, target: str, q: np.ndarray, d: np.ndarray,
                   rank: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """Nodes computing target = Q·source + d explicitly, to check that a merge is exact."""


def linear_op_for(node: onnx.NodeProto) -> LinearOp | None:
    return _REGISTRY.get(node.op_type) if node.domain in ("", "ai.onnx") else None


def attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def explicit_pads(node: onnx.NodeProto) -> bool:
    """Whether a conv's padding is its ``pads`` attribute (auto_pad NOTSET or VALID), not derived from the
    input size at run time (SAME_UPPER/SAME_LOWER): only then do its output positions follow from its strides."""
    return attribute(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID")
