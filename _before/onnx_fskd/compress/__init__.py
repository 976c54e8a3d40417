"""Compressors that make a student from a teacher ONNX model and write the map ``fit`` reads:
structured channel pruning (``prune_model``) and low-rank decomposition (``decompose_model``)."""

from .decompose import decompose_model
from .prune import prune_model
from .result import CompressResult, LayerChange

__all__ = ["CompressResult", "LayerChange", "decompose_model", "prune_model"]
