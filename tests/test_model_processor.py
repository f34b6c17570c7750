"""One processor per model: a checkpoint whose preprocessor_config.json sets non-default options is
processed its way by the Segmenter, the Trainer, prompt tuning, export and the command line."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from seggpt_jax import SegGptForImageSegmentation, SegGptImageProcessor, Segmenter
from seggpt_jax.cli import main
from seggpt_jax.data import FolderDataset
from seggpt_jax.imaging.processor import default_processor, processor_for
from seggpt_jax.train.prompt_tuning import PromptTuningConfig, QueryBatches, tune_prompt
from seggpt_jax.train.trainer import EpisodeBatches, Trainer, TrainConfig
from seggpt_jax_testing.synthetic import write_synthetic_folder

#: Non-default processing: another normalisation and another resampling filter.
CUSTOM = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "resample": int(Image.Resampling.BILINEAR),
          "image_processor_type": "SegGptImageProcessor"}


@pytest.fixture(scope="module")
def checkpoints(hf_tiny, tmp_path_factory):
    """The same weights twice: with the default processing, and with CUSTOM in preprocessor_config.json."""
    _, plain = hf_tiny("nonsquare")
    custom = tmp_path_factory.mktemp("custom-processing")
    for name in os.listdir(plain):
        shutil.copy(os.path.join(plain, name), custom / name)
    (custom / "preprocessor_config.json").write_text(json.dumps(CUSTOM))
    return plain, str(custom)


def _expected(model) -> SegGptImageProcessor:
    height, width = model.config.query_size
    return SegGptImageProcessor(**{k: v for k, v in CUSTOM.items() if k != "image_processor_type"},
                                size={"height": height, "width": width})


def test_every_consumer_takes_the_checkpoints_processor(checkpoints, tmp_path):
    plain_path, custom_path = checkpoints
    model = SegGptForImageSegmentation.from_pretrained(custom_path)
    expected = _expected(model)
    assert model.processor == expected != default_processor(model.config)
    assert SegGptForImageSegmentation.from_pretrained(plain_path).processor == default_processor(model.config)
    assert processor_for(model) == expected
    assert Segmenter(model).processor == expected
    data = FolderDataset(write_synthetic_folder(tmp_path / "data", 3, size=(32, 32))).validate()
    assert EpisodeBatches(data, model, batch_size=2).processor == expected
    assert QueryBatches(data, model, batch_size=2, seed=0).processor == expected
    trainer = Trainer(model, TrainConfig(steps=1, batch_size=2, warmup_steps=0), batches=EpisodeBatches(data, model))
    assert trainer.model.processor == expected  # the training view keeps it, and so does a saved checkpoint
    trainer.model.save_pretrained(tmp_path / "saved")
    assert SegGptForImageSegmentation.from_pretrained(tmp_path / "saved").processor == expected
    assert model.with_runtime(attention="plain").processor == expected
    assert model.export(1).processor == expected
    # prompt tuning starts from examples put through the model's processor
    prompt = tune_prompt(model, data, PromptTuningConfig(steps=1, batch_size=1, init="examples", augment=False))
    image, labels = data.load(data[0])
    mask, _ = data.mask_picture(labels)
    reference = expected(prompt_images=image, prompt_masks=mask, do_convert_rgb=False, return_tensors="np")
    assert not np.allclose(prompt.prompt_pixel_values[0], default_processor(model.config)(
        prompt_images=image, return_tensors="np")["prompt_pixel_values"][0])  # the custom processing matters here
    assert prompt.prompt_pixel_values.shape == reference["prompt_pixel_values"].shape


def test_the_segmenter_and_the_command_line_answer_with_the_checkpoints_processing(checkpoints, tmp_path, capsys):
    plain_path, custom_path = checkpoints
    rng = np.random.default_rng(0)
    query = tmp_path / "q.png"
    Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)).save(query)
    prompt = tmp_path / "p.png"
    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(prompt)
    mask = np.zeros((30, 30), np.uint8)
    mask[5:20, 8:25] = 255
    Image.fromarray(mask, "L").save(tmp_path / "m.png")
    model = SegGptForImageSegmentation.from_pretrained(custom_path)
    painted = Segmenter(model).segment(str(query), (str(prompt), str(tmp_path / "m.png"))).painted_small
    # by hand: the model's forward on inputs processed the checkpoint's way
    processor = _expected(model)
    inputs = processor(images=str(query), prompt_images=str(prompt), prompt_masks=str(tmp_path / "m.png"),
                       return_tensors="np")
    out = np.asarray(model(**inputs).pred_masks)[0, :, model.config.query_size[0]:]
    by_hand = np.clip((out * np.float32(CUSTOM["image_std"])[:, None, None]
                       + np.float32(CUSTOM["image_mean"])[:, None, None]) * 255, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(painted, by_hand.transpose(1, 2, 0))
    plain = Segmenter(SegGptForImageSegmentation.from_pretrained(plain_path)).segment(
        str(query), (str(prompt), str(tmp_path / "m.png"))).painted_small
    assert not np.array_equal(plain, painted)  # the processing made a difference
    for name, path in (("custom", custom_path), ("plain", plain_path)):
        assert main(["segment", str(query), "--prompt-image", str(prompt), "--prompt-mask", str(tmp_path / "m.png"),
                     "--out-dir", str(tmp_path / name), "--model", path]) == 0
    capsys.readouterr()
    written = np.asarray(Image.open(tmp_path / "custom" / "q.png_mask.png")) > 0
    expected = Segmenter(model).segment(str(query), (str(prompt), str(tmp_path / "m.png"))).mask
    np.testing.assert_array_equal(written, expected)
