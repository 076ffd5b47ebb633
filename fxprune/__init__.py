"""fxprune: structured pruning compiler for PyTorch."""
