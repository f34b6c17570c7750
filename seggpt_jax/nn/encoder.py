"""SegGPT's transformer encoder: layer scheduling (merge layer, decoder taps, scan) and the prompt-feature
ensemble. Follows transformers' ``SegGptEncoder``; known difference: :func:`average_prompt_features`
also offers the BAAI code's ensemble and groups of prompts per query.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import SegGptConfig
from ..runtime import remat_policy
from .inputs import ForwardOptions
from .layers import LayerNorm, ModelSettings, SegGptLayer
from .ops import remat

Array = jax.Array


class ModelOutput:
    """Attribute and ``out["name"]`` access, like transformers' ``ModelOutput``."""

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str):
            raise TypeError("outputs are indexed by field name, e.g. out['pred_masks']")
        return getattr(self, key)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegGptEncoderOutput(ModelOutput):
    """``last_hidden_state``: ``[B, rows, cols, hidden]``. ``hidden_states`` (on request): the input
    of every layer and the final output (``2B`` rows up to the merge layer, ``B`` after).
    ``intermediate_hidden_states``: the final-LayerNormed taps, in layer order."""

    last_hidden_state: Array
    hidden_states: tuple[Array, ...] | None = None
    intermediate_hidden_states: tuple[Array, ...] | None = None


def average_prompt_features(x: Array, layer: int, merge_index: int, *, mode: str, prompts: int,
                            valid: Array | None = None) -> Array:
    """The feature ensemble: average the query half of the attention output over the prompts of each query.

    ``x: [n, rows, cols, C]`` with ``n = 2B`` (image stream, then mask stream) up to the merge layer
    and ``n = B`` after it; the batch holds groups of ``prompts`` consecutive samples per query.

    * ``"transformers"``: layers before the merge average within each stream (only with >= 2
      prompts); the merge layer itself averages over *both* streams, even with a single prompt;
      later layers average over the prompts (>= 2 prompts).
    * ``"original"`` (BAAI ``Block.forward`` with ``merge_between_batch=0``): layers up to and
      including the merge average within each stream, later layers over the prompts; nothing at
      all with a single prompt.

    ``valid`` (``[B]`` bool, one flag per sample of one stream): only the valid prompts of each query
    are averaged, and a query with a single valid prompt is left as it would be without the ensemble,
    so that padding a group with unused prompts changes nothing (the video procedure's growing context
    runs as one program).
    """
    streams = 2 if layer <= merge_index else 1
    merge_layer_quirk = mode == "transformers" and layer == merge_index
    if prompts < 2 and not merge_layer_quirk:
        return x
    half = x.shape[1] // 2
    top, bottom = x[:, :half], x[:, half:]  # prompt rows, query rows
    groups = x.shape[0] // streams // prompts
    grouped = bottom.reshape((streams, groups, prompts) + bottom.shape[1:])  # [s, g, p, h/2, w, C]
    axes = (0, 2) if merge_layer_quirk else (2,)
    if valid is None:
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        bottom = jnp.broadcast_to(mean, grouped.shape).reshape(bottom.shape)
    else:
        weights = valid.astype(x.dtype).reshape((1, groups, prompts, 1, 1, 1))
        count = jnp.sum(jnp.broadcast_to(weights, (streams, groups, prompts, 1, 1, 1)), axis=axes, keepdims=True)
        mean = jnp.sum(grouped * weights, axis=axes, keepdims=True) / count
        several = jnp.sum(weights, axis=2, keepdims=True) >= 2  # [1, g, 1, 1, 1, 1]
        bottom = jnp.where(several, jnp.broadcast_to(mean, grouped.shape), grouped).reshape(bottom.shape)
    return jnp.concatenate([top, bottom], axis=1)


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
    """transformers' ``SegGptEncoder``: the layers, the merge of the two streams after ``merge_index``,
    and the final LayerNorm applied to every decoder tap.

    Layers run segment by segment (:func:`layer_segments`); with ``runtime.scan_layers`` a segment of
    several layers is one ``lax.scan`` over their weights, stacked for the scan in each forward (see
    :class:`~seggpt_jax.RuntimeConfig` for what that costs).
    """

    def __init__(self, config: SegGptConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        self.config = config
        self.layers = nnx.List([SegGptLayer(config, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, param_dtype=param_dtype)

    def __call__(self, x: Array, settings: ModelSettings, options: ForwardOptions,
                 dropout_rng: Array | None = None, prompt_valid: Array | None = None) -> SegGptEncoderOutput:
        # x: [2B, h, w, C]
        config = self.config
        merge, taps = config.merge_index, set(config.intermediate_hidden_state_indices)
        rates = jnp.asarray(config.drop_path_rates(), jnp.float32)  # [layers]
        keys = None
        if dropout_rng is not None:
            keys = jax.random.split(dropout_rng, 2 * len(self.layers)).reshape(len(self.layers), 2)
        prompts = options.prompts_per_query or x.shape[0] // 2  # x holds both streams until the merge
        hidden_states, intermediate = [], []
        for start, stop in layer_segments(len(self.layers), merge, taps):
            ensemble = None
            if options.feature_ensemble:
                ensemble = functools.partial(average_prompt_features, layer=start, merge_index=merge,
                                             mode=options.ensemble_mode, prompts=prompts, valid=prompt_valid)
            x, inputs = self._run_layers(x, settings, start, stop, ensemble, rates, keys,
                                         options.output_hidden_states)
            hidden_states += inputs
            if stop - 1 == merge:
                half = x.shape[0] // 2
                x = (x[:half] + x[half:]) * jnp.asarray(0.5, x.dtype)  # [B, h, w, C]
            if stop - 1 in taps:
                intermediate.append(self.layernorm(x))
        if options.output_hidden_states:
            hidden_states.append(x)
        return SegGptEncoderOutput(
            last_hidden_state=x,
            hidden_states=tuple(hidden_states) if options.output_hidden_states else None,
            intermediate_hidden_states=tuple(intermediate),
        )

    def _run_layers(self, x: Array, settings: ModelSettings, start: int, stop: int, ensemble, rates: Array,
                    keys: Array | None, collect: bool) -> tuple[Array, list[Array]]:
        """Layers ``[start, stop)``, unrolled or as one ``lax.scan``; also returns each layer's input.

        With a remat policy each layer is one :func:`~seggpt_jax.nn.ops.remat` call over its parameters:
        the backward pass recomputes it from what the policy saves, one layer at a time."""
        plan = settings.plan
        splits = [nnx.split(self.layers[i]) for i in range(start, stop)]
        graphdef = splits[0][0]  # every layer has the same graph

        def apply(state: nnx.State, h: Array, rate: Array, layer_keys: Array | None) -> Array:
            return nnx.merge(graphdef, state)(h, settings, ensemble=ensemble, drop_rate=rate,
                                              keys=(None, None) if layer_keys is None else (layer_keys[0],
                                                                                            layer_keys[1]))

        if plan.remat_policy is not None:
            apply = remat(apply, remat_policy(plan.remat_policy))
        if not plan.scan_layers or stop - start == 1:
            inputs = []
            for i, (_, state) in zip(range(start, stop), splits):
                if collect:
                    inputs.append(x)
                x = apply(state, x, rates[i], None if keys is None else keys[i])
            return x, inputs

        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(state for _, state in splits))  # [n, ...]
        xs = (stacked, rates[start:stop], None if keys is None else keys[start:stop])

        def body(h, step):
            state, rate, layer_keys = step
            return apply(state, h, rate, layer_keys), (h if collect else None)

        x, inputs = jax.lax.scan(body, x, xs)
        return x, (list(inputs) if collect else [])
