"""sdtorch: Stable Diffusion written from scratch in PyTorch."""

from sdtorch.errors import CheckpointError, SdtorchError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "SdtorchError", "__version__"]
