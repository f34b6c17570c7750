"""The one mask rule (seggpt_jax.imaging.masks) on the masks people actually have, against transformers and
against hand-written expectations."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from seggpt_jax import SegGptForImageSegmentation, Segmenter
from seggpt_jax.data import FolderDataset
from seggpt_jax.imaging.decode import InputError
from seggpt_jax.imaging.masks import (ColourMap, binary_picture, build_palette, class_ids, foreground, prompt_picture,
                                      voc_colours)

try:
    from transformers import SegGptImageProcessorPil as HFProcessor
except ImportError:  # pragma: no cover
    from transformers import SegGptImageProcessor as HFProcessor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_IMAGE = os.path.join(REPO, "examples", "prompt.jpg")
EXAMPLE_MASK = os.path.join(REPO, "examples", "prompt_mask.png")  # RGB, anti-aliased grey edges


def _antialiased_rgb_mask(height=60, width=80):
    """White disc on black, its edge in grey levels, plus the odd coloured edge pixel as real exports have."""
    ys, xs = np.mgrid[:height * 4, :width * 4]
    disc = ((ys - height * 2) ** 2 + (xs - width * 2) ** 2 < (height * 1.4) ** 2).astype(np.float64)
    levels = disc.reshape(height, 4, width, 4).mean(axis=(1, 3)) * 255
    mask = np.repeat(np.round(levels).astype(np.uint8)[..., None], 3, axis=-1)
    mask[5, 5] = (4, 59, 62)
    return mask


def test_example_mask_has_grey_edges():
    levels = np.unique(np.asarray(Image.open(EXAMPLE_MASK)))
    assert Image.open(EXAMPLE_MASK).mode == "RGB" and len(levels) > 5  # not just 0/255


@pytest.mark.parametrize("source", ["example", "synthetic"])
def test_binary_mode_feeds_the_levels_transformers_feeds_with_do_convert_rgb_false(hf_tiny, source):
    """The same prompt inputs as transformers' processor with do_convert_rgb=False, and the same pred_masks
    as transformers' model on them (the BAAI code reads the mask the same way: convert("RGB"), nearest)."""
    hf, path = hf_tiny("nonsquare")
    model = SegGptForImageSegmentation.from_pretrained(path)
    if source == "example":
        prompt, mask = Image.open(EXAMPLE_IMAGE).convert("RGB"), Image.open(EXAMPLE_MASK)
    else:
        mask = Image.fromarray(_antialiased_rgb_mask())
        prompt = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    query = Image.fromarray(np.random.default_rng(2).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    segmenter = Segmenter(model)
    hf_processor = HFProcessor(size={"height": 32, "width": 32})
    reference = hf_processor(images=query, prompt_images=prompt, prompt_masks=mask, do_convert_rgb=False,
                             return_tensors="pt")
    image_in, mask_in = _prompt_inputs(segmenter, prompt, mask)
    np.testing.assert_array_equal(mask_in, reference["prompt_masks"][0].numpy())
    np.testing.assert_array_equal(image_in, reference["prompt_pixel_values"][0].numpy())
    with torch.no_grad():
        theirs = hf(**reference, embedding_type="instance").pred_masks.numpy()
    ours = model(reference["pixel_values"].numpy(), image_in[None], mask_in[None], embedding_type="instance")
    np.testing.assert_allclose(np.asarray(ours.pred_masks), theirs, atol=1e-5)
    result = segmenter.segment(query, prompts=(prompt, mask))  # and the whole path agrees with them
    painted = hf_processor.post_process_semantic_segmentation(
        type("Out", (), {"pred_masks": torch.from_numpy(theirs)})(), target_sizes=[(50, 70)], num_labels=1)[0]
    assert np.mean(result.mask == (painted.numpy() == 1)) > 0.999


def _prompt_inputs(segmenter, image, mask):
    from seggpt_jax.inference.prompts import Prompt, PromptPreparer

    return PromptPreparer(segmenter.processor, None)(Prompt(image, mask))


def test_binary_levels_of_every_kind_of_mask():
    on = np.zeros((6, 8), bool)
    on[2:4, 3:6] = True
    white = np.where(on[..., None], 255, 0).astype(np.uint8).repeat(3, -1)
    np.testing.assert_array_equal(binary_picture(on), white)  # bool
    np.testing.assert_array_equal(binary_picture(on.astype(np.int64)), white)  # 0/1 labels
    np.testing.assert_array_equal(binary_picture(Image.fromarray(on.astype(np.uint8))), white)  # 0/1 PNG
    np.testing.assert_array_equal(binary_picture(on.astype(np.float32)), white)  # float 0/1
    sixteen = Image.fromarray(on.astype(np.uint16) * 65535)
    np.testing.assert_array_equal(binary_picture(sixteen), white)  # 16-bit
    grey = np.where(on, 200, 0).astype(np.uint8)
    np.testing.assert_array_equal(binary_picture(Image.fromarray(grey, "L")), np.repeat(grey[..., None], 3, -1))
    palette = Image.fromarray(on.astype(np.uint8), "P")
    palette.putpalette([0, 0, 0, 192, 128, 128] + [0] * 762)
    expected = np.where(on[..., None], np.uint8([192, 128, 128]), np.uint8(0))
    np.testing.assert_array_equal(binary_picture(palette), expected)  # through its palette, as convert("RGB")
    soft = _antialiased_rgb_mask()
    np.testing.assert_array_equal(binary_picture(soft), soft)  # RGB as given
    with pytest.raises(InputError, match="has labels up to 300; without num_labels"):
        binary_picture(np.full((4, 4), 300))


def test_semantic_class_id_maps_in_every_form_agree():
    ids = np.random.default_rng(0).integers(0, 4, (20, 30))
    expected = ids
    for form in (ids, Image.fromarray(ids.astype(np.uint8), "L"), Image.fromarray(ids.astype(np.uint16)),
                 np.repeat(ids[..., None], 3, -1).astype(np.uint8),  # grey RGB, R = G = B
                 Image.fromarray(np.repeat(ids[..., None], 3, -1).astype(np.uint8)),
                 np.asarray(build_palette(3), np.uint8)[ids],  # palette colours
                 ids[None]):  # [1, H, W]
        np.testing.assert_array_equal(class_ids(form, 3), expected)
    palette_png = Image.fromarray(ids.astype(np.uint8), "P")
    palette_png.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    np.testing.assert_array_equal(class_ids(palette_png, 3), expected)  # indices are the classes
    np.testing.assert_array_equal(prompt_picture(np.repeat(ids[..., None], 3, -1).astype(np.uint8), 3),
                                  prompt_picture(ids, 3))


def test_voc_coloured_masks_fail_naming_colours_or_read_through_a_colour_map(tmp_path):
    colours = voc_colours(21)
    assert colours[:4] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)] and colours[15] == (192, 128, 128)
    ids = np.zeros((30, 40), np.int64)
    ids[5:15, 5:20] = 15  # person
    ids[20:28, 10:35] = 8  # cat
    rgb = np.asarray(colours, np.uint8)[ids]
    rgb[29, :] = (224, 224, 192)  # the void border
    with pytest.raises(InputError, match=r"colours that are neither class ids .* nor in the 20-label palette: "
                                         r"\(64, 0, 0\) \(200 px\), \(192, 128, 128\) \(150 px\).*colour_map"):
        class_ids(rgb, 20)
    expected = ids.copy()
    np.testing.assert_array_equal(class_ids(rgb, 20, colour_map="voc"), expected)
    mapping = tmp_path / "colours.json"
    mapping.write_text('{"0,0,0": 0, "#C08080": 1, "64, 0, 0": 2, "(224,224,192)": 0}')
    np.testing.assert_array_equal(class_ids(rgb, 2, colour_map=str(mapping)), np.where(ids == 15, 1, ids // 4))
    with pytest.raises(InputError, match=r"has colours that the colour map does not list: \(64, 0, 0\) \(200 px\)"):
        class_ids(rgb, 2, colour_map={(0, 0, 0): 0, (192, 128, 128): 1, (224, 224, 192): 0})
    with pytest.raises(ValueError, match="cannot read colour '300,0'"):
        ColourMap({"300,0": 1})
    palette_voc = Image.fromarray(ids.astype(np.uint8), "P")  # VOC as shipped: palette indices = classes
    palette_voc.putpalette([v for c in voc_colours() for v in c])
    np.testing.assert_array_equal(class_ids(palette_voc, 20), ids)


def test_foreground_reads_the_shape_a_mask_draws():
    on = np.zeros((10, 12), bool)
    on[2:8, 3:9] = True
    for mask in (on, on.astype(np.uint8), on.astype(np.uint8) * 255, Image.fromarray(on.astype(np.uint16) * 65535),
                 np.where(on[..., None], np.uint8([200, 0, 0]), np.uint8(0)),  # a red mask
                 np.where(on[..., None], np.uint8([64, 0, 0]), np.uint8(0))):  # VOC's cat, dark
        np.testing.assert_array_equal(foreground(mask), on)
    soft = _antialiased_rgb_mask()
    np.testing.assert_array_equal(foreground(soft), soft.max(-1) >= 128)
    assert not foreground(np.zeros((4, 4), np.uint8)).any()


def test_datasets_read_masks_by_the_same_rule(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    soft = _antialiased_rgb_mask()
    Image.fromarray(np.zeros((60, 80, 3), np.uint8)).save(root / "images" / "a.jpg")
    Image.fromarray(soft).save(root / "masks" / "a.png")
    dataset = FolderDataset(root).validate()
    _, labels = dataset.load(dataset[0])
    np.testing.assert_array_equal(labels, (soft.max(-1) >= 128).astype(np.int64))
    voc = np.asarray(voc_colours(21), np.uint8)[np.where(soft[..., 0] > 127, 12, 0)]  # VOC's dog
    Image.fromarray(voc).save(root / "masks" / "a.png")
    with pytest.raises(Exception, match=r"\(64, 0, 128\)"):
        FolderDataset(root, num_labels=20).validate()
    dataset = FolderDataset(root, num_labels=20, colour_map="voc").validate()
    np.testing.assert_array_equal(dataset.load(dataset[0])[1], np.where(soft[..., 0] > 127, 12, 0))


def test_prompt_warnings_read_the_shape_as_the_datasets_and_metrics_do():
    """A binary prompt is "empty" or "the whole image" exactly when masks.foreground (the targets' and
    the metrics' reading) finds no pixel or every pixel: one rule for a mask's shape."""
    import warnings as _warnings

    from seggpt_jax.imaging.masks import MaskWarning

    on = np.zeros((10, 12), np.uint8)
    on[2:8, 3:9] = 1
    alpha = np.zeros((10, 12, 4), np.uint8)
    alpha[..., 3] = on * 255  # the shape only in the alpha channel
    cases = {
        "0/1": on, "0/255": on * 255, "anti-aliased": _antialiased_rgb_mask(), "16-bit": Image.fromarray(
            on.astype(np.uint16) * 65535), "alpha only": Image.fromarray(alpha, "RGBA"),
        "red": np.where(on[..., None] > 0, np.uint8([200, 0, 0]), np.uint8(0)),
        "all black": np.zeros((10, 12), np.uint8), "flat white": np.full((10, 12), 255, np.uint8),
        "everything, two levels": np.where(on > 0, 255, 200).astype(np.uint8),  # not flat, all foreground
        "dim background, bright shape": np.where(on > 0, 255, 100).astype(np.uint8),
    }
    for name, mask in cases.items():
        shape = foreground(mask)
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            prompt_picture(mask, what=name)
        said = " ".join(str(w.message) for w in caught if issubclass(w.category, MaskWarning))
        assert ("is empty" in said) == (not shape.any()), (name, said)
        assert ("the whole image" in said) == bool(shape.all()), (name, said)
