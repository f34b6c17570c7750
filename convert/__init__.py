"""The checkpoint conversion command: ``python -m convert SRC OUT`` (same as ``seggpt-jax convert SRC OUT``).

The work is done by :mod:`seggpt_jax.cli`; this package only makes the command reachable from a
source checkout without installing the console script.
"""
