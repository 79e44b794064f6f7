"""DPOStepMetrics: the learners' typed step record, written with TRL's metric names and read back."""
import dataclasses

import pytest

from selfrefine_dist.refine.records import DPOStepMetrics

STEP = DPOStepMetrics(round=2, loss=0.61, rewards_chosen=0.1, rewards_rejected=-0.2, rewards_accuracies=0.75,
                      rewards_margins=0.3, logps_chosen=-20.0, logps_rejected=-31.5, lr=1e-6, grad_norm=0.9,
                      step_s=3.0, tokens_per_s=400.0, step_cpu_s=5.5, peak_rss_gib=2.5, reference_s=7.0,
                      reference_peak_rss_gib=2.0, shared_prompt=True)


def test_the_row_uses_trls_names_and_reads_back_equal():
    row = STEP.as_dict()
    assert row["rewards/margins"] == 0.3 and row["logps/chosen"] == -20.0 and row["shared_prompt"] == 1.0
    assert "rewards_margins" not in row and "nll_loss" not in row  # no RPO term in this step
    assert DPOStepMetrics.from_dict(row) == STEP
    with_nll = dataclasses.replace(STEP, nll_loss=1.25)
    assert with_nll.as_dict()["nll_loss"] == 1.25 and DPOStepMetrics.from_dict(with_nll.as_dict()) == with_nll


def test_a_row_missing_a_field_is_refused():
    row = STEP.as_dict()
    del row["grad_norm"]
    with pytest.raises(TypeError, match="grad_norm"):
        DPOStepMetrics.from_dict(row)


def test_a_row_written_before_the_memory_fields_reads_back_with_their_defaults():
    row = {k: v for k, v in STEP.as_dict().items() if k not in ("step_cpu_s", "peak_rss_gib", "reference_peak_rss_gib")}
    old = DPOStepMetrics.from_dict(row)
    assert old.loss == STEP.loss and old.peak_rss_gib != old.peak_rss_gib  # NaN: not measured then
