"""Arrays as callers hand them over: numpy, jax or torch, converted without importing torch or JAX."""

from __future__ import annotations

from typing import Any


def from_torch(value: Any) -> Any:
    """A torch tensor (any device, bfloat16, requiring grad) as a numpy array, without importing torch;
    anything else as it is."""
    if not hasattr(value, "detach"):
        return value
    value = value.detach().cpu()
    return (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
