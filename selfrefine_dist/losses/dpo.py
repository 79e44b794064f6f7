"""The DPO loss family on sequence log-probabilities, with TRL's definitions and metric names.

Direct Preference Optimization (Rafailov et al., 2023, arXiv:2305.18290). For a pair
(prompt x, chosen y_w, rejected y_l), a policy pi and a frozen reference pi_ref:

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]

Per-pair losses, beta > 0, label smoothing eps:

    sigmoid  -(1 - eps) * log sigmoid(beta h) - eps * log sigmoid(-beta h)
             DPO eq. 7; eps > 0 is conservative DPO (cDPO, Mitchell 2023), as in TRL < 1.0.
             TRL 1.x's "sigmoid" is the eps = 0 case.
    robust   [-(1 - eps) * log sigmoid(beta h) + eps * log sigmoid(-beta h)] / (1 - 2 eps)
             robust DPO (Chowdhury et al., 2024, arXiv:2403.00409, eq. 9); eps in [0, 0.5).
    hinge    relu(1 - beta h)      SLiC (Zhao et al., 2023, arXiv:2305.10425).
    ipo      (h - 1 / (2 beta))^2  IPO (Azar et al., 2023, arXiv:2310.12036, eq. 17; beta is tau).
             TRL computes h from per-token averaged log-probs for IPO, so IPO averages by
             default (``average_log_prob=None``).

RPO (Pang et al., 2024, arXiv:2404.19733) adds ``rpo_alpha * nll`` with TRL's NLL: the mean
negative log-prob over all chosen response tokens of the batch,
``nll = -sum_i policy_chosen_logps[i] / sum_i chosen_lengths[i]`` (TRL 1.x writes this as
loss_type=["sigmoid", "sft"], loss_weights=[1, rpo_alpha]). It is a batch scalar, added to
every pair's loss, so ``losses.mean()`` equals TRL's total.

Rewards (TRL's metrics): ``chosen_rewards = beta * (pi_c - ref_c)``, likewise rejected,
detached; accuracy is ``chosen_rewards > rejected_rewards``.

All log-probs come in as [B] tensors: the policy's with gradient, the reference's as
precomputed tensors (once per round) or from a no-grad reference forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


@dataclass(frozen=True)
class DPOLossOutput:
    """What ``dpo_loss`` returns; every tensor is [B] (one entry per pair) unless noted.

    losses: per-pair loss (with gradient); ``loss`` is their mean.
    chosen_rewards, rejected_rewards: beta * (policy - reference) log-ratio, detached.
    policy_chosen_logps, policy_rejected_logps: the log-probs the loss used (length
        averaged when averaging), detached.
    nll_loss: [] the RPO NLL term (detached) or None without ``rpo_alpha``.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    policy_chosen_logps: torch.Tensor
    policy_rejected_logps: torch.Tensor
    nll_loss: torch.Tensor | None = None

    @property
    def loss(self) -> torch.Tensor:
        """[] the mean over pairs, the scalar to call backward on."""
        return self.losses.mean()

    def metrics(self) -> dict[str, float]:
        """Batch means under TRL's metric names."""
        out = {
            "rewards/chosen": self.chosen_rewards.mean().item(),
            "rewards/rejected": self.rejected_rewards.mean().item(),
            "rewards/accuracies": (self.chosen_rewards > self.rejected_rewards).float().mean().item(),
            "rewards/margins": (self.chosen_rewards - self.rejected_rewards).mean().item(),
            "logps/chosen": self.policy_chosen_logps.mean().item(),
            "logps/rejected": self.policy_rejected_logps.mean().item(),
        }
        if self.nll_loss is not None:
            out["nll_loss"] = self.nll_loss.item()
        return out


def sequence_logps(token_logps: torch.Tensor, response_mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean, when ``average``) of per-token log-probs over the response tokens.

    Args:
        token_logps: [B, T] per-token log-probs (e.g. from ``fused_linear_token_logprobs``).
        response_mask: [B, T] 1/True on response tokens, 0 on prompt and padding.
    Returns:
        [B] sequence log-probs; an empty response gives 0 (its mean divides by 1).
    """
    mask = response_mask.to(token_logps.dtype)
    summed = (token_logps * mask).sum(dim=-1)
    if not average:
        return summed
    return summed / mask.sum(dim=-1).clamp(min=1.0)


def _per_pair_loss(logits: torch.Tensor, beta: float, loss_type: str, label_smoothing: float) -> torch.Tensor:
    """The formula of each loss type on h = ``logits`` [B]."""
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * logits)
        flipped = -label_smoothing * F.logsigmoid(-beta * logits)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    average_log_prob: bool | None = None,
    rpo_alpha: float | None = None,
) -> DPOLossOutput:
    """DPO-family loss for B preference pairs from summed sequence log-probs.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] summed response log-probs under the
            policy (with gradient).
        ref_chosen_logps, ref_rejected_logps: [B] the same under the reference (no gradient
            is taken through them).
        beta: inverse temperature of the implicit reward (IPO's tau).
        loss_type: 'sigmoid', 'robust', 'hinge' or 'ipo' (formulas in the module docstring).
        label_smoothing: eps for 'sigmoid' (cDPO) and 'robust'; must be 0 for the others.
        chosen_lengths, rejected_lengths: [B] response token counts; needed to average by
            length and for ``rpo_alpha``.
        average_log_prob: divide every log-prob by its response length before the loss.
            None means TRL's choice: True for 'ipo', False otherwise.
        rpo_alpha: weight of the RPO NLL term on chosen responses; None disables it.
    Returns:
        DPOLossOutput with per-pair ``losses`` [B] and TRL's metrics.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"'robust' needs label_smoothing in [0, 0.5), got {label_smoothing}")
    if loss_type == "sigmoid" and not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"'sigmoid' needs label_smoothing in [0, 0.5], got {label_smoothing}")
    if loss_type in ("hinge", "ipo") and label_smoothing != 0.0:
        raise ValueError(f"label_smoothing has no meaning for {loss_type!r}; leave it 0")
    if average_log_prob is None:
        average_log_prob = loss_type == "ipo"
    if (average_log_prob or rpo_alpha is not None) and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError("averaging by length and rpo_alpha need chosen_lengths and rejected_lengths")

    # The NLL uses the summed log-probs: TRL's token mean over the whole batch.
    nll_loss = None
    if rpo_alpha is not None:
        nll_loss = -policy_chosen_logps.sum() / chosen_lengths.sum().clamp(min=1).to(policy_chosen_logps.dtype)

    if average_log_prob:
        chosen_denominator = chosen_lengths.clamp(min=1).to(policy_chosen_logps.dtype)
        rejected_denominator = rejected_lengths.clamp(min=1).to(policy_rejected_logps.dtype)
        policy_chosen_logps = policy_chosen_logps / chosen_denominator
        policy_rejected_logps = policy_rejected_logps / rejected_denominator
        ref_chosen_logps = ref_chosen_logps / chosen_denominator
        ref_rejected_logps = ref_rejected_logps / rejected_denominator

    # The reference is a constant: detach so a reference computed with grad enabled cannot leak one.
    chosen_logratios = policy_chosen_logps - ref_chosen_logps.detach()
    rejected_logratios = policy_rejected_logps - ref_rejected_logps.detach()
    losses = _per_pair_loss(chosen_logratios - rejected_logratios, beta, loss_type, label_smoothing)
    if nll_loss is not None:
        losses = losses + rpo_alpha * nll_loss

    return DPOLossOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
        policy_chosen_logps=policy_chosen_logps.detach(),
        policy_rejected_logps=policy_rejected_logps.detach(),
        nll_loss=None if nll_loss is None else nll_loss.detach(),
    )
