"""SegGptImageProcessor against transformers' SegGptImageProcessorPil on the same inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from seggpt_jax import ModelNotFoundError
from seggpt_jax.imaging.processor import SegGptImageProcessor, build_palette, nearest_colours

try:
    from transformers import SegGptImageProcessorPil as HFProcessor
except ImportError:  # pragma: no cover - transformers 4.x has only one processor
    from transformers import SegGptImageProcessor as HFProcessor
from transformers.models.seggpt.image_processing_pil_seggpt import build_palette as hf_build_palette

OURS, THEIRS = SegGptImageProcessor(), HFProcessor()
RNG = np.random.default_rng(0)


def _rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def ours(**kwargs):
    return OURS(return_tensors="np", **kwargs)


def theirs(**kwargs):
    images = kwargs.pop("images", None)
    return {k: np.asarray(v) for k, v in THEIRS(images, return_tensors="np", **kwargs).items()}


def assert_same(a: dict, b: dict, keys=None):
    for key in keys or b:
        assert a[key].shape == b[key].shape, key
        assert a[key].dtype == np.float32
        np.testing.assert_allclose(a[key], b[key], atol=1e-6, rtol=0, err_msg=key)


@pytest.mark.parametrize("size", [(1, 1), (1, 300), (300, 1), (2, 7), (448, 448), (333, 500), (4000, 3), (20, 4000),
                                  (1200, 1600), (4000, 2600)])
def test_rgb_images_of_every_size(size):
    image = _rgb(*size, seed=size[0] * 7 + size[1])
    pil = Image.fromarray(image)
    reference = theirs(images=pil, prompt_images=[pil, pil])
    for variant, fmt in ((pil, None), (image, None), (image.transpose(2, 0, 1), "channels_first")):
        assert_same(ours(images=variant, prompt_images=[variant, variant], input_data_format=fmt), reference)


def test_paths_and_batches(tmp_path):
    images = [_rgb(40, 60, 1), _rgb(90, 30, 2), _rgb(17, 17, 3)]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    reference = theirs(images=[Image.fromarray(x) for x in images])
    assert_same(ours(images=[str(p) for p in paths]), reference)
    assert_same(ours(images=np.stack([images[2]] * 2)), theirs(images=[Image.fromarray(images[2])] * 2))
    assert_same(ours(images=torch.from_numpy(images[0].transpose(2, 0, 1).copy())),
                theirs(images=Image.fromarray(images[0])))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "YCbCr", "1", "I;16", "I", "F"])
def test_every_image_mode_becomes_what_a_user_expects(mode):
    """transformers fails (or reads raw bands) for these; ours equals transformers on the RGB image a
    user would expect: Pillow's RGB conversion, 16-bit scaled to 8 bits, float [0, 1] times 255."""
    rgb = Image.fromarray(_rgb(61, 47, 5))
    if mode == "I;16":
        grey16 = np.random.default_rng(6).integers(0, 65536, (61, 47)).astype(np.uint16)
        image = Image.fromarray(grey16)
        expected = Image.fromarray(np.repeat(((grey16 / 257.0) + 0.5).astype(np.uint8)[..., None], 3, -1))
    elif mode == "I":
        grey = np.random.default_rng(7).integers(0, 256, (61, 47)).astype(np.int32)
        image = Image.fromarray(grey, mode="I")
        expected = Image.fromarray(np.repeat(grey.astype(np.uint8)[..., None], 3, -1))
    elif mode == "F":
        grey = np.random.default_rng(8).integers(0, 256, (61, 47)).astype(np.uint8)
        image = Image.fromarray(grey.astype(np.float32) / 255, mode="F")
        expected = Image.fromarray(np.repeat(grey[..., None], 3, -1))
    elif mode == "P":
        image = rgb.quantize(colors=37)
        expected = image.convert("RGB")
    else:
        image = rgb.convert(mode)
        expected = image.convert("RGB")
    assert image.mode == mode
    assert_same(ours(images=image), theirs(images=expected))


def test_numpy_dtypes_and_layouts():
    image = _rgb(33, 52, 9)
    reference = theirs(images=Image.fromarray(image))
    for variant in (image.astype(np.float32) / 255, image.astype(np.float64) / 255, image.astype(np.float32),
                    image.astype(np.uint16), image.astype(np.int64), image.transpose(2, 0, 1).astype(np.float32) / 255,
                    np.concatenate([image, np.full((33, 52, 1), 255, np.uint8)], -1)):
        assert_same(ours(images=variant), reference)
    sixteen = image.astype(np.uint16) * 257  # 16-bit data with the same picture
    assert_same(ours(images=sixteen), reference)
    grey = image[..., 0]
    assert_same(ours(images=grey), theirs(images=Image.fromarray(np.repeat(grey[..., None], 3, -1))))
    assert_same(ours(images=image > 127), theirs(images=Image.fromarray((image > 127).astype(np.uint8) * 255)))
    ambiguous = _rgb(3, 3, 10)  # HWC unless told otherwise
    assert_same(ours(images=ambiguous), theirs(images=Image.fromarray(ambiguous)))
    assert_same(ours(images=ambiguous, input_data_format="channels_first"),
                theirs(images=ambiguous, input_data_format="channels_first"))


@pytest.mark.parametrize("num_labels", [1, 2, 20, 103])
def test_label_maps_with_a_palette(num_labels):
    rng = np.random.default_rng(num_labels)
    labels = rng.integers(0, num_labels + 1, (70, 90))
    assert build_palette(num_labels) == hf_build_palette(num_labels)
    reference = theirs(prompt_masks=labels, num_labels=num_labels)
    assert_same(ours(prompt_masks=labels, num_labels=num_labels), reference)
    assert_same(ours(prompt_masks=Image.fromarray(labels.astype(np.uint8)), num_labels=num_labels), reference)
    palette_image = Image.fromarray(labels.astype(np.uint8), mode="P")
    palette_image.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    assert_same(ours(prompt_masks=palette_image, num_labels=num_labels), reference)  # P: indices are the labels
    assert_same(SegGptImageProcessor(num_labels=num_labels)(prompt_masks=labels, return_tensors="np"), reference)


def test_palettes_match_transformers_for_every_size():
    for n in list(range(0, 130)) + [215, 216, 343, 1000]:
        assert build_palette(n) == hf_build_palette(n), n


def test_label_maps_without_a_palette_and_rgb_masks():
    labels = np.random.default_rng(3).integers(0, 256, (50, 80))
    assert_same(ours(prompt_masks=labels), theirs(prompt_masks=labels))
    rgb_mask = _rgb(50, 80, 4)
    reference = theirs(prompt_masks=Image.fromarray(rgb_mask), do_convert_rgb=False)
    assert_same(ours(prompt_masks=Image.fromarray(rgb_mask), do_convert_rgb=False), reference)
    assert_same(ours(prompt_masks=Image.fromarray(rgb_mask)), reference)  # transformers raises here
    assert_same(ours(prompt_masks=rgb_mask), reference)
    binary = np.random.default_rng(5).random((40, 40)) > 0.5
    assert_same(ours(prompt_masks=binary), theirs(prompt_masks=binary))  # fed as 0/1, as transformers does
    assert_same(ours(prompt_masks=binary, num_labels=1), theirs(prompt_masks=binary.astype(np.uint8), num_labels=1))


def _mask_cases() -> dict:
    shape = np.zeros((40, 60), np.uint8)
    shape[10:30, 15:45] = 1
    smooth = shape * 200
    smooth[9, 15:45], smooth[30, 15:45] = 90, 37  # anti-aliased edges
    classes = shape.copy()
    classes[12:20, 20:30] = 2
    palette = Image.fromarray(classes, "P")
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)  # VOC's first colours
    return {"0/1": shape, "bool": shape.astype(bool), "0/1 L image": Image.fromarray(shape, "L"),
            "0/255": shape * 255, "anti-aliased": smooth, "palette": palette, "class ids": classes}


@pytest.mark.parametrize("name", sorted(_mask_cases()))
@pytest.mark.parametrize("num_labels", [None, 2])
def test_prompt_masks_equal_transformers_on_every_input_it_accepts(name, num_labels):
    """The processor is transformers' on masks too: 0/1 and bool masks stay 0/1 (black), palette images give
    their indices; the friendlier reading (0/1 scaled to 0/255, palette colours, alpha-only masks) belongs
    to the Segmenter, the command line and the server (tests/test_masks.py, tests/test_trust.py)."""
    mask = _mask_cases()[name]
    options = {} if num_labels is None else {"num_labels": num_labels}
    try:
        reference = theirs(prompt_masks=mask, **options)
    except (IndexError, TypeError, ValueError):
        pytest.skip(f"transformers refuses a {name} mask with num_labels={num_labels}")
    assert_same(ours(prompt_masks=mask, **options), reference)
    rgb = np.repeat(np.asarray(mask, np.uint8)[..., None], 3, axis=-1)  # the same levels as an RGB picture
    assert_same(ours(prompt_masks=rgb, do_convert_rgb=False), theirs(prompt_masks=rgb, do_convert_rgb=False))


@pytest.mark.parametrize("source", [128, 256, 640, 1024, 449, 3])
def test_mask_nearest_resize_is_pils(source):
    """PIL's NEAREST differs from floor((i + 0.5) * in / out) for sizes that are multiples of 128."""
    labels = np.random.default_rng(source).integers(0, 4, (source, source))
    assert_same(ours(prompt_masks=labels, num_labels=3), theirs(prompt_masks=labels, num_labels=3))


def test_everything_together_and_return_types():
    query, prompt = _rgb(100, 150, 11), _rgb(120, 90, 12)
    mask = np.random.default_rng(13).integers(0, 3, (120, 90))
    kwargs = dict(prompt_images=Image.fromarray(prompt), prompt_masks=mask, num_labels=2)
    reference = theirs(images=Image.fromarray(query), **kwargs)
    out = ours(images=Image.fromarray(query), **kwargs)
    assert list(out) == ["pixel_values", "prompt_pixel_values", "prompt_masks"]
    assert_same(out, reference)
    assert out.pixel_values is out["pixel_values"]
    listed = OURS(images=Image.fromarray(query))
    assert isinstance(listed["pixel_values"], list) and listed["pixel_values"][0].shape == (3, 448, 448)
    import jax

    assert isinstance(OURS(images=query, return_tensors="jax")["pixel_values"], jax.Array)
    small = SegGptImageProcessor(size=(64, 32))(images=query, return_tensors="np")["pixel_values"]
    assert small.shape == (1, 3, 64, 32)


def _random_pred(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 896, 448, generator=g) * 1.5


class _Out:
    def __init__(self, pred_masks):
        self.pred_masks = pred_masks


@pytest.mark.parametrize("num_labels", [None, 1, 2, 20, 103])
@pytest.mark.parametrize("sizes", [None, [(1, 1), (3, 4000)], [(449, 447), (7, 3)], [(896, 224), (448, 448)]])
def test_post_processing_matches_transformers(num_labels, sizes):
    pred = _random_pred(2, seed=0 if num_labels is None else num_labels)
    reference = THEIRS.post_process_semantic_segmentation(_Out(pred), target_sizes=sizes, num_labels=num_labels,
                                                          return_segmentation_scores=True)
    result = OURS.post_process_semantic_segmentation(_Out(pred.numpy()), target_sizes=sizes, num_labels=num_labels,
                                                     return_segmentation_scores=True)
    plain = OURS.post_process_semantic_segmentation(pred.numpy(), target_sizes=sizes, num_labels=num_labels)
    from_torch = OURS.post_process_semantic_segmentation(_Out(pred), sizes, num_labels=num_labels)
    from_jax = OURS.post_process_semantic_segmentation(_Out(jnp.asarray(pred.numpy())), sizes, num_labels=num_labels)
    for ref, res, seg, seg_torch, seg_jax in zip(reference, result, plain, from_torch, from_jax):
        expected = ref["segmentation"].numpy()
        assert res["segmentation"].dtype == expected.dtype and res["segmentation"].shape == expected.shape
        for segmentation in (res["segmentation"], seg, seg_torch, seg_jax):
            assert isinstance(segmentation, np.ndarray)
            np.testing.assert_array_equal(segmentation, expected)
        if num_labels is None:
            assert res["segmentation_scores"] is None
        else:
            np.testing.assert_array_equal(res["segmentation_scores"], ref["segmentation_scores"].numpy())


def test_nearest_colours_is_torchs_arithmetic_ties_included():
    """Each colour's float32 ``(dr^2 + dg^2) + db^2`` and the first of equal distances, as transformers'
    ``pow(pred - palette, 2).sum(-1).argmin(-1)``: on random pixels, on pixels half-way between two
    palette colours (exact ties) and on the colours themselves."""
    palette = np.asarray(build_palette(20), np.float32)
    rng = np.random.default_rng(0)
    random = rng.uniform(-20, 275, (3, 30, 40)).astype(np.float32)
    pairs = rng.integers(0, len(palette), (2, 30, 40))
    halfway = ((palette[pairs[0]] + palette[pairs[1]]) / 2).transpose(2, 0, 1)  # ties where the pair differs
    exact = palette[pairs[0]].transpose(2, 0, 1)
    for painted in (random, halfway, exact):
        distances = torch.pow(torch.from_numpy(painted).permute(1, 2, 0)[:, :, None, :]
                              - torch.from_numpy(palette), 2).sum(-1)  # [h, w, L+1]
        index, ours = nearest_colours(painted, palette, distances=True)
        np.testing.assert_array_equal(ours, distances.permute(2, 0, 1).numpy())
        np.testing.assert_array_equal(index, distances.argmin(-1).numpy())
        np.testing.assert_array_equal(nearest_colours(painted, palette)[0], index)
    assert (pairs[0] != pairs[1]).sum() > 1000  # the half-way pixels hold real ties


@pytest.mark.parametrize("problem, message", [
    (dict(prompt_masks=np.array([[0, 1], [5, 2]]), num_labels=3), r"prompt_masks\[0\] \(ndarray of shape \(2, 2\)\) has labels \[5\] above num_labels=3"),
    (dict(prompt_masks=np.array([[0, -1], [1, 2]]), num_labels=3), r"negative labels"),
    (dict(prompt_masks=np.array([[0.5, 1.0]]), num_labels=3), r"non-integer values"),
    (dict(prompt_masks=np.full((4, 4), 300)), r"labels up to 300; without num_labels"),
    (dict(images=np.full((4, 4, 3), np.nan, np.float32)), r"NaN"),
    (dict(images=np.full((4, 4, 3), 300.5, np.float32)), r"float values in \[300.5, 300.5\]; expected \[0, 1\] or \[0, 255\]"),
    (dict(images=np.zeros((6, 6, 5), np.uint8)), r"cannot tell the channel axis of an image of shape \(6, 6, 5\)"),
    (dict(images=np.zeros((2, 3, 4, 5, 6), np.uint8)), r"must be 2-D \(grey\) or 3-D"),
    (dict(images=np.zeros((0, 4, 3), np.uint8)), r"is empty"),
    (dict(images=np.full((4, 4), 70000, np.int64)), r"pixel values up to 70000"),
    (dict(), r"at least one of images, prompt_images, prompt_masks"),
    (dict(images=np.zeros((4, 4, 3), np.uint8), return_tensors="tf"),
     r"return_tensors must be None, 'np', 'jax' or 'pt'"),
    (dict(images=np.zeros((4, 4, 3), np.uint8), size=(0, 4)), r"size must be a positive int"),
    (dict(prompt_masks=np.zeros((4, 4)), segmentation_maps=np.zeros((4, 4))), r"prompt_masks or segmentation_maps"),
])
def test_errors_name_the_problem(problem, message):
    with pytest.raises(ValueError, match=message):
        OURS(**problem)


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image file"):
        OURS(images=str(tmp_path / "missing.png"))
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image .*notes.txt"):
        OURS(images=str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="num_labels must be a non-negative integer"):
        SegGptImageProcessor(num_labels=-2)
    with pytest.raises(TypeError, match="unknown SegGptImageProcessor arguments"):
        SegGptImageProcessor(do_resise=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(height=st.integers(1, 40), width=st.integers(5, 40), seed=st.integers(0, 2 ** 16),
       kind=st.sampled_from(["hwc-uint8", "chw-uint8", "hwc-float01", "chw-float01", "hwc-uint16", "hwc-float255",
                             "pil"]))
def test_property_any_layout_and_dtype_equals_the_uint8_image(height, width, seed, kind):
    image = _rgb(height, width, seed)
    variant = {
        "hwc-uint8": image, "chw-uint8": image.transpose(2, 0, 1), "hwc-float01": image.astype(np.float32) / 255,
        "chw-float01": image.transpose(2, 0, 1).astype(np.float64) / 255, "hwc-uint16": image.astype(np.uint16),
        "hwc-float255": image.astype(np.float32), "pil": Image.fromarray(image),
    }[kind]
    fmt = "channels_first" if kind.startswith("chw") else None
    assert_same(ours(images=variant, input_data_format=fmt), theirs(images=Image.fromarray(image)))


@settings(max_examples=30, deadline=None)
@given(height=st.integers(1, 50), width=st.integers(1, 50), num_labels=st.integers(1, 130), seed=st.integers(0, 999))
def test_property_label_maps(height, width, num_labels, seed):
    labels = np.random.default_rng(seed).integers(0, num_labels + 1, (height, width))
    assert_same(ours(prompt_masks=labels, num_labels=num_labels), theirs(prompt_masks=labels, num_labels=num_labels))


# ------------------------------------------------------------------------ transformers' API around the processor
@pytest.mark.parametrize("options, message", [
    (dict(do_resize="yes"), r"do_resize must be true or false, got 'yes'"),
    (dict(size={"shortest_edge": 448}), r"size must be a positive int, \(height, width\) or"),
    (dict(size=(448.0, 448)), r"size must be a positive int"),
    (dict(resample=9), r"resample must be one of 0 \(NEAREST\), 1 \(LANCZOS\), 2 \(BILINEAR\), 3 \(BICUBIC\)"),
    (dict(rescale_factor=0), r"rescale_factor must be a positive number, got 0"),
    (dict(image_mean=[0.5, 0.5]), r"image_mean must be a number or 3 numbers"),
    (dict(image_std=[0.2, 0.0, 0.2]), r"image_std must be non-zero"),
    (dict(image_std=float("nan")), r"image_std must be a number or 3 numbers"),
    (dict(num_labels=1.5), r"num_labels must be a non-negative integer"),
])
def test_invalid_options_are_refused_naming_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        SegGptImageProcessor(**options)
    with pytest.raises(ValueError, match=message):  # per call too
        OURS(images=np.zeros((4, 4, 3), np.uint8), **options)


def _write_config(folder, data) -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "preprocessor_config.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))
    return path


def test_from_pretrained_reads_transformers_keys_and_refuses_bad_values(tmp_path, caplog):
    folder = str(tmp_path / "model")
    path = _write_config(folder, {"size": {"height": 64, "width": 32}, "image_processor_type": "SegGptImageProcessor",
                                  "do_normalize": False, "resample": 2, "crop_size": 3, "num_labels": None})
    with caplog.at_level("DEBUG", logger="seggpt_jax.imaging.processor"):
        processor = SegGptImageProcessor.from_pretrained(folder)
    assert "crop_size" in caplog.text and "image_processor_type" not in caplog.text  # unknown keys: debug log only
    expected = {**SegGptImageProcessor().to_dict(), "size": {"height": 64, "width": 32}, "do_normalize": False,
                "resample": 2}
    theirs = HFProcessor.from_pretrained(folder).to_dict()
    assert theirs.pop("crop_size") == {"height": 3, "width": 3}  # transformers keeps what it does not use
    assert processor.to_dict() == expected == theirs | {"image_mean": list(theirs["image_mean"]),
                                                        "image_std": list(theirs["image_std"])}
    assert SegGptImageProcessor.from_pretrained(path).to_dict() == expected  # the file itself
    overridden = SegGptImageProcessor.from_pretrained(folder, size=16, num_labels=4)
    assert overridden.size == {"height": 16, "width": 16} and overridden.num_labels == 4 and not overridden.do_normalize
    with pytest.raises(TypeError, match="unknown SegGptImageProcessor arguments: \\['do_resise'\\]"):
        SegGptImageProcessor.from_pretrained(folder, do_resise=False)

    _write_config(folder, {"size": {"height": 64, "width": 32}, "image_mean": [0.5, "x", 0.5]})
    with pytest.raises(ValueError, match=r"^invalid .*preprocessor_config.json: image_mean must be a number or 3"):
        SegGptImageProcessor.from_pretrained(folder)
    _write_config(folder, '{"size": ')
    with pytest.raises(ValueError, match=r"preprocessor_config.json is not valid JSON"):
        SegGptImageProcessor.from_pretrained(folder)
    _write_config(folder, "[1, 2]")
    with pytest.raises(ValueError, match=r"preprocessor_config.json must hold a JSON object, got list"):
        SegGptImageProcessor.from_pretrained(folder)


def test_from_pretrained_without_the_file_uses_the_defaults(tmp_path, caplog):
    (tmp_path / "config.json").write_text("{}")
    with caplog.at_level("INFO", logger="seggpt_jax.imaging.processor"):
        processor = SegGptImageProcessor.from_pretrained(tmp_path)
    assert "has no preprocessor_config.json: using the default processor settings" in caplog.text
    assert processor.to_dict() == SegGptImageProcessor().to_dict()
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        SegGptImageProcessor.from_pretrained(tmp_path / "missing")


def test_save_pretrained_writes_what_transformers_writes(tmp_path):
    options = dict(size={"height": 64, "width": 32}, resample=Image.NEAREST, image_mean=[0.1, 0.2, 0.3],
                   image_std=[0.4, 0.5, 0.6], do_convert_rgb=False, num_labels=7, rescale_factor=1 / 127.5)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "notes.txt").write_text("mine")
    path = SegGptImageProcessor(**options).save_pretrained(tmp_path / "ours")
    HFProcessor(**options).save_pretrained(tmp_path / "theirs")
    assert json.loads(open(path).read()) == json.loads((tmp_path / "theirs" / "preprocessor_config.json").read_text())
    assert sorted(os.listdir(tmp_path / "ours")) == ["notes.txt", "preprocessor_config.json"]  # nothing else touched
    with pytest.raises(NotADirectoryError, match="is a file"):
        SegGptImageProcessor().save_pretrained(tmp_path / "ours" / "notes.txt")


def test_return_tensors_pt_and_batch_feature_to():
    image = _rgb(30, 40, 3)
    out = OURS(images=image, prompt_masks=image[..., 0] > 100, return_tensors="pt")
    reference = THEIRS(image, prompt_masks=image[..., 0] > 100, return_tensors="pt")
    for key in reference:
        assert isinstance(out[key], torch.Tensor) and out[key].dtype == torch.float32
        torch.testing.assert_close(out[key], reference[key], atol=1e-6, rtol=0)
    half = out.to(torch.float16)
    assert half.pixel_values.dtype == torch.float16 and list(half) == list(out)
    assert OURS(images=image, return_tensors="np").to("cpu")["pixel_values"].dtype == np.float32


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_torch_is_imported_only_when_asked_for():
    result = _python("""
        import sys
        import numpy as np
        from seggpt_jax import SegGptImageProcessor
        processor = SegGptImageProcessor(size=32)
        image = np.zeros((20, 30, 3), np.uint8)
        for kind in (None, "np", "jax"):
            processor(images=image, prompt_masks=image[..., 0], num_labels=2, return_tensors=kind)
        processor.post_process_semantic_segmentation(np.zeros((1, 3, 64, 32), np.float32), [(5, 6)], num_labels=2)
        print("before", "torch" in sys.modules)
        processor(images=image, return_tensors="pt")
        print("after", "torch" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["before", "False", "after", "True"]


def test_return_tensors_pt_without_torch_says_what_to_do():
    result = _python("""
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        import numpy as np
        from seggpt_jax import SegGptImageProcessor
        SegGptImageProcessor()(images=np.zeros((4, 4, 3), np.uint8), return_tensors="pt")
    """)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        'ImportError: return_tensors="pt" needs torch, which is not installed: use return_tensors="np" or "jax", '
        'or install torch')


@pytest.mark.parametrize("num_labels", [None, 1, 3, 103])
def test_get_palette_and_mask_to_rgb_as_transformers(num_labels):
    mask = np.random.default_rng(num_labels or 0).integers(0, (num_labels or 255) + 1, (13, 17))
    palette = OURS.get_palette(num_labels) if num_labels is not None else None
    if num_labels is not None:
        assert palette == THEIRS.get_palette(num_labels)
    expected = THEIRS.mask_to_rgb(mask, palette=palette)
    for variant in (mask, mask[None], torch.from_numpy(mask), jnp.asarray(mask)):
        rgb = OURS.mask_to_rgb(variant, palette=palette)
        assert rgb.shape == (3, 13, 17) and rgb.dtype == np.uint8
        np.testing.assert_array_equal(rgb, expected)
    custom = [(1, 2, 3), (40, 50, 60), (255, 0, 9)]
    small = mask % 3
    np.testing.assert_array_equal(OURS.mask_to_rgb(small, custom), THEIRS.mask_to_rgb(small, custom))


def test_mask_to_rgb_refuses_what_transformers_gets_wrong():
    with pytest.raises(ValueError, match=r"mask \(ndarray of shape \(1, 2\)\) has labels \[4\] above num_labels=3"):
        OURS.mask_to_rgb(np.array([[0, 4]]), OURS.get_palette(3))  # transformers: IndexError
    with pytest.raises(ValueError, match="negative labels"):
        OURS.mask_to_rgb(np.array([[0, -1]]), OURS.get_palette(3))  # transformers: the last colour
    with pytest.raises(ValueError, match=r"labels up to 300; without num_labels"):
        OURS.mask_to_rgb(np.array([[0, 300]]))
    with pytest.raises(ValueError, match=r"palette must be a list of \(R, G, B\) colours"):
        OURS.mask_to_rgb(np.array([[0, 1]]), [(0, 0), (1, 1)])
    with pytest.raises(ValueError, match=r"mask must be \[height, width\]"):
        OURS.mask_to_rgb(np.zeros((2, 3, 4), np.int64))
