"""Functional API over ``torch.ops.trainops.*``: argument checks, dispatch, fake tensors, autograd."""
from trainops.ops.quantize import (
    QuantizedTensor,
    dequantize,
    dequantize_accumulate,
    quantize,
    quantize_error_feedback,
)
from trainops.ops.mora import mora, mora_routing  # noqa: E402  (MoRA: rank-1 LoRA expert mixing)

__all__ = ["QuantizedTensor", "quantize", "dequantize", "dequantize_accumulate", "quantize_error_feedback",
           "mora", "mora_routing"]
