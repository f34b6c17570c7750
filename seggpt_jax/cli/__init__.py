"""The ``seggpt-jax`` command line."""

from .main import console_main, main

__all__ = ["console_main", "main"]
