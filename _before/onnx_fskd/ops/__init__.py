"""Linear op kinds that can carry a correction Q. Adding a kind = one module registering a LinearOp."""

from .base import LinearOp, linear_op_for
from . import conv, gemm, matmul  # noqa: F401  (modules register themselves)

__all__ = ["LinearOp", "linear_op_for"]
