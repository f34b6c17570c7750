"""SegGPT's building blocks in Flax NNX, following ``transformers.models.seggpt.modeling_seggpt``.

Parameter names match transformers' (``layernorm_before``, ``attention.qkv``, ``rel_pos_h``,
``decoder_pred.conv``) with Flax leaf names (``kernel``, ``bias``, ``scale``); activations are NHWC.

Modules hold parameters and the structure the config gives them, never how to compute: the compute
dtype, the matmul precision and the execution plan they resolve to arrive as one
:class:`~seggpt_jax.runtime.ModelSettings` argument of every call. The top-level model holds it once;
layers read ``settings.plan`` and decide nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ..config import SegGptConfig
from ..runtime import ModelSettings  # noqa: F401 (re-exported: the settings live in runtime)
from .attention import attention
from .ops import activation, batch_sharded, layer_norm, linear, resize_position_embeddings

Array = jax.Array
Initializer = Callable[[Array, tuple[int, ...], Any], Array]


def trunc_normal(config: SegGptConfig) -> Initializer:
    return nnx.initializers.truncated_normal(stddev=config.initializer_range)


class Dense(nnx.Module):
    """``x @ kernel + bias`` over the last axis (``kernel: [in, out]``), as ``torch.nn.Linear``.

    The same computation as ``nnx.Linear`` (inputs and parameters cast to the compute dtype, one
    ``dot_general``), with the dtype and precision taken from the call's settings; its backward pass
    is :func:`~seggpt_jax.nn.ops.linear`'s, which lets a training step update the kernel in place.
    """

    def __init__(self, din: int, dout: int, *, use_bias: bool = True, kernel_init: Initializer, param_dtype: Any,
                 rngs: nnx.Rngs):
        self.kernel = nnx.Param(kernel_init(rngs.params(), (din, dout), param_dtype))
        self.bias = nnx.Param(nnx.initializers.zeros_init()(rngs.params(), (dout,), param_dtype)) if use_bias else None

    def __call__(self, x: Array, settings: ModelSettings) -> Array:  # [..., in] -> [..., out]
        dt = settings.dtype
        y = linear(x.astype(dt), self.kernel[...].astype(dt), settings.precision)
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        return batch_sharded(y)  # under a mesh: split by rows, whatever the layout of the weights


class Conv(nnx.Module):
    """2-D convolution, NHWC input and HWIO ``kernel``, stride 1, symmetric zero padding ``padding``."""

    def __init__(self, din: int, dout: int, *, kernel_size: int, padding: int = 0, kernel_init: Initializer,
                 param_dtype: Any, rngs: nnx.Rngs):
        shape = (kernel_size, kernel_size, din, dout)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(nnx.initializers.zeros_init()(rngs.params(), (dout,), param_dtype))
        self.padding = padding

    def __call__(self, x: Array, settings: ModelSettings) -> Array:  # [B, H, W, in] -> [B, H, W, out]
        dt = settings.dtype
        pad = ((self.padding, self.padding), (self.padding, self.padding))
        y = jax.lax.conv_general_dilated(x.astype(dt), self.kernel[...].astype(dt), (1, 1), pad,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=settings.precision)
        return batch_sharded(y + self.bias[...].astype(dt))  # under a mesh: split by rows


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; float32 statistics, explicit epsilon (``scale``/``bias``).

    Returns the input's dtype: the statistics are float32 whatever the compute dtype."""

    def __init__(self, features: int, *, eps: float, param_dtype: Any):
        self.eps = float(eps)
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))

    def __call__(self, x: Array) -> Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class _PatchProjection(nnx.Module):
    """Parameters of the patch convolution: ``kernel`` (HWIO) and ``bias``."""

    def __init__(self, config: SegGptConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        size = config.patch_size
        shape = (size, size, config.num_channels, config.hidden_size)
        self.kernel = nnx.Param(trunc_normal(config)(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((config.hidden_size,), param_dtype))


class SegGptPatchEmbeddings(nnx.Module):
    """transformers' ``SegGptPatchEmbeddings``: a non-overlapping ``patch x patch`` convolution, computed
    as one matmul over flattened patches."""

    def __init__(self, config: SegGptConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        self.patch_size = config.patch_size
        self.projection = _PatchProjection(config, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixels: Array, settings: ModelSettings) -> Array:  # [B, H, W, c] -> [B, H/p, W/p, C]
        batch, height, width, channels = pixels.shape
        size, dt = self.patch_size, settings.dtype
        rows, cols = height // size, width // size
        patches = pixels.reshape(batch, rows, size, cols, size, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, rows, cols, size * size * channels)  # (kh, kw, c) order = HWI
        kernel = self.projection.kernel[...].astype(dt).reshape(size * size * channels, -1)  # [k, C]
        out = jnp.einsum("bhwk,kc->bhwc", patches.astype(dt), kernel, precision=settings.precision)
        return out + self.projection.bias[...].astype(dt)


class SegGptEmbeddings(nnx.Module):
    """transformers' ``SegGptEmbeddings``: patch embeddings of both canvases, mask tokens,
    segment/position/type embeddings.

    Returns ``[2B, rows, cols, C]``: the image stream (B rows) followed by the mask stream. Known
    difference: the type token may differ per sample (``is_instance`` is ``[B]``).
    """

    def __init__(self, config: SegGptConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        c = config.hidden_size
        self.pretrain_grid = config.pretrain_grid
        normal = nnx.initializers.normal(stddev=config.initializer_range)
        for name in ("mask_token", "segment_token_input", "segment_token_prompt", "type_token_semantic",
                     "type_token_instance"):
            setattr(self, name, nnx.Param(normal(rngs.params(), (1, 1, 1, c), param_dtype)))
        self.patch_embeddings = SegGptPatchEmbeddings(config, param_dtype=param_dtype, rngs=rngs)
        positions = config.pretrain_grid ** 2 + 1  # + the pretraining CLS slot, skipped
        self.position_embeddings = nnx.Param(trunc_normal(config)(rngs.params(), (1, positions, c), param_dtype))

    def position_encoding(self, rows: int, cols: int, dtype: Any) -> Array:
        """``[1, rows, cols, C]`` absolute positions, bicubic-resized from the pretraining grid."""
        table = self.position_embeddings[...][0, 1:]  # [grid * grid, C]
        return resize_position_embeddings(table, self.pretrain_grid, (rows, cols))[None].astype(dtype)

    def __call__(self, pixel_canvas: Array, mask_canvas: Array, bool_masked_pos: Array, is_instance: Array,
                 settings: ModelSettings) -> Array:  # [B, H, W, c] x 2 -> [2B, h, w, C]
        dt = settings.dtype
        tok = lambda name: getattr(self, name)[...].astype(dt)  # noqa: E731  [1, 1, 1, C]
        images = self.patch_embeddings(pixel_canvas, settings)  # [B, h, w, C]
        masks = self.patch_embeddings(mask_canvas, settings)
        batch, rows, cols, _ = images.shape
        flags = bool_masked_pos.astype(dt).reshape(-1, rows, cols, 1)  # [b, h, w, 1], b in {1, B}
        masks = masks * (1 - flags) + tok("mask_token") * flags
        positions = self.position_encoding(rows, cols, dt)
        images = images + tok("segment_token_input")
        masks = masks + tok("segment_token_prompt")
        images = images + positions
        masks = masks + positions
        type_embedding = jnp.where(is_instance.reshape(batch, 1, 1, 1), tok("type_token_instance"),
                                   tok("type_token_semantic"))  # [B, 1, 1, C]
        images = images + type_embedding
        masks = masks + type_embedding
        return jnp.concatenate([images, masks], axis=0)


class SegGptAttention(nnx.Module):
    """transformers' ``SegGptAttention``: global multi-head attention with decomposed relative
    positions (see :mod:`seggpt_jax.nn.attention` for the kernels). Names ``"qkv"``, ``"attention"`` and
    ``"attention_out"`` for the remat policies."""

    def __init__(self, config: SegGptConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        c = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.scale = config.head_dim ** -0.5
        dense = dict(kernel_init=trunc_normal(config), param_dtype=param_dtype, rngs=rngs)
        self.qkv = Dense(c, 3 * c, use_bias=config.qkv_bias, **dense)
        self.proj = Dense(c, c, **dense)
        if config.use_relative_position_embeddings:
            rows, cols = config.grid_size
            init = trunc_normal(config)
            self.rel_pos_h = nnx.Param(init(rngs.params(), (2 * rows - 1, config.head_dim), param_dtype))
            self.rel_pos_w = nnx.Param(init(rngs.params(), (2 * cols - 1, config.head_dim), param_dtype))
        else:
            self.rel_pos_h = self.rel_pos_w = None

    def __call__(self, x: Array, settings: ModelSettings) -> Array:  # [B, h, w, C] -> [B, h, w, C]
        batch, rows, cols, channels = x.shape
        heads = self.num_heads
        qkv = checkpoint_name(self.qkv(x, settings).reshape(batch, rows * cols, 3, heads, channels // heads), "qkv")
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, hd]
        rel_pos = None if self.rel_pos_h is None else (self.rel_pos_h[...], self.rel_pos_w[...])
        out = attention(q, k, v, plan=settings.plan, scale=self.scale, grid=(rows, cols), rel_pos=rel_pos,
                        precision=settings.precision)  # [B, N, heads, hd]
        out = checkpoint_name(out, "attention")
        return checkpoint_name(self.proj(out.reshape(batch, rows, cols, channels), settings), "attention_out")


class SegGptMlp(nnx.Module):
    """transformers' ``SegGptMlp``: ``lin2(act(lin1(x)))``; names ``"mlp_hidden"`` for the remat policies."""

    def __init__(self, config: SegGptConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        dense = dict(kernel_init=trunc_normal(config), param_dtype=param_dtype, rngs=rngs)
        self.lin1 = Dense(config.hidden_size, config.mlp_dim, **dense)
        self.lin2 = Dense(config.mlp_dim, config.hidden_size, **dense)
        self.hidden_act = config.hidden_act

    def __call__(self, x: Array, settings: ModelSettings) -> Array:  # [B, h, w, C] -> [B, h, w, C]
        hidden = checkpoint_name(self.lin1(x, settings), "mlp_hidden")  # [B, h, w, mlp_dim]
        return self.lin2(activation(self.hidden_act)(hidden), settings)


def drop_path(x: Array, rate: Array | float, key: Array | None) -> Array:
    """Stochastic depth per sample, as transformers' ``SegGptDropPath`` (identity without a key)."""
    if key is None:
        return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    noise = jax.random.uniform(key, (x.shape[0],) + (1,) * (x.ndim - 1), dtype=jnp.float32)
    return x / keep.astype(x.dtype) * jnp.floor(noise + keep).astype(x.dtype)


class SegGptLayer(nnx.Module):
    """transformers' ``SegGptLayer``: pre-LN block, global attention with decomposed relative positions,
    then MLP. The feature ensemble (an ``ensemble`` function) is applied to the attention output."""

    def __init__(self, config: SegGptConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.layernorm_before = LayerNorm(config.hidden_size, eps=eps, param_dtype=param_dtype)
        self.attention = SegGptAttention(config, param_dtype=param_dtype, rngs=rngs)
        self.layernorm_after = LayerNorm(config.hidden_size, eps=eps, param_dtype=param_dtype)
        self.mlp = SegGptMlp(config, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array, settings: ModelSettings, *, ensemble=None, drop_rate: Array | float = 0.0,
                 keys: tuple[Array | None, Array | None] = (None, None)) -> Array:  # [n, h, w, C]
        """``drop_rate`` is an argument (not an attribute) so that every layer has the same graph and a
        run of layers can be scanned."""
        attended = self.attention(self.layernorm_before(x), settings)
        if ensemble is not None:
            attended = ensemble(attended)
        x = drop_path(attended, drop_rate, keys[0]) + x
        return x + drop_path(self.mlp(self.layernorm_after(x), settings), drop_rate, keys[1])


class SegGptDecoderHead(nnx.Module):
    """transformers' ``SegGptDecoderHead``: 3x3 conv, channels LayerNorm, activation, 1x1 conv to RGB (NHWC)."""

    def __init__(self, config: SegGptConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        d = config.decoder_hidden_size
        conv = dict(kernel_init=trunc_normal(config), param_dtype=param_dtype, rngs=rngs)
        self.conv = Conv(d, d, kernel_size=3, padding=1, **conv)
        self.layernorm = LayerNorm(d, eps=config.layer_norm_eps, param_dtype=param_dtype)
        self.hidden_act = config.hidden_act
        self.head = Conv(d, 3, kernel_size=1, **conv)  # to RGB, as transformers

    def __call__(self, x: Array, settings: ModelSettings) -> Array:  # [B, H, W, d] -> [B, H, W, 3]
        hidden = activation(self.hidden_act)(self.layernorm(self.conv(x, settings)))
        return self.head(hidden, settings)


class SegGptDecoder(nnx.Module):
    """transformers' ``SegGptDecoder``: linear from the concatenated taps to ``patch*patch*decoder_hidden``
    values per patch, unpatchify, head."""

    def __init__(self, config: SegGptConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        self.patch_size, self.decoder_hidden_size = config.patch_size, config.decoder_hidden_size
        taps = len(config.intermediate_hidden_state_indices)
        self.decoder_embed = Dense(config.hidden_size * taps, config.patch_size ** 2 * config.decoder_hidden_size,
                                   kernel_init=trunc_normal(config), param_dtype=param_dtype, rngs=rngs)
        self.decoder_pred = SegGptDecoderHead(config, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, features: Array, settings: ModelSettings) -> Array:  # [B, h, w, C*taps] -> [B, H, W, 3]
        size, d = self.patch_size, self.decoder_hidden_size
        x = self.decoder_embed(features, settings)  # [B, h, w, p*p*d]
        batch, rows, cols, _ = x.shape
        x = x.reshape(batch, rows, cols, size, size, d).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(batch, rows * size, cols * size, d)
        return self.decoder_pred(x, settings)
