"""The high-level Segmenter: equal to the explicit pipeline, bounded compilations, the video procedure."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import pytest
import torch
from conftest import moving_square_clip
from PIL import Image

from seggpt_jax import Prompt, RuntimeConfig, SegGptForImageSegmentation, SegGptImageProcessor, Segmenter
from seggpt_jax.inference.prompts import normalise_prompts

try:
    from transformers import SegGptImageProcessorPil as HFProcessor
except ImportError:  # pragma: no cover
    from transformers import SegGptImageProcessor as HFProcessor


@contextlib.contextmanager
def count_compilations():
    """Counts XLA backend compilations (real ones, not cache hits) inside the block."""
    count = [0]

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        from jax._src import monitoring

        monitoring.unregister_event_duration_listener(listener)


def _image(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _labels(height, width, num_labels, seed):
    return np.random.default_rng(seed).integers(0, num_labels + 1, (height, width))


@pytest.fixture(scope="module")
def tiny(hf_tiny):
    hf, path = hf_tiny("nonsquare")
    return hf, path, SegGptForImageSegmentation.from_pretrained(path)


def test_three_prompts_equal_the_model_with_feature_ensemble(tiny):
    _, _, model = tiny
    segmenter = Segmenter(model)
    query = _image(50, 70, 1)
    prompts = [(_image(40, 30 + i, 2 + i), _labels(40, 30 + i, 3, 5 + i)) for i in range(3)]
    result = segmenter.segment(query, prompts=prompts, num_labels=3, return_scores=True)

    processor = SegGptImageProcessor(size=model.config.query_size)
    inputs = processor(images=[query] * 3, prompt_images=[p for p, _ in prompts], prompt_masks=[m for _, m in prompts],
                       num_labels=3, return_tensors="np")
    out = model(**inputs, feature_ensemble=True, embedding_type="semantic")
    direct = processor.post_process_semantic_segmentation(out, target_sizes=[(50, 70)] * 3, num_labels=3,
                                                          return_segmentation_scores=True)[0]
    np.testing.assert_array_equal(result.mask, direct["segmentation"])
    np.testing.assert_array_equal(result.scores, direct["segmentation_scores"])
    assert result.mask.shape == (50, 70) and result.painted.shape == (50, 70, 3) and result.size == (50, 70)


def test_end_to_end_against_transformers_pipeline(tiny):
    """Our processor + model + post-processing vs transformers' on the same files and weights."""
    hf, _, model = tiny
    query, prompt = _image(90, 60, 3), _image(64, 64, 4)
    mask = _labels(64, 64, 5, 6)
    ours = Segmenter(model).segment(query, prompts=(prompt, mask), num_labels=5)
    hf_processor = HFProcessor(size={"height": 32, "width": 32})
    inputs = hf_processor(Image.fromarray(query), prompt_images=Image.fromarray(prompt), prompt_masks=mask,
                          num_labels=5, return_tensors="pt")
    with torch.no_grad():
        out = hf(**inputs, embedding_type="semantic")
    theirs = hf_processor.post_process_semantic_segmentation(out, target_sizes=[(90, 60)], num_labels=5)[0].numpy()
    assert np.mean(ours.mask == theirs) > 0.999


def test_folder_of_mixed_sizes_compiles_at_most_twice(tiny):
    _, path, _ = tiny
    # a runtime no other test uses, so that this test's compilations are all new and can be counted
    model = SegGptForImageSegmentation.from_pretrained(path, runtime=RuntimeConfig(attention="plain", scan_layers=True))
    segmenter = Segmenter(model, batch_size=4)
    queries = [_image(20 + 13 * i, 90 - 7 * i, 10 + i) for i in range(9)]  # batches of 4, 4 and 1
    prompt = (_image(30, 30, 40), _labels(30, 30, 1, 41) > 0)
    with count_compilations() as compiled:
        results = segmenter.segment(queries, prompts=prompt)
    assert compiled[0] == 2, f"{compiled[0]} compilations"
    assert segmenter.shapes_run == {(4, 1), (1, 1)}
    assert [r.mask.shape for r in results] == [q.shape[:2] for q in queries]
    assert all(r.mask.dtype == bool for r in results)
    with count_compilations() as again:  # the same shapes again: nothing new to compile
        segmenter.segment(queries[:3] + queries[:6], prompts=prompt)
    assert again[0] == 0


def test_queries_with_their_own_prompts_and_types(tiny):
    _, _, model = tiny
    segmenter = Segmenter(model, batch_size=4)
    a, b = (_image(30, 40, 50), _labels(30, 40, 2, 51)), (_image(44, 28, 52), _labels(44, 28, 2, 53))
    queries = [_image(33, 33, 60 + i) for i in range(3)]
    per_query = [[a], [a, b], [b]]
    together = segmenter.segment(queries, prompts=per_query, num_labels=2,
                                 embedding_type=["semantic", "instance", "semantic"])
    for query, prompts, kind, result in zip(queries, per_query, ["semantic", "instance", "semantic"], together):
        alone = segmenter.segment(query, prompts=prompts, num_labels=2, embedding_type=kind)
        np.testing.assert_array_equal(result.mask, alone.mask)
    assert (2, 2) in segmenter.shapes_run


def test_prompt_forms():
    p = ("img.png", "mask.png")
    assert normalise_prompts(p, 2) == [[Prompt(*p)]] * 2
    assert normalise_prompts([p, p], 1) == [[Prompt(*p), Prompt(*p)]]
    assert normalise_prompts([[p], [p, p]], 2) == [[Prompt(*p)], [Prompt(*p), Prompt(*p)]]
    with pytest.raises(ValueError, match="cannot read prompts"):
        normalise_prompts([[p], [p]], 3)
    with pytest.raises(ValueError, match="prompts must be"):
        normalise_prompts([], 1)


def test_segmenter_errors(tiny):
    _, _, model = tiny
    segmenter = Segmenter(model)
    query, prompt = _image(20, 20, 70), _image(20, 20, 71)
    with pytest.raises(ValueError, match=r"prompt mask \(ndarray of shape \(20, 20\)\) has labels \[4\] above num_labels=3"):
        segmenter.segment(query, prompts=(prompt, np.full((20, 20), 4)), num_labels=3)
    with pytest.raises(ValueError, match="semantic mode needs num_labels"):
        segmenter.segment(query, prompts=(prompt, np.zeros((20, 20))), binary=False)
    with pytest.raises(ValueError, match="embedding_type must be"):
        segmenter.segment(query, prompts=(prompt, np.zeros((20, 20))), embedding_type="panoptic")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Segmenter(model, batch_size=0)
    with pytest.warns(UserWarning, match="prompt mask .* is 10x20 but its image is 20x20"):
        segmenter.segment(query, prompts=(prompt, np.zeros((20, 10))))


class _Recorder:
    """Wraps a model and keeps the prompt arrays of every call."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.config = model.config

    def __call__(self, pixel_values, prompt_pixel_values, prompt_masks, **kwargs):
        out = self.model(pixel_values, prompt_pixel_values, prompt_masks, **kwargs)
        self.calls.append(dict(pixel_values=pixel_values, prompt_pixel_values=prompt_pixel_values,
                               prompt_masks=prompt_masks, pred=np.asarray(out.pred_masks), **kwargs))
        return out


@pytest.mark.parametrize("context", [0, 2])
def test_video_context_cache(tiny, context):
    _, _, model = tiny
    recorder = _Recorder(model)
    segmenter = Segmenter(model)
    segmenter.model = recorder
    clip, mask = moving_square_clip(6, (48, 64), step=6)
    results = list(segmenter.segment_video(clip, (clip[0], mask), context_frames=context))
    assert len(results) == len(clip) and all(r.mask.shape == (48, 64) for r in results)
    processor = segmenter.processor
    first_image = processor(prompt_images=clip[0], return_tensors="np")["prompt_pixel_values"][0]
    slots = context + 1  # every frame runs with the same number of prompt slots: one compiled program
    for t, call in enumerate(recorder.calls):
        count = 1 + min(t, context)
        assert call["prompt_pixel_values"].shape[0] == slots, t
        assert call["feature_ensemble"] == (slots > 1) and call["ensemble_mode"] == "original"
        if slots > 1:  # the slots the first frames cannot fill yet are masked out of the ensemble ...
            np.testing.assert_array_equal(call["prompt_valid"], np.arange(slots) < count)
            unpadded = model(call["pixel_values"][:count], call["prompt_pixel_values"][:count],
                             call["prompt_masks"][:count], feature_ensemble=count > 1, ensemble_mode="original")
            # ... which gives what the frame's prompts alone give
            np.testing.assert_allclose(call["pred"][0], np.asarray(unpadded.pred_masks)[0], atol=1e-5)
        np.testing.assert_array_equal(call["prompt_pixel_values"][0], first_image)
        for j in range(1, count):  # the previous frames, oldest first, with their binarised predictions
            source = t - (count - j)
            previous = recorder.calls[source]
            np.testing.assert_array_equal(call["prompt_pixel_values"][j], previous["pixel_values"][0])
            painted = (previous["pred"][0, :, 32:] * np.float32([.229, .224, .225])[:, None, None]
                       + np.float32([.485, .456, .406])[:, None, None]) * 255
            expected = np.repeat((np.clip(painted, 0, 255).mean(0) > 128)[None], 3, 0)
            normalised = (expected.astype(np.float32) - np.float32([.485, .456, .406])[:, None, None]) \
                / np.float32([.229, .224, .225])[:, None, None]
            np.testing.assert_allclose(call["prompt_masks"][j], normalised, atol=1e-6)
    with pytest.raises(ValueError, match="context_frames must be a non-negative integer"):
        list(segmenter.segment_video(clip, (clip[0], mask), context_frames=-1))
