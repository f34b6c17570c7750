"""Test and benchmark support for seggpt-jax; not part of the installed package.

* :mod:`seggpt_jax_testing.synthetic`: synthetic image/mask datasets.
* :mod:`seggpt_jax_testing.transformers_harness`: random-weight checkpoints written by transformers
  (needs the ``test`` extra).

Importable from the repository root (pytest and ``python -m benchmarks.NAME`` put it on the path).
"""
