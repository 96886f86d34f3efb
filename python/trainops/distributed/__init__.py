"""Communication-efficient distributed training over torch.distributed."""
from trainops.distributed.launch import init_from_env, spawn

__all__ = ["spawn", "init_from_env"]
