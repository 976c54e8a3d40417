"""onnx-fskd: few-sample knowledge distillation for compressed ONNX models."""

__version__ = "0.1.0"
