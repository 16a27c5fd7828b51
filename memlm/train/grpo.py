"""GRPO's arithmetic: group-normalised advantages and the clipped, KL-regularised policy loss.

Group Relative Policy Optimisation (DeepSeekMath) samples a group of G answers per problem, scores
each with the task's own scorer, and uses the reward standardised within its group as every token's
advantage: no value model. The loss per token t of answer i is PPO's clipped surrogate

    min(rho * A_i, clip(rho, 1 - eps, 1 + eps) * A_i) - beta * KL_t,   rho = pi(t) / pi_old(t)

with KL_t the unbiased, always non-negative estimator exp(r) - r - 1, r = log pi_ref(t) - log pi(t),
against a frozen reference policy; averaged over each answer's tokens, then over the answers.

Here it is plain tensor arithmetic over flat per-token log-probabilities (answers one after
another, `lengths` tokens each), so it is tested on hand-made groups; which model produced the
log-probabilities is the trainer's business (train/weaver_grpo.py).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: list[float], eps: float = 1e-6) -> list[float]:
    """(reward - group mean) / (group std + eps); all zeros when the group's rewards are equal (no
    signal: a group that is all right or all wrong teaches nothing). The std is the population one."""
    n = len(rewards)
    mean = sum(rewards) / n
    std = (sum((r - mean) ** 2 for r in rewards) / n) ** 0.5
    if std == 0.0:
        return [0.0] * n
    return [(r - mean) / (std + eps) for r in rewards]


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    lengths: list[int],
    clip: float = 0.2,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss to minimise, and its parts.

    `logp` [N]: log pi of each sampled token under the policy being trained (with its graph);
    `old_logp` [N]: the same under the policy that sampled them (no graph; equal to `logp` on the
    first update of a batch, so the ratio is 1 and only its gradient matters); `ref_logp` [N] or
    None: the reference policy's, for the KL term (None or beta 0: no KL); `advantages` [B]: one
    per answer; `lengths`: each answer's number of tokens (sum = N). -> (loss, {"surrogate", "kl",
    "clipped": share of tokens whose clipped term was the minimum, so they got no gradient}).
    """
    if sum(lengths) != logp.shape[0]:
        raise ValueError(f"lengths sum to {sum(lengths)} but there are {logp.shape[0]} log-probabilities")
    per_token_adv = torch.repeat_interleave(advantages.to(logp.dtype), torch.tensor(lengths, device=logp.device))
    ratio = torch.exp(logp - old_logp)
    bounded = torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    surrogate = torch.minimum(ratio * per_token_adv, bounded * per_token_adv)
    objective = surrogate
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0.0:
        log_ratio = ref_logp - logp
        kl = torch.exp(log_ratio) - log_ratio - 1.0
        objective = surrogate - beta * kl
    per_answer = torch.stack([part.mean() for part in torch.split(objective, lengths) if part.numel()])
    loss = -per_answer.mean()
    clipped = bounded * per_token_adv < ratio * per_token_adv  # the clipped term won: no gradient there
    stats = {
        "surrogate": float(surrogate.detach().mean()),
        "kl": float(kl.detach().mean()),
        "clipped": float(clipped.float().mean()),
    }
    return loss, stats
