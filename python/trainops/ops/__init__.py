"""Functional API over ``torch.ops.trainops.*``: argument checks, dispatch, fake tensors, autograd."""
from trainops.ops.quantize import (
    QuantizedTensor,
    dequantize,
    dequantize_accumulate,
    quantize,
    quantize_error_feedback,
)
from trainops.ops.replay import replay_insert, replay_sample, replay_update_priorities

__all__ = ["QuantizedTensor", "quantize", "dequantize", "dequantize_accumulate", "quantize_error_feedback",
           "replay_sample", "replay_insert", "replay_update_priorities"]
