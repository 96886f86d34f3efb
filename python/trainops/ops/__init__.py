"""Functional API over ``torch.ops.trainops.*``: argument checks, dispatch, fake tensors, autograd."""
from trainops.ops import _schemas  # noqa: F401  (first: the modules below register kernels for its ops)
from trainops.ops.mora import mora, mora_routing
from trainops.ops.quantize import (
    QuantizedTensor,
    dequantize,
    dequantize_accumulate,
    quantize,
    quantize_error_feedback,
)
from trainops.ops.replay import replay_insert, replay_sample, replay_update_priorities
from trainops.ops.router import router_topk

__all__ = [
    "QuantizedTensor", "quantize", "dequantize", "dequantize_accumulate", "quantize_error_feedback",
    "mora", "mora_routing", "router_topk", "replay_sample", "replay_insert", "replay_update_priorities",
]
