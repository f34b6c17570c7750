"""Metrics against direct numpy computations and an independent port of HSNet's metric; HSNet's episodes
against references written from its definitions; dataset validation errors; split lists."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from seggpt_jax.cli import main
from seggpt_jax.data import (DataError, FolderDataset, FSS1000Dataset, HsnetSplits, class_episodes, fold_classes,
                             fss1000_classes, sample_episodes)
from seggpt_jax.data import splits as split_lists
from seggpt_jax.eval.metrics import FewShotMeter, confusion_matrix, iou_per_class, mean_iou
from seggpt_jax_testing.benchmarks import write_coco_miniature, write_fss_tree, write_pascal_miniature
from seggpt_jax_testing.synthetic import write_synthetic_fss


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


# ------------------------------------------------------------------------------------ HSNet's protocol
# Independent references, written from HSNet's definitions (juhongm999/hsnet: data/fss.py, pascal.py,
# coco.py sample the episodes with numpy's global legacy generator seeded by utils.fix_randseed(0);
# common/evaluation.py and logger.AverageMeter score them), not from seggpt_jax's code.

def _with_hsnet_seed(draw):
    """Run ``draw()`` the way HSNet's test() does: np.random.seed(0) first (the global state is restored)."""
    state = np.random.get_state()
    np.random.seed(0)
    try:
        return draw()
    finally:
        np.random.set_state(state)


def _hsnet_fss_reference(base: str, shot: int) -> list[dict]:
    import glob

    categories = sorted(fss1000_classes("test"))
    metadata = []
    for cat in categories:
        for path in sorted(glob.glob(os.path.join(base, cat, "*"))):
            if os.path.basename(path).split(".")[1] == "jpg":
                metadata.append(path)

    def draw():
        out = []
        for query in metadata:
            supports = []
            while True:
                name = os.path.join(os.path.dirname(query), str(np.random.choice(range(1, 11), 1, replace=False)[0]))
                name += ".jpg"
                if query != name:
                    supports.append(name)
                if len(supports) == shot:
                    break
            rel = lambda p: os.path.relpath(p, base).replace(os.sep, "/")  # noqa: E731
            out.append({"class": query.split(os.sep)[-2], "query": rel(query), "supports": [rel(s) for s in supports]})
        return out

    return _with_hsnet_seed(draw)


def _list_episodes(argv, capsys, monkeypatch) -> list[dict]:
    from seggpt_jax.cli import common

    def no_model(*args, **kwargs):
        raise AssertionError("--list-episodes loaded a model")

    monkeypatch.setattr(common, "load_model", no_model)
    monkeypatch.setattr(common, "make_segmenter", no_model)
    assert main(["evaluate", *argv, "--list-episodes"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_shipped_fss_classes_are_the_official_lists():
    # the names, in their files' order, hash to HSNet's data/splits/fss/{test,val,trn}.txt (sha256 of those files)
    expected = {"test": ("\r\n", "26f1b9e9dd0c4a58c01db306aeb5bccb5de361d544ec1b15f219efc4b74c0bf1"),
                "val": ("\n", "9cac02c58602f2789b4e6393200e450e3ba1edae6673d6a87ae2063d0c547aee"),
                "trn": ("\n", "815bce03f2502719ba3bd9c1f79111b74ec8ab63e6111830ff7312de49b1cf17")}
    for split, (newline, digest) in expected.items():
        names = fss1000_classes(split)
        assert hashlib.sha256((newline.join(names) + newline).encode()).hexdigest() == digest
    assert len(set(sum((fss1000_classes(s) for s in expected), []))) == 1000


def test_fss_list_episodes_are_hsnets(tmp_path, capsys, monkeypatch):
    base = os.path.join(write_fss_tree(tmp_path, fss1000_classes("test")), "FSS-1000")
    for shot in (1, 5):
        ours = _list_episodes([str(tmp_path), "--protocol", "fss1000", "--shots", str(shot)], capsys, monkeypatch)
        reference = _hsnet_fss_reference(base, shot)
        assert len(ours) == 2400 and [e["episode"] for e in ours] == list(range(2400))
        assert [{k: e[k] for k in ("class", "query", "supports")} for e in ours] == reference
    # facts from running HSNet's own DatasetFSS.sample_episode on such a tree (np.random.seed(0), 5-shot): its
    # first episode, its last, and how many of the 2400 episodes draw one support twice
    assert ours[0]["query"] == "abe's_flyingfish/1.jpg"
    assert ours[0]["supports"] == [f"abe's_flyingfish/{n}.jpg" for n in (3, 4, 3, 7, 6)]
    assert ours[-1]["supports"] == [f"wooden_spoon/{n}.jpg" for n in (4, 6, 8, 8, 4)]
    assert sum(len(set(e["supports"])) < 5 for e in ours) == 1793


def _hsnet_support_loop(pool: list[str], query: str, shot: int) -> list[str]:
    """HSNet's "keep sampling support set if query == support" loop (pascal.py / coco.py)."""
    supports = []
    while True:
        support = np.random.choice(pool, 1, replace=False)[0]
        if query != support:
            supports.append(str(support))
        if len(supports) == shot:
            break
    return supports


def _hsnet_pascal_reference(lines: list[str], shot: int) -> list[dict]:
    metadata = [[line.split("__")[0], int(line.split("__")[1]) - 1] for line in lines]
    classwise = {c: [] for c in range(20)}
    for name, c in metadata:
        classwise[c] += [name]

    def draw():
        out = []
        for idx in range(1000):
            query, c = metadata[idx % len(metadata)]
            supports = _hsnet_support_loop(classwise[c], query, shot)
            out.append({"class": c + 1, "query": query, "supports": supports})
        return out

    return _with_hsnet_seed(draw)


def _hsnet_coco_reference(pools: dict, fold: int, shot: int) -> list[dict]:
    class_ids = [fold + 4 * v for v in range(20)]

    def draw():
        out = []
        for _ in range(1000):
            c = np.random.choice(class_ids, 1, replace=False)[0]
            query = np.random.choice(pools[c], 1, replace=False)[0]
            supports = _hsnet_support_loop(pools[c], query, shot)
            out.append({"class": int(c) + 1, "query": str(query), "supports": supports})
        return out

    return _with_hsnet_seed(draw)


@pytest.fixture(scope="module")
def miniatures(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    splits = root / "splits"
    sums = write_pascal_miniature(root / "pascal", splits)
    sums.update(write_coco_miniature(root / "coco", splits))
    return root, splits, sums


def test_pascal_and_coco_list_episodes_are_hsnets(miniatures, capsys, monkeypatch):
    root, splits, sums = miniatures
    # generated lists are not HSNet's: refused by checksum, with a one-line error naming the file
    assert main(["evaluate", str(root / "pascal"), "--protocol", "pascal5i", "--splits", str(splits),
                 "--list-episodes"]) == 1
    assert "fold0.txt is not HSNet's pascal/val/fold0.txt (sha256" in capsys.readouterr().err
    monkeypatch.setattr(split_lists, "HSNET_SHA256", sums)
    for fold, shot in ((0, 1), (2, 5)):
        lines = (splits / "pascal" / "val" / f"fold{fold}.txt").read_text().split("\n")[:-1]
        ours = _list_episodes([str(root / "pascal"), "--protocol", "pascal5i", "--splits", str(splits), "--fold",
                               str(fold), "--shots", str(shot)], capsys, monkeypatch)
        assert [{k: e[k] for k in ("class", "query", "supports")} for e in ours] == _hsnet_pascal_reference(lines, shot)
        with open(splits / "coco" / "val" / f"fold{fold}.pkl", "rb") as f:
            pools = pickle.load(f)  # our own generated file
        ours = _list_episodes([str(root / "coco"), "--protocol", "coco20i", "--splits", str(splits), "--fold",
                               str(fold), "--shots", str(shot)], capsys, monkeypatch)
        assert [{k: e[k] for k in ("class", "query", "supports")} for e in ours] == \
            _hsnet_coco_reference(pools, fold, shot)
    assert len(ours) == 1000 and sum(len(set(e["supports"])) < 5 for e in ours) > 0  # repeats allowed, as HSNet


def test_split_pickles_never_run_code(tmp_path):
    import subprocess

    class Payload:
        def __reduce__(self):
            return (subprocess.call, (["touch", str(tmp_path / "pwned")],))

    data = pickle.dumps({0: ["a.jpg"], 1: Payload()})
    (tmp_path / "coco" / "val").mkdir(parents=True)
    (tmp_path / "coco" / "val" / "fold0.pkl").write_bytes(data)
    splits = HsnetSplits(tmp_path, checksums={"coco/val/fold0.pkl": hashlib.sha256(data).hexdigest()})
    with pytest.raises(DataError, match="refused global subprocess.call"):
        splits.coco_fold(0)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(DataError, match="missing"):
        splits.pascal_fold(0)


def _hsnet_histc(values: np.ndarray) -> np.ndarray:
    """torch.histc(values, bins=2, min=0, max=1): [0, 0.5) and [0.5, 1]; values outside are not counted."""
    return np.array([np.sum((values >= 0) & (values < 0.5)), np.sum((values >= 0.5) & (values <= 1))], np.float64)


def _hsnet_metric_reference(episodes, nclass: int, interest: list[int], absent: str) -> tuple[float, float]:
    """HSNet's Evaluator.classify_prediction + AverageMeter (update, compute_iou), in numpy, as fractions."""
    inter_buf, union_buf = np.zeros((2, nclass)), np.zeros((2, nclass))
    for class_id, pred, gt, ignore in episodes:
        pred, gt = pred.astype(np.float64).copy(), gt.astype(np.float64)
        if ignore is not None:
            gt = gt + ignore.astype(np.float64) * 255
            pred[gt == 255] = 255
        area_inter = _hsnet_histc(pred[pred == gt])
        union = _hsnet_histc(pred) + _hsnet_histc(gt) - area_inter
        inter_buf[:, class_id] += area_inter
        union_buf[:, class_id] += union
    iou = (inter_buf / np.maximum(union_buf, 1))[:, interest]
    if absent == "zero":
        miou = iou[1].mean()
    else:  # classes with a foreground union only
        seen = union_buf[1, interest] > 0
        miou = iou[1][seen].mean()
    fb = (inter_buf[:, interest].sum(axis=1) / union_buf[:, interest].sum(axis=1)).mean()
    return float(miou), float(fb)


@pytest.mark.parametrize("rings", [False, True])
@pytest.mark.parametrize("absent", ["zero", "skip"])
def test_meter_equals_hsnets_metric(rings, absent):
    rng = np.random.default_rng(7 + rings)
    interest = [5, 6, 7, 8, 9]  # PASCAL-5i fold 1 (0-based), class 9 never drawn: absent
    episodes = []
    for k in range(40):
        class_id = int(rng.choice(interest[:4]))
        h, w = rng.integers(6, 20, 2)
        gt = np.zeros((h, w), np.int64)
        if k % 9:  # every ninth episode: an empty target
            top, left = rng.integers(1, h // 2), rng.integers(1, w // 2)
            gt[top:top + rng.integers(2, h // 2), left:left + rng.integers(2, w // 2)] = 1
        pred = (rng.random((h, w)) < rng.uniform(0.05, 0.6)).astype(np.int64)
        if k % 13 == 0:
            pred[:] = 0
        ignore = None
        if rings:
            grown = gt.copy()
            grown[1:] |= gt[:-1]
            grown[:-1] |= gt[1:]
            grown[:, 1:] |= gt[:, :-1]
            grown[:, :-1] |= gt[:, 1:]
            ignore = (grown == 1) & (gt == 0)
        episodes.append((class_id, pred, gt, ignore))
    meter = FewShotMeter(classes=[c + 1 for c in interest], absent=absent)
    for class_id, pred, gt, ignore in episodes:
        meter.add(class_id + 1, pred == 1, gt == 1, None if ignore is None else ~ignore)
    report = meter.report()
    miou, fb = _hsnet_metric_reference(episodes, 20, interest, absent)
    assert abs(report["mIoU"] - miou) < 1e-9 and abs(report["FB-IoU"] - fb) < 1e-9
    assert report["classes"] == (5 if absent == "zero" else 4)


def test_episode_options(tmp_path, capsys, monkeypatch):
    fss = write_synthetic_fss(tmp_path / "fss", 6, colours=("red", "blue"), size=(16, 16))
    assert main(["evaluate", fss, "--protocol", "fss1000", "--episodes", "3", "--list-episodes"]) == 1
    assert "HSNet's protocol fixes its episodes" in capsys.readouterr().err
    assert main(["evaluate", fss, "--protocol", "fss1000", "--list-episodes"]) == 1
    assert "240 of the 240 FSS-1000 test classes are missing" in capsys.readouterr().err
    all_pairs = ["--protocol", "fss1000", "--fss-split", "all", "--sampling", "all-pairs"]
    every = _list_episodes([fss, *all_pairs, "--seed", "1"], capsys, monkeypatch)
    subset = _list_episodes([fss, *all_pairs, "--episodes", "4", "--seed", "1"], capsys, monkeypatch)
    assert len(every) == 12 and len(subset) == 4
    assert [e["episode"] for e in subset] != [0, 1, 2, 3]  # a random subset, not a prefix
    assert all(e in every for e in subset)
    # HSNet's sampler draws supports 1..10: in 6-image classes some are missing, named once each, episodes skipped
    listed = _list_episodes([fss, "--protocol", "fss1000", "--fss-split", "all"], capsys, monkeypatch)
    assert 0 < len(listed) < 12
