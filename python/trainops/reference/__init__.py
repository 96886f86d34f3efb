"""Plain-PyTorch references of every trainops op: the specification tests compare against."""
from trainops.reference import replay
from trainops.reference.quantize import dequantize, dequantize_accumulate, quantize, signed_values

__all__ = ["quantize", "dequantize", "dequantize_accumulate", "signed_values", "replay"]
