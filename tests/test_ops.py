"""The numerical building blocks against PyTorch."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import SegGptConfig as HFConfig
from transformers.models.seggpt.modeling_seggpt import SegGptAttention

from seggpt_jax.nn.attention import relative_tables
from seggpt_jax.nn.ops import layer_norm, patch_mask_to_pixels, resize_position_embeddings, smooth_l1


@pytest.mark.parametrize("grid, out", [(14, (56, 28)), (5, (15, 15)), (6, (16, 8)), (14, (14, 14)), (7, (3, 5)),
                                       (2, (9, 1)), (1, (4, 4)), (24, (37, 11))])
def test_bicubic_resize_matches_torch(grid, out):
    """jax.image.resize uses a=-0.5 and other edges; ours reproduces torch's a=-0.75 kernel."""
    x = torch.randn(1, 8, grid, grid, generator=torch.Generator().manual_seed(grid))
    ref = F.interpolate(x, size=out, mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    table = jnp.asarray(x[0].permute(1, 2, 0).reshape(grid * grid, 8).numpy())
    ours = np.asarray(resize_position_embeddings(table, grid, out))
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=3e-6 * max(1.0, np.abs(ref).max()), rtol=0)
    if (grid, grid) == out:
        np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("grid", [(56, 28), (16, 8), (15, 15), (1, 3)])
def test_relative_tables_match_transformers_get_rel_pos(grid):
    config = HFConfig(image_size=[grid[0] * 2, grid[1] * 2], patch_size=2, hidden_size=16, num_attention_heads=2)
    attention = SegGptAttention(config)
    h = torch.randn(2 * grid[0] - 1, 8)
    w = torch.randn(2 * grid[1] - 1, 8)
    ref_h = attention.get_rel_pos(grid[0], grid[0], h).numpy()
    ref_w = attention.get_rel_pos(grid[1], grid[1], w).numpy()
    ours_h, ours_w = relative_tables(jnp.asarray(h.numpy()), jnp.asarray(w.numpy()), grid)
    np.testing.assert_array_equal(np.asarray(ours_h), ref_h)
    np.testing.assert_array_equal(np.asarray(ours_w), ref_w)


def test_layer_norm_matches_torch_with_large_offsets():
    """Two-pass variance: stays accurate where E[x^2] - E[x]^2 would cancel."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g) + 300.0
    weight, bias = torch.randn(64, generator=g), torch.randn(64, generator=g)
    ref = F.layer_norm(x.double(), (64,), weight.double(), bias.double(), eps=1e-6).numpy()  # exact reference
    ours = np.asarray(layer_norm(jnp.asarray(x.numpy()), jnp.asarray(weight.numpy()), jnp.asarray(bias.numpy()), 1e-6))
    # float32 E[x^2] - E[x]^2 at this offset is off by ~1e-2; the two-pass variance by ~1e-5
    assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize("beta", [0.01, 1.0, 0.0])
def test_smooth_l1_matches_torch(beta):
    a, b = torch.randn(1000), torch.randn(1000) * 0.01
    ref = F.smooth_l1_loss(a * 0.02, b, reduction="none", beta=beta).numpy()
    ours = np.asarray(smooth_l1(jnp.asarray((a * 0.02).numpy()), jnp.asarray(b.numpy()), beta))
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


def test_patch_mask_to_pixels_matches_transformers_unpatchify():
    from transformers.models.seggpt.modeling_seggpt import unpatchify

    flags = torch.rand(2, 6 * 3) > 0.5
    ref = unpatchify(flags[:, :, None].repeat(1, 1, 4 * 4 * 3).float(), 6, 3)[:, 0].numpy()
    ours = np.asarray(patch_mask_to_pixels(jnp.asarray(flags.numpy()), (6, 3), 4))
    np.testing.assert_array_equal(ours, ref)
