"""The painter loss: transformers' ``SegGptLoss`` (smooth-L1 over the masked patches of the mask canvas),
split into numerator and count for exact gradient accumulation, with the BAAI code's validity mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..config import SegGptConfig
from .ops import patch_mask_to_pixels, smooth_l1

Array = jax.Array


def painter_loss_terms(config: SegGptConfig, pred_masks: Array, prompt_masks: Array, labels: Array,
                       bool_masked_pos: Array, valid: Array | None = None) -> tuple[Array, Array]:
    """``(sum of smooth-L1 over counted pixels, number of counted pixels)``: the loss is their ratio.

    Counted pixels are those of masked patches (``bool_masked_pos``) that are also ``valid`` (the
    BAAI code's validity mask: ``[B, 1 or 3, H, W]`` over the canvas, or over the query half only).
    Splitting the ratio lets gradient accumulation divide by the whole batch's count, exactly.
    """
    target = jnp.concatenate([prompt_masks, labels], axis=2).astype(jnp.float32)  # [B, 3, H, W]
    flags = patch_mask_to_pixels(bool_masked_pos, config.grid_size, config.patch_size)[:, None]  # [b, 1, H, W]
    flags = jnp.broadcast_to(flags, (flags.shape[0], target.shape[1]) + flags.shape[2:])
    if valid is not None:
        valid = jnp.asarray(valid, jnp.float32)
        if valid.shape[2] * 2 == target.shape[2]:  # given for the query half: the prompt half counts
            valid = jnp.concatenate([jnp.ones_like(valid), valid], axis=2)
        flags = flags * valid
    loss = smooth_l1(pred_masks, target, config.beta)
    return jnp.sum(loss * flags), jnp.sum(jnp.broadcast_to(flags, loss.shape) if valid is not None else flags)


def painter_loss(config: SegGptConfig, pred_masks: Array, prompt_masks: Array, labels: Array,
                 bool_masked_pos: Array, valid: Array | None = None) -> Array:
    """transformers' ``SegGptLoss``: smooth-L1 over the masked patches of the mask canvas.

    As in transformers the denominator counts the flags of ``bool_masked_pos`` as given, so a
    ``[1, N]`` mask with a batch of ``B`` sums the numerator over ``B`` samples but the denominator
    over one (the loss is then ``B`` times the per-sample mean). Pass one row per sample (as training
    does) for a true mean. ``valid`` excludes pixels, as the BAAI code's ``valid``.
    """
    total, count = painter_loss_terms(config, pred_masks, prompt_masks, labels, bool_masked_pos, valid)
    return total / count
