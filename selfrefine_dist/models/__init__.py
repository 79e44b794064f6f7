"""Model and tokenizer loading, the packaged SmolLM2 model, tiny test models."""
