"""The standard few-shot splits: FSS-1000's class lists (shipped) and HSNet's PASCAL-5i / COCO-20i lists
(read from a user's checkout, checked by sha256).

* FSS-1000: :func:`fss1000_classes` gives the 240 official test classes (the dataset authors'
  ``fss_test_set.txt``) and the 240/520 validation/training classes of the random split HSNet uses.
  They are the dataset's own class names and ship with the package (``class_lists/``, with their
  provenance in each file's header).
* PASCAL-5i and COCO-20i: the fixed per-fold query lists of HSNet (``juhongm999/hsnet``,
  ``data/splits/pascal/val/foldN.txt`` and ``data/splits/coco/val/foldN.pkl``). That repository has no
  licence, so they are not shipped: :class:`HsnetSplits` reads them from the user's checkout
  (``evaluate --splits hsnet/data/splits``) and refuses any file whose sha256 is not the one of
  HSNet's own file (a different list gives numbers that are not comparable). The COCO lists are
  pickles; they are read by an unpickler that refuses every global, so a pickle can build only
  plain dicts, lists, strings and numbers, and never runs code.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from importlib import resources

from .datasets import DataError

FSS_SPLITS = ("test", "val", "trn")

#: sha256 of the files of HSNet's ``data/splits`` that the protocols read (computed from the files of
#: juhongm999/hsnet at commit 6b1bc12, unchanged since the lists were published in April 2021).
HSNET_SHA256 = {
    "pascal/val/fold0.txt": "748e2f4732ac502cb3aa1f3768936b394bd7ba4e611ac5bf959291a268e249df",
    "pascal/val/fold1.txt": "afce1929e4dacbc13c07f9a26d4ce7738d415e1b18443fe173e58303836f5c14",
    "pascal/val/fold2.txt": "50b1f5218e8f882ca65d85da5be230b978a70067e9b3e0e9fca1528f546bd7fb",
    "pascal/val/fold3.txt": "c3825d7c52d1608d4c62c5b85d6ef3f74cf5898032bc068a94c971df17bdf71a",
    "coco/val/fold0.pkl": "96002389be83b4730d13b814398f54eb2baf5c3283598ec2288d60624d6ef9c3",
    "coco/val/fold1.pkl": "a34deecdf2858fc436f5ea4d5a2d46b6674ce09f7ebce41c34b694116381fa56",
    "coco/val/fold2.pkl": "0f275c5e9bf538f6ef8a95054f6daf2519b53785c4ab7fd07e633dda57dac1e5",
    "coco/val/fold3.pkl": "927597bd78036a460abdab243330667af6ceffdb483bc3331ae55d148f00c449",
}


def fss1000_classes(split: str = "test") -> list[str]:
    """The class (folder) names of an FSS-1000 split, in the order of their list."""
    if split not in FSS_SPLITS:
        raise ValueError(f"FSS-1000 split must be one of {FSS_SPLITS}, got {split!r}")
    text = resources.files(__package__).joinpath("class_lists", f"fss1000_{split}.txt").read_text("utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


class _PlainUnpickler(pickle.Unpickler):
    """Builds containers and scalars only: every global (class, function) is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refused global {module}.{name}: a split list holds only names")


def load_plain_pickle(data: bytes, what: str):
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - any failure of a foreign file is one line naming it
        raise DataError(f"{what}: not a plain pickle of lists and names ({type(e).__name__}: {e})") from None


class HsnetSplits:
    """A checkout of HSNet's ``data/splits`` folder, each file checked by sha256 when it is read.

    ``checksums`` maps relative paths to the sha256 a file must have (default :data:`HSNET_SHA256`).
    """

    def __init__(self, root: str | os.PathLike, *, checksums: dict[str, str] | None = None):
        self.root = os.fspath(root)
        self.checksums = dict(HSNET_SHA256 if checksums is None else checksums)
        if not os.path.isdir(self.root):
            raise DataError(f"--splits {self.root}: no such folder (expected a checkout of HSNet's data/splits, "
                            "https://github.com/juhongm999/hsnet)")
        self.verified: dict[str, str] = {}

    def read(self, relative: str) -> bytes:
        path = os.path.join(self.root, *relative.split("/"))
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise DataError(f"{path}: missing (expected HSNet's data/splits/{relative}; is {self.root} a checkout "
                            f"of hsnet/data/splits?)") from None
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        digest = hashlib.sha256(data).hexdigest()
        expected = self.checksums.get(relative)
        if expected is None:
            raise DataError(f"{path}: no known checksum for {relative}")
        if digest != expected:
            raise DataError(f"{path} is not HSNet's {relative} (sha256 {digest[:16]}..., expected "
                            f"{expected[:16]}...): a different list gives numbers that are not comparable")
        self.verified[relative] = digest
        return data

    def pascal_fold(self, fold: int) -> list[tuple[str, int]]:
        """``[(image name, class id 1..20)]`` of PASCAL-5i's fold, in file order."""
        _check_fold(fold)
        relative = f"pascal/val/fold{fold}.txt"
        text = self.read(relative).decode("utf-8").replace("\r\n", "\n")
        out = []
        for line in text.split("\n")[:-1]:
            name, _, label = line.partition("__")
            if not name or not label.isdigit():
                raise DataError(f"{relative}: unexpected line {line!r} (expected NAME__CLASS)")
            out.append((name, int(label)))
        return out

    def coco_fold(self, fold: int) -> dict[int, list[str]]:
        """``{class id 1..80: [image path relative to COCO2014, ...]}`` of COCO-20i's fold, in file order."""
        _check_fold(fold)
        relative = f"coco/val/fold{fold}.pkl"
        pools = load_plain_pickle(self.read(relative), relative)
        if not isinstance(pools, dict) or not all(isinstance(k, int) and isinstance(v, list) and
                                                  all(isinstance(n, str) for n in v) for k, v in pools.items()):
            raise DataError(f"{relative}: expected a dict of class index -> list of image names")
        return {k + 1: v for k, v in pools.items()}  # HSNet's 0-based class index -> COCO-20i class id


def _check_fold(fold: int) -> None:
    if fold not in (0, 1, 2, 3):
        raise ValueError(f"folds are 0..3, got {fold}")
