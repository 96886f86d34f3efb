"""GRPO pieces of ``trainops rl``: sampled rollouts, verified rewards, group advantages, the clipped loss.

Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300): for
each prompt q, a group of K completions o_1..o_K with rewards r_1..r_K; each completion's
advantage is its reward standardized within its group,

    A_i = (r_i - mean(r)) / (std(r) + eps)        (std over the group, population form)

and the policy loss is the PPO-clipped surrogate averaged over each completion's tokens and
then over completions,

    L = -1/K sum_i 1/|o_i| sum_t min(rho_it A_i, clip(rho_it, 1 - e, 1 + e) A_i),
    rho_it = pi(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t).

With one update per batch of rollouts (the default of GRPO implementations, TRL's included)
pi_old is the current policy, rho = 1 and the clip is inactive: the gradient is the plain
policy gradient of the standardized rewards. No KL term (beta = 0, TRL's default).

RLEP (Zhang et al. 2025, arXiv 2507.07451) extends each group with M replayed verified
successes of the same prompt: K = G + M, and the replayed items enter both the group
statistics and the loss exactly like the fresh ones. Missing replayed items (a prompt with
fewer than M stored) are masked out of both (``valid``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sample_rollouts", "exact_match_rewards", "group_advantages", "answer_logprobs", "grpo_loss"]


@torch.no_grad()
def sample_rollouts(model, tokens: torch.Tensor, mask: torch.Tensor, temperature: float,
                    gen: torch.Generator) -> torch.Tensor:
    """The answer bytes of ``tokens`` [N, S] replaced by bytes sampled from the model,
    one position at a time, from ``softmax(logits / temperature)`` (``mask`` marks the
    logits that predict answer bytes, as in :mod:`trainops.runtime.domains`). ``gen`` is a
    CPU generator: the draws are a pure function of its seed on every device."""
    out = torch.where(mask.roll(1, 1).bool(), torch.zeros_like(tokens), tokens)
    for i in mask.any(0).nonzero().flatten().tolist():
        logits = model(out[:, :i + 1])[0][:, i].float() / temperature
        probs = torch.softmax(logits, -1).cpu()
        pick = torch.multinomial(probs, 1, generator=gen).view(-1).to(tokens.device)
        out[:, i + 1] = torch.where(mask[:, i].bool(), pick, out[:, i + 1])
    return out


def exact_match_rewards(rollouts: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1.0 where every answer byte of a rollout equals the target's, else 0.0 ([N] float32)."""
    answer = mask.roll(1, 1).bool()
    return ((rollouts == targets) | ~answer).all(1).float()


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``(r - mean) / (std + eps)`` within each group (row) of ``rewards`` [P, K] over the
    items where ``valid`` [P, K] is True (population std); 0 where not valid."""
    w = valid.to(rewards.dtype)
    n = w.sum(1, keepdim=True).clamp_min(1)
    mean = (rewards * w).sum(1, keepdim=True) / n
    var = (((rewards - mean) ** 2) * w).sum(1, keepdim=True) / n
    return torch.where(valid, (rewards - mean) / (var.sqrt() + eps), torch.zeros_like(rewards))


def answer_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(token[b, i + 1] | tokens[b, :i + 1]) under ``softmax(logits / temperature)``, [B, S]."""
    logp = F.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, tokens.roll(-1, 1).unsqueeze(-1)).squeeze(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
              valid: torch.Tensor, clip_eps: float) -> torch.Tensor:
    """The clipped surrogate above for completions [B] (flattened groups): ``logp`` /
    ``old_logp`` [B, S] per position, ``mask`` [B, S] the answer positions, ``advantages``
    and ``valid`` [B]; the mean runs over the valid completions."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    m = mask.to(surrogate.dtype)
    per_completion = (surrogate * m).sum(1) / m.sum(1).clamp_min(1)
    v = valid.to(surrogate.dtype)
    return -(per_completion * v).sum() / v.sum().clamp_min(1)
