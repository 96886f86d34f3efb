"""Neural-network modules."""
from trainops.nn.mora import (  # MoRA: rank-1 LoRA expert mixing
    MoRALinear,
    add_task,
    apply_mora,
    load_mora_state_dict,
    mora_activation_stats,
    mora_modules,
    mora_state_dict,
    set_mora_stats,
)

__all__ = ["MoRALinear", "apply_mora", "add_task", "mora_state_dict", "load_mora_state_dict", "mora_modules",
           "mora_activation_stats", "set_mora_stats"]
