"""forklight: train language models to reason in parallel with global forking tokens."""

__version__ = "0.1.0"
