"""Evaluation: greedy answers on registered tasks, accuracy with bootstrap intervals."""
