"""Reasoning data: task registry, sources, SFT tokenization, demonstration filtering."""
