"""Glue to training frameworks; each submodule imports its framework, so none is a dependency of fxprune."""
