"""Communication-efficient distributed training over torch.distributed.

``quantized_all_reduce`` (two-shot, blockwise-quantized, bit-identical on every rank),
``QuantizedCommState`` + ``quantized_comm_hook`` for DDP, ``DiLoCo`` (streaming), and
``spawn`` to run N local gloo workers (``WorkerError`` names the rank when one fails).
"""
from trainops.distributed.all_reduce import DEFAULT_MIN_NUMEL, owner_chunk_numel, quantized_all_reduce
from trainops.distributed.async_work import AsyncWork
from trainops.distributed.ddp_hook import QuantizedCommState, quantized_comm_hook
from trainops.distributed.diloco import DiLoCo
from trainops.distributed.launch import WorkerError, init_from_env, spawn
from trainops.distributed.stats import CommStats, comm_stats

__all__ = ["spawn", "init_from_env", "WorkerError", "quantized_all_reduce", "owner_chunk_numel", "DEFAULT_MIN_NUMEL",
           "AsyncWork",
           "CommStats", "comm_stats", "QuantizedCommState", "quantized_comm_hook", "DiLoCo"]
