"""ajepa: A-JEPA audio pretraining with Triton kernels and a PyTorch reference path."""

__version__ = "0.1.0"

__all__ = ["load_encoder"]


def __getattr__(name):  # lazy, so `import ajepa` stays light
    if name == "load_encoder":
        from ajepa.eval.embed import load_encoder

        return load_encoder
    raise AttributeError(f"module 'ajepa' has no attribute {name!r}")
