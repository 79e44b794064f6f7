"""dpo_loss against direct transcriptions of TRL's formulas, hand-worked numbers and gradcheck."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfrefine_dist.losses import LOSS_TYPES, dpo_loss, sequence_logps


def make_logps(batch=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logps = [-(torch.rand(batch, generator=gen, dtype=dtype) * 40 + 5) for _ in range(4)]
    lengths = [torch.randint(3, 30, (batch,), generator=gen) for _ in range(2)]
    return logps, lengths


def trl_transcription(pc, pr, rc, rr, beta, loss_type, ls):
    """TRL's DPOTrainer.dpo_loss (v0.x, which also has the label-smoothed sigmoid) verbatim in spirit."""
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    if loss_type == "robust":
        return (-F.logsigmoid(beta * logits) * (1 - ls) + F.logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    raise AssertionError(loss_type)


CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.0), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)]


@pytest.mark.parametrize("loss_type,label_smoothing", CASES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_trl_formula(loss_type, label_smoothing, beta):
    (pc, pr, rc, rr), (lc, lr) = make_logps()
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                   chosen_lengths=lc, rejected_lengths=lr, average_log_prob=False)
    expected = trl_transcription(pc, pr, rc, rr, beta, loss_type, label_smoothing)
    torch.testing.assert_close(out.losses, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, expected.mean())


def test_ipo_averages_by_length_by_default_like_trl():
    """TRL's IPO: h from per-token mean log-probs (chosen/|y_w| - rejected/|y_l|, ref likewise)."""
    (pc, pr, rc, rr), (lc, lr) = make_logps()
    beta = 0.1
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr)
    ipo_delta = (pc - rc) / lc - (pr - rr) / lr
    torch.testing.assert_close(out.losses, (ipo_delta - 1 / (2 * beta)) ** 2)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo")


def test_hand_worked_sigmoid():
    """policy chosen -10, rejected -12; reference -11 and -11; beta 0.5.

    h = (-10 + 11) - (-12 + 11) = 2, beta h = 1, loss = -log sigmoid(1) = log(1 + e^-1) = 0.313262.
    Rewards 0.5 and -0.5, margin 1, accuracy 1. d loss / d policy_chosen = -beta sigmoid(-1) = -0.134471.
    """
    pc = torch.tensor([-10.0], requires_grad=True)
    out = dpo_loss(pc, torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.5)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)
    assert out.losses.item() == pytest.approx(0.313262, abs=1e-6)
    out.loss.backward()
    assert pc.grad.item() == pytest.approx(-0.5 / (1 + math.e), abs=1e-6)
    assert out.metrics() == pytest.approx({
        "rewards/chosen": 0.5, "rewards/rejected": -0.5, "rewards/accuracies": 1.0, "rewards/margins": 1.0,
        "logps/chosen": -10.0, "logps/rejected": -12.0,
    })


def test_metrics_are_trl_batch_means():
    (pc, pr, rc, rr), _ = make_logps(batch=8)
    beta = 0.2
    metrics = dpo_loss(pc, pr, rc, rr, beta=beta).metrics()
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)
    assert metrics == pytest.approx({
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": pc.mean().item(),
        "logps/rejected": pr.mean().item(),
    })
    assert 0 < metrics["rewards/accuracies"] < 1  # the batch has both outcomes


@pytest.mark.parametrize("loss_type,label_smoothing", CASES)
def test_gradcheck_float64(loss_type, label_smoothing):
    (pc, pr, rc, rr), (lc, lr) = make_logps(batch=5, seed=3)
    if loss_type == "hinge":  # keep 1 - beta h away from the kink at 0
        rc = rc + 30.0
    pc.requires_grad_()
    pr.requires_grad_()

    def fn(chosen, rejected):
        return dpo_loss(chosen, rejected, rc, rr, beta=0.1, loss_type=loss_type, label_smoothing=label_smoothing,
                        chosen_lengths=lc, rejected_lengths=lr, rpo_alpha=0.5).losses

    assert torch.autograd.gradcheck(fn, (pc, pr))


def test_hinge_gradient_is_zero_past_the_margin():
    """relu(1 - beta h): pairs with beta h > 1 contribute nothing; others get -beta."""
    pc = torch.tensor([0.0, 0.0], requires_grad=True)
    out = dpo_loss(pc, torch.tensor([-30.0, -1.0]), torch.zeros(2), torch.zeros(2), beta=0.1, loss_type="hinge")
    out.losses.sum().backward()
    torch.testing.assert_close(out.losses, torch.tensor([0.0, 0.9]))
    torch.testing.assert_close(pc.grad, torch.tensor([0.0, -0.1]))


def test_reference_gets_no_gradient():
    (pc, pr, rc, rr), _ = make_logps()
    for tensor in (pc, pr, rc, rr):
        tensor.requires_grad_()
    dpo_loss(pc, pr, rc, rr).loss.backward()
    assert pc.grad is not None and pr.grad is not None
    assert rc.grad is None and rr.grad is None


def test_length_averaging():
    (pc, pr, rc, rr), (lc, lr) = make_logps()
    out = dpo_loss(pc, pr, rc, rr, beta=0.3, chosen_lengths=lc, rejected_lengths=lr, average_log_prob=True)
    expected = trl_transcription(pc / lc, pr / lr, rc / lc, rr / lr, 0.3, "sigmoid", 0.0)
    torch.testing.assert_close(out.losses, expected)
    torch.testing.assert_close(out.policy_chosen_logps, pc / lc)
    torch.testing.assert_close(out.chosen_rewards, 0.3 * (pc - rc) / lc)


def test_rpo_adds_trl_token_mean_nll():
    """RPO: + alpha * (-sum of chosen log-probs / number of chosen tokens), a batch scalar."""
    (pc, pr, rc, rr), (lc, lr) = make_logps()
    pc.requires_grad_()
    alpha = 0.7
    plain = dpo_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr)
    rpo = dpo_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, rpo_alpha=alpha)
    nll = -pc.sum() / lc.sum()
    torch.testing.assert_close(rpo.nll_loss, nll.detach())
    torch.testing.assert_close(rpo.losses, plain.losses + alpha * nll)
    assert rpo.metrics()["nll_loss"] == pytest.approx(nll.item())
    # The NLL pulls every chosen log-prob up by alpha / total chosen tokens (after the mean over pairs).
    rpo.loss.backward()
    pc_grad_rpo = pc.grad.clone()
    pc.grad = None
    plain.loss.backward()
    torch.testing.assert_close(pc_grad_rpo - pc.grad, torch.full_like(pc, -alpha / lc.sum().item()))


def test_sequence_logps_sum_and_mean():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.5, 0.0, 0.0], [-9.0, -9.0, -9.0, -9.0]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(sequence_logps(token_logps, mask), torch.tensor([-9.0, -1.0, 0.0]))
    torch.testing.assert_close(sequence_logps(token_logps, mask.bool(), average=True), torch.tensor([-3.0, -0.5, 0.0]))


def test_rejects_invalid_settings():
    (pc, pr, rc, rr), _ = make_logps()
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="kto")
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(pc, pr, rc, rr, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(pc, pr, rc, rr, rpo_alpha=1.0)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    assert set(LOSS_TYPES) == {"sigmoid", "robust", "hinge", "ipo"}
