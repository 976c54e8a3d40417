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
# onnxruntime comes from one of two extras (their builds clash when both are installed), so a bare
# `pip install onnx-fskd` has none: say which to add instead of a ModuleNotFoundError.
NO_ONNXRUNTIME = ('no ONNX Runtime found: install one build, pip install "onnx-fskd[cpu]" '
                  '(or "onnx-fskd[gpu]" for CUDA, see README)')

if TYPE_CHECKING:
    from .api import FitResult, decompose, evaluate, fit, prune


def __getattr__(name: str):
    if name in _API:
        try:
            api = importlib.import_module(".api", __name__)
        except ModuleNotFoundError as exc:
            if exc.name == "onnxruntime":
                raise FskdError(NO_ONNXRUNTIME) from None
            raise
        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
