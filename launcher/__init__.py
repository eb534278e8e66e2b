"""launcher: a distributed training launcher for PyTorch. Recipes say what to train; the library says how."""

__version__ = "0.1.0"
