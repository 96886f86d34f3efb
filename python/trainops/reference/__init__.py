"""Plain-PyTorch references of every trainops op: the specification tests compare against."""
from trainops.reference.quantize import dequantize, dequantize_accumulate, quantize, signed_values

from trainops.reference.mora import mora  # noqa: E402

__all__ = ["quantize", "dequantize", "dequantize_accumulate", "signed_values", "mora"]
