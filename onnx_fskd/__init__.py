"""onnx-fskd: few-sample knowledge distillation for compressed ONNX models.

``fit``, ``prune``, ``decompose``, ``evaluate`` and ``FitResult`` come from ``onnx_fskd.api``, loaded on
first use so that ``import onnx_fskd`` (and ``onnx-fskd --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import FskdError, UsageError

__version__ = "0.2.0"
__all__ = ["FitResult", "FskdError", "UsageError", "__version__", "decompose", "evaluate", "fit", "prune"]
_API = {"FitResult", "decompose", "evaluate", "fit", "prune"}

if TYPE_CHECKING:
    from .api import FitResult, decompose, evaluate, fit, prune


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
