"""Adapters for model families whose eager classes need more than sliced weights (Hugging Face configs)."""
