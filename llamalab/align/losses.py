"""Preference losses on summed answer log-probabilities: DPO (sigmoid) and IPO.

With ``pi_c, pi_r`` the policy's summed log-probs of the chosen and rejected answers and ``ref_c, ref_r`` the
reference's, the implicit rewards are ``r_c = beta * (pi_c - ref_c)`` and ``r_r = beta * (pi_r - ref_r)``, and
``h = (pi_c - ref_c) - (pi_r - ref_r)`` is the log-ratio margin:

- ``sigmoid`` (DPO, Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta * h)``; with label smoothing ``eps``
  (conservative DPO, as TRL): ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
- ``ipo`` (Azar et al. 2023, eq. 17, on summed log-probs as in the paper): ``(h - 1 / (2 beta))^2``.
  NOTE: TRL's ``ipo`` averages the log-probs over answer tokens instead; here the sum is used for both losses so
  ``beta`` means the same thing in the implicit rewards.

Per-pair values are returned unreduced; the DPO trainer sums them (the shared step averages over pairs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo")


@dataclass
class PreferenceTerms:
    losses: torch.Tensor  # (N,)
    chosen_rewards: torch.Tensor  # (N,) beta * (pi_c - ref_c), detached
    rejected_rewards: torch.Tensor  # (N,)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, loss: str = "sigmoid",
             label_smoothing: float = 0.0) -> PreferenceTerms:
    """Per-pair DPO or IPO loss and the implicit rewards (module docstring)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    return PreferenceTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """(N,) 1 where the chosen answer has the higher implicit reward, 0.5 on a tie (so an untrained policy, whose
    rewards are all 0, scores chance), 0 otherwise."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
