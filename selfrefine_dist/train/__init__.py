"""Learners: distributed set-up, DeepSpeed configs, SFT, checkpoints, export."""
