"""selfrefine-dist: self-refine instruction-tuning of small language models."""

__version__ = "0.1.0"
