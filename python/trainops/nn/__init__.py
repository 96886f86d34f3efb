"""Neural-network modules."""
from trainops.nn.load_balancing import LoadBalancingLoss, register_reset_hook, reset_load_balancing
from trainops.nn.moe import MoELayer
from trainops.nn.moe_metrics import domain_expert_counts, expert_selection_frequency, specialization_score
from trainops.nn.router import TopKRouter

__all__ = ["LoadBalancingLoss", "reset_load_balancing", "register_reset_hook", "TopKRouter", "MoELayer",
           "domain_expert_counts", "expert_selection_frequency", "specialization_score"]
