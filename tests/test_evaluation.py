"""Metrics against direct numpy computations on hand-built predictions; dataset validation errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from seggpt_jax.data import DataError, FolderDataset, FSS1000Dataset, class_episodes, fold_classes, sample_episodes
from seggpt_jax_testing.synthetic import write_synthetic_fss
from seggpt_jax.eval.metrics import FewShotMeter, confusion_matrix, iou_per_class, mean_iou


def test_confusion_matrix_and_iou_by_hand():
    target = np.array([[0, 0, 1, 1],
                       [0, 2, 2, 1],
                       [3, 3, 255, 255]])
    prediction = np.array([[0, 1, 1, 1],
                           [0, 2, 0, 1],
                           [3, 0, 2, 0]])
    cm = confusion_matrix(prediction, target, 5, ignore_index=255)
    assert cm.sum() == 10 and cm[2, 2] == 1 and cm[3, 3] == 1 and cm[0, 1] == 1
    iou = iou_per_class(cm)
    # class 0: pred{(0,0),(1,0),(1,2),(2,1)} target{(0,0),(0,1),(1,0)} -> I=2, U=5
    # class 1: pred{(0,1),(0,2),(0,3),(1,3)} target{(0,2),(0,3),(1,3)} -> I=3, U=4
    # class 2: pred{(1,1)} target{(1,1),(1,2)} -> 1/2; class 3: pred{(2,0)} target{(2,0),(2,1)} -> 1/2
    np.testing.assert_allclose(iou[:4], [2 / 5, 3 / 4, 1 / 2, 1 / 2])
    assert np.isnan(iou[4])  # absent everywhere: no IoU, and left out of the mean
    assert mean_iou(cm) == pytest.approx(np.mean([2 / 5, 3 / 4, 1 / 2, 1 / 2]))
    with pytest.raises(ValueError, match="outside 0..4"):
        confusion_matrix(prediction, np.full_like(target, 7), 5)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(prediction[:2], target, 5)


def test_few_shot_meter_by_hand():
    meter = FewShotMeter()
    a_pred, a_true = np.array([[1, 1], [0, 0]], bool), np.array([[1, 0], [0, 0]], bool)
    meter.add("cat", a_pred, a_true)  # fg I=1 U=2; bg I=2 U=3
    meter.add("cat", np.zeros((2, 2), bool), np.zeros((2, 2), bool))  # empty prediction and target: fg U=0
    meter.add("dog", np.ones((2, 2), bool), np.array([[1, 1], [1, 0]], bool))  # fg I=3 U=4; bg I=0 U=1
    meter.add("bird", np.zeros((2, 2), bool), np.ones((2, 2), bool))  # missed entirely: fg I=0 U=4
    report = meter.report()
    assert report["class_IoU"] == {"bird": 0.0, "cat": 0.5, "dog": 0.75}
    assert report["mIoU"] == pytest.approx(np.mean([0.0, 0.5, 0.75]))
    fg = (1 + 0 + 3 + 0) / (2 + 0 + 4 + 4)
    bg = (2 + 4 + 0 + 0) / (3 + 4 + 1 + 4)
    assert report["FB-IoU"] == pytest.approx((fg + bg) / 2)
    assert report["episodes"] == 4
    only_empty = FewShotMeter()
    only_empty.add("x", np.zeros((2, 2), bool), np.zeros((2, 2), bool))
    assert np.isnan(only_empty.report()["mIoU"])  # a class never present has no IoU


def test_fold_splits():
    assert fold_classes("pascal5i", 1) == [6, 7, 8, 9, 10]
    assert fold_classes("coco20i", 2)[:3] == [3, 7, 11] and len(fold_classes("coco20i", 0)) == 20
    assert sorted(sum((fold_classes("coco20i", f) for f in range(4)), [])) == list(range(1, 81))
    with pytest.raises(ValueError, match="folds 0..3"):
        fold_classes("pascal5i", 4)


def _folder(root, names_images, names_masks, size=(20, 30), mask_value=1):
    os.makedirs(root / "images", exist_ok=True)
    os.makedirs(root / "masks", exist_ok=True)
    for name in names_images:
        Image.fromarray(np.zeros((*size, 3), np.uint8)).save(root / "images" / f"{name}.jpg")
    for name in names_masks:
        Image.fromarray(np.full(size, mask_value, np.uint8)).save(root / "masks" / f"{name}.png")
    return root


def test_bad_datasets_fail_before_training(tmp_path):
    with pytest.raises(DataError, match="masks without an image .*c.png.*images without a mask .*a.jpg"):
        FolderDataset(_folder(tmp_path / "unpaired", ["a", "b"], ["b", "c"]))
    with pytest.raises(DataError, match="expected a folder"):
        FolderDataset(tmp_path / "nothing")
    with pytest.raises(DataError, match="the dataset is empty"):
        FolderDataset(_folder(tmp_path / "empty", [], [])).validate()
    sizes = _folder(tmp_path / "sizes", ["a"], [])
    Image.fromarray(np.zeros((21, 30), np.uint8)).save(sizes / "masks" / "a.png")
    with pytest.raises(DataError, match=r"a.png is 30x21 but .*a.jpg is 30x20"):
        FolderDataset(sizes).validate()
    labels = _folder(tmp_path / "labels", ["a", "b"], ["a", "b"], mask_value=7)
    with pytest.raises(DataError, match=r"class ids above num_labels=5 .*a.png has class ids \[7\]"):
        FolderDataset(labels, num_labels=5).validate()
    FolderDataset(_folder(tmp_path / "void", ["a"], ["a"], mask_value=255), num_labels=5).validate()  # ignored
    broken = _folder(tmp_path / "broken", ["a"], ["a"])
    (broken / "images" / "a.jpg").write_text("not a jpeg")
    with pytest.raises(DataError, match="unreadable files"):
        FolderDataset(broken).validate()
    fss = tmp_path / "fss"
    (fss / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(fss / "cat" / "1.jpg")
    with pytest.raises(DataError, match="files without their image/mask partner"):
        FSS1000Dataset(fss)


def test_episode_sampling_is_seeded(tmp_path):
    data = FSS1000Dataset(write_synthetic_fss(tmp_path / "fss", 4, colours=("red", "blue"), size=(16, 16)))
    one = sample_episodes(data, shots=2, seed=3)
    assert one == sample_episodes(data, shots=2, seed=3) and one != sample_episodes(data, shots=2, seed=4)
    assert len(one) == 8 and all(e.query not in e.supports and len(e.supports) == 2 for e in one)
    assert all(data[e.query].group == data[s].group for e in one for s in e.supports)
    with pytest.raises(DataError, match="need at least 5"):
        sample_episodes(data, shots=4)


def test_class_episodes_for_fold_classes(tmp_path):
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(6):
        labels = np.zeros((16, 16), np.uint8)
        labels[:8] = 1 if i < 4 else 5
        labels[8:, :4] = 2
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(labels).save(root / "masks" / f"{i}.png")
    data = FolderDataset(root, num_labels=80).validate()
    episodes = class_episodes(data, fold_classes("coco20i", 0), shots=1, seed=0)  # classes 1, 5, 9, ...
    assert sorted({e.label for e in episodes}) == [1, 5]
    assert sum(e.label == 1 for e in episodes) == 4 and sum(e.label == 5 for e in episodes) == 2
    assert json.dumps([e.label for e in episodes])  # plain ints
