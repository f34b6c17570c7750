"""SegGPT in Flax NNX: the encoder (:class:`SegGptModel`) and the painter (:class:`SegGptForImageSegmentation`).

Follows ``transformers.models.seggpt.modeling_seggpt`` (v4.39+ / v5) module by module (the modules are in
:mod:`seggpt_jax.nn.layers` and :mod:`seggpt_jax.nn.encoder`, the loss in :mod:`seggpt_jax.nn.loss`).
Activations are NHWC inside; the public call takes and returns NCHW arrays like transformers.

How a model computes (compute dtype, matmul precision, :class:`~seggpt_jax.RuntimeConfig`) is one
:class:`~seggpt_jax.nn.layers.ModelSettings`, fixed when the model is built and held by the model alone
(static data of its graph, handed to every layer through the call). ``with_settings``,
``with_runtime`` and ``astype`` return a new model over the same parameters; nothing changes a model
in place.

Known differences from transformers:

* ``embedding_type`` may also be given per sample (a list of names or 0/1 flags), as the original
  BAAI code's ``seg_type``; transformers takes one string for the whole batch.
* ``ensemble_mode="original"`` reproduces the BAAI code's feature ensemble (see
  :meth:`SegGptForImageSegmentation.__call__`); the default ``"transformers"`` is bit-for-bit
  transformers' behaviour, including its quirks.
* ``prompts_per_query`` generalises the ensemble to a batch of several queries (groups of
  consecutive samples); transformers always ensembles the whole batch.
* ``output_attentions=True`` is refused (the fast attention paths never hold the weights);
  ``hidden_dropout_prob`` is, as in transformers, unused.
* Inputs may be numpy, jax or torch arrays; outputs are jax arrays. ``return_dict=False`` and
  ``to_tuple()`` give transformers' tuples; ``model.eval()`` returns the model unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import SegGptConfig
from ..runtime import RuntimeConfig
from .encoder import ModelOutput, SegGptEncoder, SegGptEncoderOutput
from .inputs import ForwardOptions, prepare
from .layers import ModelSettings, SegGptDecoder, SegGptEmbeddings
from .loss import painter_loss, painter_loss_terms

Array = jax.Array
M = TypeVar("M", bound="_Model")

__all__ = ["SegGptEncoderOutput", "SegGptForImageSegmentation", "SegGptImageSegmentationOutput", "SegGptModel",
           "painter_loss", "painter_loss_terms"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegGptImageSegmentationOutput(ModelOutput):
    """``pred_masks``: ``[B, 3, H, W]`` painted canvas (NCHW, float32), prompt half on top. With labels,
    ``loss`` and ``loss_terms`` (its ``(sum, count)``, whose ratio it is: what gradient accumulation adds
    up, see :func:`~seggpt_jax.nn.loss.painter_loss_terms`)."""

    loss: Array | None = None
    pred_masks: Array | None = None
    hidden_states: tuple[Array, ...] | None = None
    intermediate_hidden_states: tuple[Array, ...] | None = None
    loss_terms: tuple[Array, Array] | None = None

    def to_tuple(self) -> tuple:
        """transformers' tuple (``return_dict=False``): those of ``loss, pred_masks, hidden_states`` that
        are set, in that order (``intermediate_hidden_states`` is ours, not in transformers' output)."""
        return tuple(value for value in (self.loss, self.pred_masks, self.hidden_states) if value is not None)

    def __getitem__(self, key: str | int | slice) -> Any:
        """``out["pred_masks"]``, or as transformers ``out[0]``: an index into :meth:`to_tuple`."""
        return self.to_tuple()[key] if isinstance(key, (int, slice)) else super().__getitem__(key)


def _nchw_to_nhwc(x: Array, dtype: Any) -> Array:
    return jnp.transpose(x, (0, 2, 3, 1)).astype(dtype)


class SegGptBackbone(nnx.Module):
    """The modules of transformers' ``SegGptModel`` (embeddings + encoder), without settings of their
    own: the painter's ``model`` (checkpoint paths ``model.embeddings...``, ``model.encoder...``)."""

    def __init__(self, config: SegGptConfig, *, param_dtype: Any, rngs: nnx.Rngs):
        self.embeddings = SegGptEmbeddings(config, param_dtype=param_dtype, rngs=rngs)
        self.encoder = SegGptEncoder(config, param_dtype=param_dtype, rngs=rngs)

    def encode(self, inputs: dict[str, Any], options: ForwardOptions, settings: ModelSettings) -> SegGptEncoderOutput:
        """Traceable forward on prepared inputs (see :func:`seggpt_jax.nn.inputs.prepare`)."""
        dt = settings.dtype
        second = inputs["labels"] if inputs.get("labels") is not None else inputs["prompt_masks"]
        pixel_canvas = jnp.concatenate([inputs["prompt_pixel_values"], inputs["pixel_values"]], axis=2)  # [B, 3, H, W]
        mask_canvas = jnp.concatenate([inputs["prompt_masks"], second], axis=2)
        embeddings = self.embeddings(_nchw_to_nhwc(pixel_canvas, dt), _nchw_to_nhwc(mask_canvas, dt),
                                     inputs["bool_masked_pos"], inputs["is_instance"], settings)  # [2B, h, w, C]
        return self.encoder(embeddings, settings, options, inputs.get("dropout_rng"), inputs.get("prompt_valid"))


class _Model:
    """What both model classes share: the settings, the new-model-with-other-settings methods, and the
    validated, jitted public call."""

    config: SegGptConfig
    settings: ModelSettings

    def _init_settings(self, config: Any, dtype: Any, precision: Any, runtime: Any,
                       settings: ModelSettings | None) -> None:
        if not isinstance(config, SegGptConfig):
            raise TypeError(f"config must be a SegGptConfig, got {type(config).__name__}")
        self.config = config
        if settings is None:
            settings = ModelSettings(dtype=dtype, precision=precision, runtime=runtime)
        elif not isinstance(settings, ModelSettings):
            raise TypeError(f"settings must be a ModelSettings, got {type(settings).__name__}")
        self.settings = settings

    def _construction(self) -> dict[str, Any]:
        """What building another copy of this model takes besides its config and settings (subclasses add
        their own, e.g. the processor of :class:`seggpt_jax.models.SegGptForImageSegmentation`)."""
        return {}

    def _run(self, *args: Any, output_attentions: bool | None, **kwargs: Any) -> Any:
        if output_attentions:
            raise ValueError("output_attentions=True is not supported: the fast attention paths never hold the "
                             "(heads, N, N) attention weights")
        inputs, options = prepare(self.config, *args, **kwargs)
        graphdef, state = nnx.split(self)
        return _forward_jit(graphdef, state, inputs, options)

    def eval(self: M) -> M:
        """For code written for transformers' ``model.eval()``: returns this model, unchanged (a call is
        inference unless it is given a ``dropout_rng``)."""
        return self

    def with_settings(self: M, *, shared: bool = False, **changes: Any) -> M:
        """A new model over the same parameter arrays with other settings: ``dtype=`` (compute dtype),
        ``precision=`` (matmul precision), ``runtime=`` (a :class:`RuntimeConfig`). This model's settings
        are unchanged; the new one compiles anew on its first call.

        By default the new model has its own Variables: updating one's parameters leaves the other's
        alone (a step that *donates* the arrays would invalidate both, as they start out the same
        arrays). With ``shared=True`` it is a view over this model's Variables: training the view trains
        this model, as :class:`~seggpt_jax.train.Trainer` does with its training settings."""
        settings = dataclasses.replace(self.settings, **changes)
        cls, config, extra = type(self), self.config, self._construction()
        abstract = nnx.eval_shape(lambda: cls(config, settings=settings, rngs=nnx.Rngs(0), **extra))
        graphdef, _ = nnx.split(abstract)  # the same structure, built with the new settings
        _, state = nnx.split(self)
        return nnx.merge(graphdef, state, copy=not shared)

    def with_runtime(self: M, runtime: RuntimeConfig | None = None, /, **changes: Any) -> M:
        """A new model with another :class:`RuntimeConfig`: the one given, or this model's with ``changes``
        (``attention=``, ``scan_layers=``, ``remat_policy=``)."""
        runtime = dataclasses.replace(self.settings.runtime if runtime is None else runtime, **changes)
        return self.with_settings(runtime=runtime)

    def astype(self: M, param_dtype: Any) -> M:
        """A new model with every parameter cast to ``param_dtype`` (the compute dtype is a setting)."""
        dtype = jnp.dtype(param_dtype)
        graphdef, state = nnx.split(self)
        return nnx.merge(graphdef, jax.tree.map(lambda value: value.astype(dtype), state))


class SegGptModel(_Model, SegGptBackbone):
    """The SegGPT encoder (embeddings + transformer), transformers' ``SegGptModel``; returns
    :class:`SegGptEncoderOutput`."""

    _checkpoint_prefix = "model."  # its parameters sit under ``model.`` in the full painter

    def __init__(self, config: SegGptConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 precision: Any = None, runtime: RuntimeConfig | None = None,
                 settings: ModelSettings | None = None, rngs: nnx.Rngs):
        self._init_settings(config, dtype, precision, runtime, settings)
        SegGptBackbone.__init__(self, config, param_dtype=param_dtype, rngs=rngs)

    def forward_prepared(self, inputs: dict[str, Any], options: ForwardOptions) -> SegGptEncoderOutput:
        """Traceable forward on prepared inputs (see :func:`seggpt_jax.nn.inputs.prepare`)."""
        return self.encode(inputs, options, self.settings)

    def __call__(self, pixel_values, prompt_pixel_values, prompt_masks, bool_masked_pos=None,
                 feature_ensemble: bool | None = False, embedding_type: Any = "instance", labels=None,
                 output_attentions: bool | None = None, output_hidden_states: bool | None = False,
                 return_dict: bool | None = None, *, ensemble_mode: str = "transformers",
                 prompts_per_query: int | None = None, dropout_rng: Array | None = None,
                 prompt_valid: Any = None) -> SegGptEncoderOutput | tuple:
        """Same arguments as :meth:`SegGptForImageSegmentation.__call__`; runs the jitted encoder.
        ``return_dict=False``: transformers' tuple, the set fields of ``last_hidden_state, hidden_states,
        intermediate_hidden_states``."""
        out = self._run(pixel_values, prompt_pixel_values, prompt_masks, bool_masked_pos, feature_ensemble,
                        embedding_type, labels, ensemble_mode, output_hidden_states, prompts_per_query, dropout_rng,
                        prompt_valid, output_attentions=output_attentions)
        if return_dict is None or return_dict:
            return out
        return tuple(value for value in (out.last_hidden_state, out.hidden_states, out.intermediate_hidden_states)
                     if value is not None)


class SegGptForImageSegmentation(_Model, nnx.Module):
    """SegGPT painter, transformers' ``SegGptForImageSegmentation``: encoder + decoder, with the
    smooth-L1 loss over masked patches."""

    def __init__(self, config: SegGptConfig, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 precision: Any = None, runtime: RuntimeConfig | None = None,
                 settings: ModelSettings | None = None, rngs: nnx.Rngs):
        self._init_settings(config, dtype, precision, runtime, settings)
        self.model = SegGptBackbone(config, param_dtype=param_dtype, rngs=rngs)
        self.decoder = SegGptDecoder(config, param_dtype=param_dtype, rngs=rngs)

    def forward_prepared(self, inputs: dict[str, Any], options: ForwardOptions) -> SegGptImageSegmentationOutput:
        """Traceable forward on prepared inputs (see :func:`seggpt_jax.nn.inputs.prepare`); the jitted
        ``__call__`` wraps this."""
        encoded = self.model.encode(inputs, options, self.settings)
        features = jnp.concatenate(encoded.intermediate_hidden_states, axis=-1)  # [B, h, w, C * taps]
        pred = self.decoder(features, self.settings).astype(jnp.float32)  # [B, H, W, 3]
        pred_masks = jnp.transpose(pred, (0, 3, 1, 2))  # NCHW like transformers
        loss = terms = None
        if inputs.get("labels") is not None:  # the loss, once: its terms and their ratio
            terms = painter_loss_terms(self.config, pred_masks, inputs["prompt_masks"], inputs["labels"],
                                       inputs["bool_masked_pos"], inputs.get("valid"))
            loss = terms[0] / terms[1]
        return SegGptImageSegmentationOutput(
            loss=loss, pred_masks=pred_masks, hidden_states=encoded.hidden_states,
            intermediate_hidden_states=encoded.intermediate_hidden_states, loss_terms=terms)

    def __call__(self, pixel_values, prompt_pixel_values, prompt_masks, bool_masked_pos=None,
                 feature_ensemble: bool | None = False, embedding_type: Any = "instance", labels=None,
                 output_attentions: bool | None = None, output_hidden_states: bool | None = False,
                 return_dict: bool | None = None, *, ensemble_mode: str = "transformers",
                 prompts_per_query: int | None = None, dropout_rng: Array | None = None,
                 prompt_valid: Any = None, valid: Any = None) -> SegGptImageSegmentationOutput | tuple:
        """Paint the query's mask. Arguments (in transformers' order) and layout follow
        ``transformers.SegGptForImageSegmentation``; ``None`` means the default, as there.

        Args:
            pixel_values, prompt_pixel_values, prompt_masks: ``[B, 3, H/2, W]`` normalised float
                arrays (numpy, jax or torch), NCHW, as ``SegGptImageProcessor`` returns them.
            bool_masked_pos: ``[1 or B, num_patches]`` patch flags for the mask canvas; default masks
                the query half (inference).
            feature_ensemble: average the query features over the prompts of the batch (few-shot;
                see :func:`seggpt_jax.nn.encoder.average_prompt_features`).
            embedding_type: ``"instance"``/``"semantic"``, or one per sample (names or 1/0 flags).
            labels: ``[B, 3, H/2, W]`` target masks; enables the smooth-L1 loss.
            output_attentions: only ``False``/``None`` (attention weights are never materialised).
            output_hidden_states: also return every layer's input and the final hidden state.
            return_dict: ``False`` returns :meth:`SegGptImageSegmentationOutput.to_tuple`, as transformers.
            ensemble_mode: ``"transformers"`` (default) or ``"original"``. They differ at the merge
                layer: transformers averages the query half over *both* streams there (image and
                mask), and does so even with a single prompt; the BAAI code averages within each
                stream up to and including the merge layer and does nothing with one prompt.
            prompts_per_query: with ``feature_ensemble``, the batch is groups of this many
                consecutive samples, one group per query (default: the whole batch is one query).
            dropout_rng: a PRNG key enables drop-path (training); ``None`` is inference.
            valid: with ``labels``, ``[B, 1 or 3, H, W]`` pixels of the mask canvas the loss counts (or
                ``[B, 1, H/2, W]`` of the query half), the BAAI code's validity mask; default: all.
            prompt_valid: with ``feature_ensemble``, ``[B]`` flags of the prompts that take part in
                their query's ensemble (default: all); a query with one valid prompt runs as without
                the ensemble. Padding groups with unused prompts then changes nothing, so a varying
                number of prompts runs as one compiled program.

        The forward is jitted once per input shapes and static switches; call it from inside
        ``jax.jit``/``nnx.jit``/``nnx.grad`` as well.
        """
        out = self._run(pixel_values, prompt_pixel_values, prompt_masks, bool_masked_pos, feature_ensemble,
                        embedding_type, labels, ensemble_mode, output_hidden_states, prompts_per_query, dropout_rng,
                        prompt_valid, valid, output_attentions=output_attentions)
        return out if return_dict is None or return_dict else out.to_tuple()


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward_jit(graphdef, state, inputs: dict[str, Any], options: ForwardOptions):
    """The one jitted entry point: ``graphdef`` (with the model's settings) and ``options`` are static."""
    return nnx.merge(graphdef, state).forward_prepared(inputs, options)
