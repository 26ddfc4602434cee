"""ajepa: A-JEPA audio pretraining with Triton kernels and a PyTorch reference path."""

__version__ = "0.1.0"
