"""Plain-PyTorch references of every trainops op: the specification tests compare against."""
from trainops.reference import replay
from trainops.reference.all_reduce import quantized_all_reduce, two_stage_quantized_all_reduce
from trainops.reference.mora import mora
from trainops.reference.quantize import dequantize, dequantize_accumulate, quantize, signed_values
from trainops.reference.router import lbl_from_stats, load_balancing_loss, router_topk, sequence_load_balancing_loss

__all__ = [
    "quantize", "dequantize", "dequantize_accumulate", "signed_values", "quantized_all_reduce",
    "two_stage_quantized_all_reduce", "mora",
    "router_topk", "lbl_from_stats", "load_balancing_loss", "sequence_load_balancing_loss", "replay",
]
