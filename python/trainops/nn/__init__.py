"""Neural-network modules."""
from trainops.nn.lora import LoRALinear
from trainops.nn.load_balancing import GlobalCountSync, LoadBalancingLoss, register_reset_hook, reset_load_balancing
from trainops.nn.moe import MoELayer
from trainops.nn.moe_metrics import domain_expert_counts, expert_selection_frequency, specialization_score
from trainops.nn.mora import (  # MoRA: rank-1 LoRA expert mixing
    MoRALinear,
    add_task,
    apply_mora,
    load_mora,
    load_mora_state_dict,
    mora_activation_stats,
    mora_config,
    mora_modules,
    mora_state_dict,
    save_mora,
    set_mora_stats,
)
from trainops.nn.router import TopKRouter

__all__ = [
    "LoadBalancingLoss", "GlobalCountSync", "reset_load_balancing", "register_reset_hook", "TopKRouter", "MoELayer",
    "domain_expert_counts", "expert_selection_frequency", "specialization_score",
    "LoRALinear", "MoRALinear", "apply_mora", "add_task", "mora_state_dict", "load_mora_state_dict", "mora_modules",
    "mora_activation_stats", "set_mora_stats", "mora_config", "save_mora", "load_mora",
]
