"""Losses on sequence log-probabilities (pure torch; no distributed imports)."""
from .dpo import LOSS_TYPES, DPOLossOutput, dpo_loss, sequence_logps

__all__ = ["LOSS_TYPES", "DPOLossOutput", "dpo_loss", "sequence_logps"]
