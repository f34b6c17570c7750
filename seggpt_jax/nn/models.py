"""SegGPT in Flax NNX: the encoder (:class:`SegGptModel`) and the painter (:class:`SegGptForImageSegmentation`).

Follows ``transformers.models.seggpt.modeling_seggpt`` (v4.39+ / v5) module by module; parameter
names match transformers' (``layernorm_before``, ``attention.qkv``, ``rel_pos_h``,
``decoder_pred.conv``) with Flax leaf names (``kernel``/``scale``). Activations are NHWC inside; the
public call takes and returns NCHW arrays like transformers.

Known differences from transformers:

* ``embedding_type`` may also be given per sample (a list of names or 0/1 flags), as the original
  BAAI code's ``seg_type``; transformers takes one string for the whole batch.
* ``ensemble_mode="original"`` reproduces the BAAI code's feature ensemble (see
  :meth:`SegGptForImageSegmentation.__call__`); the default ``"transformers"`` is bit-for-bit
  transformers' behaviour, including its quirks.
* ``prompts_per_query`` generalises the ensemble to a batch of several queries (groups of
  consecutive samples); transformers always ensembles the whole batch.
* ``output_attentions`` is not offered; ``hidden_dropout_prob`` is, as in transformers, unused.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from . import inputs as _inputs
from ..weights.pretrained import PretrainedMixin
from .attention import attention, resolve_impl
from ..config import SegGptConfig
from .ops import activation, layer_norm, patch_mask_to_pixels, resize_position_embeddings, smooth_l1
from ..runtime import RuntimeConfig, remat_policy

Array = jax.Array


# --------------------------------------------------------------------------------------- outputs
class _Output:
    """Attribute and ``out["name"]`` access, like transformers' ``ModelOutput``."""

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str):
            raise TypeError("outputs are indexed by field name, e.g. out['pred_masks']")
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegGptEncoderOutput(_Output):
    """``last_hidden_state``: ``[B, rows, cols, hidden]``. ``hidden_states`` (on request): the input
    of every layer and the final output (``2B`` rows up to the merge layer, ``B`` after).
    ``intermediate_hidden_states``: the final-LayerNormed taps, in layer order."""

    last_hidden_state: Array
    hidden_states: tuple[Array, ...] | None = None
    intermediate_hidden_states: tuple[Array, ...] | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegGptImageSegmentationOutput(_Output):
    """``pred_masks``: ``[B, 3, H, W]`` painted canvas (NCHW, float32), prompt half on top."""

    loss: Array | None = None
    pred_masks: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    intermediate_hidden_states: tuple[Array, ...] | None = None


# --------------------------------------------------------------------------------------- layers
def _trunc_normal(config: SegGptConfig):
    return nnx.initializers.truncated_normal(stddev=config.initializer_range)


@dataclasses.dataclass(frozen=True)
class _Precision:
    """Compute dtype, parameter dtype and matmul precision shared by every module."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    def linear(self, config: SegGptConfig, din: int, dout: int, *, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
        return nnx.Linear(din, dout, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                          precision=self.precision, kernel_init=_trunc_normal(config), rngs=rngs)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; float32 statistics, explicit epsilon (``scale``/``bias``)."""

    def __init__(self, features: int, *, eps: float, param_dtype: Any, rngs: nnx.Rngs | None = None):
        self.eps = float(eps)
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))

    def __call__(self, x: Array) -> Array:
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class _PatchProjection(nnx.Module):
    """Parameters of the patch convolution: ``kernel`` (HWIO) and ``bias``."""

    def __init__(self, config: SegGptConfig, p: _Precision, *, rngs: nnx.Rngs):
        size = config.patch_size
        shape = (size, size, config.num_channels, config.hidden_size)
        self.kernel = nnx.Param(_trunc_normal(config)(rngs.params(), shape, p.param_dtype))
        self.bias = nnx.Param(jnp.zeros((config.hidden_size,), p.param_dtype))


class SegGptPatchEmbeddings(nnx.Module):
    """Non-overlapping ``patch x patch`` convolution, computed as one matmul over flattened patches."""

    def __init__(self, config: SegGptConfig, p: _Precision, *, rngs: nnx.Rngs):
        size = config.patch_size
        self.patch_size = size
        self.p = p
        self.projection = _PatchProjection(config, p, rngs=rngs)

    def __call__(self, pixels: Array) -> Array:  # [B, H, W, c] -> [B, H/p, W/p, C]
        batch, height, width, channels = pixels.shape
        size = self.patch_size
        rows, cols = height // size, width // size
        patches = pixels.reshape(batch, rows, size, cols, size, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, rows, cols, size * size * channels)  # (kh, kw, c) order = HWI
        kernel = self.projection.kernel[...].astype(self.p.dtype).reshape(size * size * channels, -1)
        out = jnp.einsum("bhwk,kc->bhwc", patches.astype(self.p.dtype), kernel, precision=self.p.precision)
        return out + self.projection.bias[...].astype(self.p.dtype)


class SegGptEmbeddings(nnx.Module):
    """Patch embeddings of both canvases, mask tokens, segment/position/type embeddings.

    Returns ``[2B, rows, cols, C]``: the image stream (B rows) followed by the mask stream.
    """

    def __init__(self, config: SegGptConfig, p: _Precision, *, rngs: nnx.Rngs):
        c = config.hidden_size
        self.config = config
        self.p = p
        normal = nnx.initializers.normal(stddev=config.initializer_range)
        for name in ("mask_token", "segment_token_input", "segment_token_prompt", "type_token_semantic",
                     "type_token_instance"):
            setattr(self, name, nnx.Param(normal(rngs.params(), (1, 1, 1, c), p.param_dtype)))
        self.patch_embeddings = SegGptPatchEmbeddings(config, p, rngs=rngs)
        positions = config.pretrain_grid ** 2 + 1  # + the pretraining CLS slot, skipped
        self.position_embeddings = nnx.Param(_trunc_normal(config)(rngs.params(), (1, positions, c), p.param_dtype))

    def position_encoding(self, rows: int, cols: int) -> Array:
        """``[1, rows, cols, C]`` absolute positions, bicubic-resized from the pretraining grid."""
        table = self.position_embeddings[...][0, 1:]
        return resize_position_embeddings(table, self.config.pretrain_grid, (rows, cols))[None].astype(self.p.dtype)

    def __call__(self, pixel_canvas: Array, mask_canvas: Array, bool_masked_pos: Array, is_instance: Array) -> Array:
        dt = self.p.dtype
        tok = lambda name: getattr(self, name)[...].astype(dt)  # noqa: E731
        images = self.patch_embeddings(pixel_canvas)  # [B, h, w, C]
        masks = self.patch_embeddings(mask_canvas)
        batch, rows, cols, _ = images.shape
        flags = bool_masked_pos.astype(dt).reshape(-1, rows, cols, 1)  # [b, h, w, 1], b in {1, B}
        masks = masks * (1 - flags) + tok("mask_token") * flags
        positions = self.position_encoding(rows, cols)
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
    def __init__(self, config: SegGptConfig, p: _Precision, runtime: RuntimeConfig, *, rngs: nnx.Rngs):
        c = config.hidden_size
        self.config = config
        self.p = p
        self.runtime = runtime
        self.qkv = p.linear(config, c, 3 * c, use_bias=config.qkv_bias, rngs=rngs)
        self.proj = p.linear(config, c, c, rngs=rngs)
        if config.use_relative_position_embeddings:
            rows, cols = config.grid_size
            init = _trunc_normal(config)
            self.rel_pos_h = nnx.Param(init(rngs.params(), (2 * rows - 1, config.head_dim), p.param_dtype))
            self.rel_pos_w = nnx.Param(init(rngs.params(), (2 * cols - 1, config.head_dim), p.param_dtype))

    def __call__(self, x: Array) -> Array:  # [B, h, w, C]
        batch, rows, cols, channels = x.shape
        heads = self.config.num_attention_heads
        qkv = self.qkv(x).reshape(batch, rows * cols, 3, heads, channels // heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, hd]
        rel_pos = None
        if self.config.use_relative_position_embeddings:
            rel_pos = (self.rel_pos_h[...], self.rel_pos_w[...])
        impl = resolve_impl(self.runtime.attention, self.p.dtype)
        out = attention(q, k, v, impl=impl, scale=self.config.head_dim ** -0.5, grid=(rows, cols), rel_pos=rel_pos,
                        precision=self.p.precision)
        return self.proj(out.reshape(batch, rows, cols, channels))


class SegGptMlp(nnx.Module):
    def __init__(self, config: SegGptConfig, p: _Precision, *, rngs: nnx.Rngs):
        self.lin1 = p.linear(config, config.hidden_size, config.mlp_dim, rngs=rngs)
        self.lin2 = p.linear(config, config.mlp_dim, config.hidden_size, rngs=rngs)
        self.hidden_act = config.hidden_act

    def __call__(self, x: Array) -> Array:
        return self.lin2(activation(self.hidden_act)(self.lin1(x)))


def _drop_path(x: Array, rate: Array | float, key: Array | None) -> Array:
    """Stochastic depth per sample, as transformers' ``SegGptDropPath`` (identity without a key)."""
    if key is None:
        return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    noise = jax.random.uniform(key, (x.shape[0],) + (1,) * (x.ndim - 1), dtype=jnp.float32)
    return x / keep.astype(x.dtype) * jnp.floor(noise + keep).astype(x.dtype)


def feature_ensemble(x: Array, layer: int, merge_index: int, *, mode: str, prompts: int) -> Array:
    """Average the query half of the attention output over the prompts of each query.

    ``x: [n, rows, cols, C]`` with ``n = 2B`` (image stream, then mask stream) up to the merge layer
    and ``n = B`` after it; the batch holds groups of ``prompts`` consecutive samples per query.

    * ``"transformers"``: layers before the merge average within each stream (only with >= 2
      prompts); the merge layer itself averages over *both* streams, even with a single prompt;
      later layers average over the prompts (>= 2 prompts).
    * ``"original"`` (BAAI ``Block.forward`` with ``merge_between_batch=0``): layers up to and
      including the merge average within each stream, later layers over the prompts; nothing at
      all with a single prompt.
    """
    streams = 2 if layer <= merge_index else 1
    merge_layer_quirk = mode == "transformers" and layer == merge_index
    if prompts < 2 and not merge_layer_quirk:
        return x
    half = x.shape[1] // 2
    top, bottom = x[:, :half], x[:, half:]
    groups = x.shape[0] // streams // prompts
    grouped = bottom.reshape((streams, groups, prompts) + bottom.shape[1:])
    axes = (0, 2) if merge_layer_quirk else (2,)
    mean = jnp.mean(grouped, axis=axes, keepdims=True)
    bottom = jnp.broadcast_to(mean, grouped.shape).reshape(bottom.shape)
    return jnp.concatenate([top, bottom], axis=1)


class SegGptLayer(nnx.Module):
    """Pre-LN transformer block: global attention with decomposed relative positions, then MLP."""

    def __init__(self, config: SegGptConfig, p: _Precision, runtime: RuntimeConfig, *, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.layernorm_before = LayerNorm(config.hidden_size, eps=eps, param_dtype=p.param_dtype)
        self.attention = SegGptAttention(config, p, runtime, rngs=rngs)
        self.layernorm_after = LayerNorm(config.hidden_size, eps=eps, param_dtype=p.param_dtype)
        self.mlp = SegGptMlp(config, p, rngs=rngs)

    def __call__(self, x: Array, *, ensemble=None, drop_rate: Array | float = 0.0,
                 keys: tuple[Array | None, Array | None] = (None, None)) -> Array:
        """``drop_rate`` is an argument (not an attribute) so that every layer has the same graph and a
        run of layers can be scanned."""
        attended = self.attention(self.layernorm_before(x))
        if ensemble is not None:
            attended = ensemble(attended)
        x = _drop_path(attended, drop_rate, keys[0]) + x
        return x + _drop_path(self.mlp(self.layernorm_after(x)), drop_rate, keys[1])


def layer_segments(num_layers: int, merge_index: int, taps) -> list[tuple[int, int]]:
    """Split ``range(num_layers)`` into runs that behave alike: the merge layer stands alone, and a run
    ends at every decoder tap. ``[0, merge)``, ``[merge]``, ``(merge, tap1]``, ``(tap1, tap2]``, ..."""
    segments, start = [], 0
    for i in range(num_layers):
        if i == merge_index and i > start:
            segments.append((start, i))
            start = i
        if i == merge_index or i in taps or i == num_layers - 1:
            segments.append((start, i + 1))
            start = i + 1
    return segments


class SegGptEncoder(nnx.Module):
    def __init__(self, config: SegGptConfig, p: _Precision, runtime: RuntimeConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.runtime = runtime
        self.layers = nnx.List([SegGptLayer(config, p, runtime, rngs=rngs) for _ in range(config.num_hidden_layers)])
        self.layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, param_dtype=p.param_dtype)

    def __call__(self, x: Array, options: _inputs.ForwardOptions, dropout_rng: Array | None = None) -> SegGptEncoderOutput:
        config = self.config
        merge, taps = config.merge_index, set(config.intermediate_hidden_state_indices)
        rates = jnp.asarray(config.drop_path_rates(), jnp.float32)
        keys = None
        if dropout_rng is not None:
            keys = jax.random.split(dropout_rng, 2 * len(self.layers)).reshape(len(self.layers), 2)
        prompts = options.prompts_per_query or x.shape[0] // 2  # x holds both streams until the merge
        hidden_states, intermediate = [], []
        for start, stop in layer_segments(len(self.layers), merge, taps):
            ensemble = None
            if options.feature_ensemble:
                ensemble = functools.partial(feature_ensemble, layer=start, merge_index=merge,
                                             mode=options.ensemble_mode, prompts=prompts)
            x, inputs = self._run_layers(x, start, stop, ensemble, rates, keys, options.output_hidden_states)
            hidden_states += inputs
            if stop - 1 == merge:
                half = x.shape[0] // 2
                x = (x[:half] + x[half:]) * jnp.asarray(0.5, x.dtype)
            if stop - 1 in taps:
                intermediate.append(self.layernorm(x))
        if options.output_hidden_states:
            hidden_states.append(x)
        return SegGptEncoderOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if options.output_hidden_states else None,
            intermediate_hidden_states=tuple(intermediate),
        )

    def _run_layers(self, x, start: int, stop: int, ensemble, rates, keys,
                    collect: bool) -> tuple[Array, list[Array]]:
        """Layers ``[start, stop)``, unrolled or as one ``lax.scan``; also returns each layer's input."""

        def apply(layer, h, rate, layer_keys):
            return layer(h, ensemble=ensemble, drop_rate=rate,
                         keys=(None, None) if layer_keys is None else (layer_keys[0], layer_keys[1]))

        if self.runtime.remat_policy is not None:
            apply = nnx.remat(apply, policy=remat_policy(self.runtime.remat_policy))
        if not self.runtime.scan_layers or stop - start == 1:
            inputs = []
            for i in range(start, stop):
                if collect:
                    inputs.append(x)
                x = apply(self.layers[i], x, rates[i], None if keys is None else keys[i])
            return x, inputs

        splits = [nnx.split(self.layers[i]) for i in range(start, stop)]
        graphdef = splits[0][0]
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(state for _, state in splits))
        xs = (stacked, rates[start:stop], None if keys is None else keys[start:stop])

        def body(h, step):
            state, rate, layer_keys = step
            out = apply(nnx.merge(graphdef, state), h, rate, layer_keys)
            return out, (h if collect else None)

        x, inputs = jax.lax.scan(body, x, xs)
        return x, (list(inputs) if collect else [])


class SegGptDecoderHead(nnx.Module):
    """3x3 conv, channels LayerNorm, activation, 1x1 conv to RGB (NHWC)."""

    def __init__(self, config: SegGptConfig, p: _Precision, *, rngs: nnx.Rngs):
        d = config.decoder_hidden_size
        conv = dict(dtype=p.dtype, param_dtype=p.param_dtype, precision=p.precision,
                    kernel_init=_trunc_normal(config), rngs=rngs)
        self.conv = nnx.Conv(d, d, kernel_size=(3, 3), padding=((1, 1), (1, 1)), **conv)
        self.layernorm = LayerNorm(d, eps=config.layer_norm_eps, param_dtype=p.param_dtype)
        self.hidden_act = config.hidden_act
        self.head = nnx.Conv(d, 3, kernel_size=(1, 1), **conv)  # to RGB, as transformers

    def __call__(self, x: Array) -> Array:
        return self.head(activation(self.hidden_act)(self.layernorm(self.conv(x))))


class SegGptDecoder(nnx.Module):
    """Linear from the concatenated taps to ``patch*patch*decoder_hidden`` values per patch, unpatchify, head."""

    def __init__(self, config: SegGptConfig, p: _Precision, *, rngs: nnx.Rngs):
        self.config = config
        taps = len(config.intermediate_hidden_state_indices)
        self.decoder_embed = p.linear(config, config.hidden_size * taps,
                                      config.patch_size ** 2 * config.decoder_hidden_size, rngs=rngs)
        self.decoder_pred = SegGptDecoderHead(config, p, rngs=rngs)

    def __call__(self, features: Array) -> Array:  # [B, h, w, C*taps] -> [B, H, W, 3]
        size, d = self.config.patch_size, self.config.decoder_hidden_size
        x = self.decoder_embed(features)
        batch, rows, cols, _ = x.shape
        x = x.reshape(batch, rows, cols, size, size, d).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(batch, rows * size, cols * size, d)
        return self.decoder_pred(x)


# --------------------------------------------------------------------------------------- models
def _nchw_to_nhwc(x: Array, dtype: Any) -> Array:
    return jnp.transpose(x, (0, 2, 3, 1)).astype(dtype)


class _Configurable:
    """``configure(...)``: swap the :class:`RuntimeConfig` on every module that holds it; and the
    validated, jitted public call shared by both model classes."""

    runtime: RuntimeConfig
    config: SegGptConfig

    def _run(self, jitted, *args: Any, **kwargs: Any):
        inputs, options = _inputs.prepare(self.config, *args, **kwargs)
        graphdef, state = nnx.split(self)
        return jitted(graphdef, state, inputs, options)

    def configure(self, **changes: Any) -> "_Configurable":
        """Change how the model runs (``attention=``, ``scan_layers=``, ``remat_policy=``) in place;
        parameters are kept, the next call compiles anew. Returns the model."""
        runtime = dataclasses.replace(self.runtime, **changes)
        for _, node in nnx.iter_graph(self):
            if isinstance(node, nnx.Module) and hasattr(node, "runtime"):
                node.runtime = runtime
        return self


def _check_construction(config: Any, runtime: Any) -> RuntimeConfig:
    if not isinstance(config, SegGptConfig):
        raise TypeError(f"config must be a SegGptConfig, got {type(config).__name__}")
    if runtime is None:
        return RuntimeConfig()
    if not isinstance(runtime, RuntimeConfig):
        raise TypeError(f"runtime must be a seggpt_jax.RuntimeConfig, got {type(runtime).__name__}")
    return runtime


class SegGptModel(PretrainedMixin, _Configurable, nnx.Module):
    """The SegGPT encoder (embeddings + transformer); returns :class:`SegGptEncoderOutput`."""

    _checkpoint_prefix = "model."  # its parameters sit under ``model.`` in the full painter

    def __init__(self, config: SegGptConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 precision: Any = None, runtime: RuntimeConfig | None = None, rngs: nnx.Rngs):
        runtime = _check_construction(config, runtime)
        p = _Precision(jnp.dtype(dtype), jnp.dtype(param_dtype), precision)
        self.config = config
        self.precision_policy = p
        self.runtime = runtime
        self.embeddings = SegGptEmbeddings(config, p, rngs=rngs)
        self.encoder = SegGptEncoder(config, p, runtime, rngs=rngs)

    def encode(self, inputs: dict[str, Any], options: _inputs.ForwardOptions) -> SegGptEncoderOutput:
        """Traceable forward on prepared inputs (see :func:`seggpt_jax.nn.inputs.prepare`)."""
        dt = self.precision_policy.dtype
        second = inputs["labels"] if inputs.get("labels") is not None else inputs["prompt_masks"]
        pixel_canvas = jnp.concatenate([inputs["prompt_pixel_values"], inputs["pixel_values"]], axis=2)
        mask_canvas = jnp.concatenate([inputs["prompt_masks"], second], axis=2)
        embeddings = self.embeddings(_nchw_to_nhwc(pixel_canvas, dt), _nchw_to_nhwc(mask_canvas, dt),
                                     inputs["bool_masked_pos"], inputs["is_instance"])
        return self.encoder(embeddings, options, inputs.get("dropout_rng"))

    def __call__(self, pixel_values, prompt_pixel_values, prompt_masks, bool_masked_pos=None,
                 feature_ensemble: bool = False, embedding_type: Any = "instance", labels=None,
                 ensemble_mode: str = "transformers", output_hidden_states: bool = False, *,
                 prompts_per_query: int | None = None, dropout_rng: Array | None = None) -> SegGptEncoderOutput:
        """Same arguments as :meth:`SegGptForImageSegmentation.__call__`; runs the jitted encoder."""
        return self._run(_encoder_jit, pixel_values, prompt_pixel_values, prompt_masks, bool_masked_pos,
                         feature_ensemble, embedding_type, labels, ensemble_mode, output_hidden_states,
                         prompts_per_query, dropout_rng)


class SegGptForImageSegmentation(PretrainedMixin, _Configurable, nnx.Module):
    """SegGPT painter: encoder + decoder, with the smooth-L1 loss over masked patches."""

    def __init__(self, config: SegGptConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 precision: Any = None, runtime: RuntimeConfig | None = None, rngs: nnx.Rngs):
        runtime = _check_construction(config, runtime)
        p = _Precision(jnp.dtype(dtype), jnp.dtype(param_dtype), precision)
        self.config = config
        self.precision_policy = p
        self.runtime = runtime
        self.model = SegGptModel(config, dtype=dtype, param_dtype=param_dtype, precision=precision, runtime=runtime,
                                 rngs=rngs)
        self.decoder = SegGptDecoder(config, p, rngs=rngs)

    def segment(self, inputs: dict[str, Any], options: _inputs.ForwardOptions) -> SegGptImageSegmentationOutput:
        """Traceable forward on prepared inputs; the jitted ``__call__`` wraps this."""
        encoded = self.model.encode(inputs, options)
        features = jnp.concatenate(encoded.intermediate_hidden_states, axis=-1)
        pred = self.decoder(features).astype(jnp.float32)  # [B, H, W, 3]
        pred_masks = jnp.transpose(pred, (0, 3, 1, 2))  # NCHW like transformers
        loss = None
        if inputs.get("labels") is not None:
            loss = painter_loss(self.config, pred_masks, inputs["prompt_masks"], inputs["labels"],
                                inputs["bool_masked_pos"])
        return SegGptImageSegmentationOutput(
            loss=loss, pred_masks=pred_masks, hidden_states=encoded.hidden_states,
            intermediate_hidden_states=encoded.intermediate_hidden_states)

    def __call__(self, pixel_values, prompt_pixel_values, prompt_masks, bool_masked_pos=None,
                 feature_ensemble: bool = False, embedding_type: Any = "instance", labels=None,
                 ensemble_mode: str = "transformers", output_hidden_states: bool = False, *,
                 prompts_per_query: int | None = None,
                 dropout_rng: Array | None = None) -> SegGptImageSegmentationOutput:
        """Paint the query's mask. Arguments and layout follow ``transformers.SegGptForImageSegmentation``.

        Args:
            pixel_values, prompt_pixel_values, prompt_masks: ``[B, 3, H/2, W]`` normalised float
                arrays (numpy or jax), NCHW, as ``SegGptImageProcessor`` returns them.
            bool_masked_pos: ``[1 or B, num_patches]`` patch flags for the mask canvas; default masks
                the query half (inference).
            feature_ensemble: average the query features over the prompts of the batch (few-shot).
            embedding_type: ``"instance"``/``"semantic"``, or one per sample (names or 1/0 flags).
            labels: ``[B, 3, H/2, W]`` target masks; enables the smooth-L1 loss.
            ensemble_mode: ``"transformers"`` (default) or ``"original"``. They differ at the merge
                layer: transformers averages the query half over *both* streams there (image and
                mask), and does so even with a single prompt; the BAAI code averages within each
                stream up to and including the merge layer and does nothing with one prompt.
            output_hidden_states: also return every layer's input and the final hidden state.
            prompts_per_query: with ``feature_ensemble``, the batch is groups of this many
                consecutive samples, one group per query (default: the whole batch is one query).
            dropout_rng: a PRNG key enables drop-path (training); ``None`` is inference.

        The forward is jitted once per input shapes and static switches; call it from inside
        ``jax.jit``/``nnx.jit``/``nnx.grad`` as well.
        """
        return self._run(_segment_jit, pixel_values, prompt_pixel_values, prompt_masks, bool_masked_pos,
                         feature_ensemble, embedding_type, labels, ensemble_mode, output_hidden_states,
                         prompts_per_query, dropout_rng)


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


@functools.partial(jax.jit, static_argnums=(0, 3))
def _segment_jit(graphdef, state, inputs, options):
    return nnx.merge(graphdef, state).segment(inputs, options)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encoder_jit(graphdef, state, inputs, options):
    return nnx.merge(graphdef, state).encode(inputs, options)
