import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from pipeline.data import DataFileError, DatasetNotFoundError, dequantize, iterate_batches, load_dataset, pad_images
from pipeline.data.registry import DEBIAN_FASHION_MNIST


def _write_idx(path, array, gz):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _write_mnist(folder, n_train=12, n_test=5, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        _write_idx(folder / name, array, gz)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files_load_from_the_torchvision_layout(tmp_path, gz):
    arrays = _write_mnist(tmp_path / "MNIST" / "raw", gz=gz)
    data = load_dataset("mnist", tmp_path)
    assert data.shape == (1, 28, 28) and len(data.train) == 12 and len(data.test) == 5 and data.n_levels == 256
    assert np.array_equal(data.train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(data.test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_missing_mnist_files_say_what_is_expected_where(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"train-images-idx3-ubyte\[\.gz\].*--download"):
        load_dataset("mnist", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match="needs --data-dir"):
        load_dataset("cifar10")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def _write_cifar10(root, n=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        batches[name] = batch
    return batches


def test_cifar10_pickled_batches_load(tmp_path):
    batches = _write_cifar10(tmp_path)
    data = load_dataset("cifar10", tmp_path)
    assert data.shape == (3, 32, 32) and len(data.train) == 20 and len(data.test) == 4 and data.num_classes == 10
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32)
    assert np.array_equal(data.train.images[0].numpy(), first)


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 6), ("test", 3)):
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    b"data": np.zeros((n, 3072), np.uint8),
                    b"fine_labels": list(range(90, 90 + n)),
                    b"coarse_labels": [0] * n,
                },
                f,
            )
    data = load_dataset("cifar100", tmp_path)
    assert data.num_classes == 100 and data.train.labels.tolist() == list(range(90, 96))
    (folder / "test").unlink()
    with pytest.raises(DatasetNotFoundError, match="missing: test"):
        load_dataset("cifar100", tmp_path)


def test_svhn_mat_files_load_with_label_10_as_digit_0(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    for split, n in (("train", 5), ("test", 3)):
        savemat(
            tmp_path / f"{split}_32x32.mat",
            {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8), "y": np.array([[10]] * n)},
        )
    data = load_dataset("svhn", tmp_path)
    assert data.shape == (3, 32, 32) and len(data.train) == 5
    assert data.train.labels.tolist() == [0] * 5


def test_embedded_datasets_are_real_and_split_deterministically():
    mnist = load_dataset("digits-mnist5k")
    assert mnist.shape == (1, 28, 28) and len(mnist.train) == 4000 and len(mnist.test) == 1000
    assert mnist.train.images.max() == 255 and set(mnist.test.labels.unique().tolist()) == set(range(10))
    assert torch.equal(load_dataset("digits-mnist5k").test.images, mnist.test.images)
    digits = load_dataset("digits8x8")
    assert digits.shape == (1, 8, 8) and digits.n_levels == 17 and int(digits.train.images.max()) == 16
    train, val = mnist.split_validation(0.1)
    assert len(train) == 3600 and len(val) == 400


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package():
    data = load_dataset("fashion-mnist")
    assert len(data.train) == 60000 and len(data.test) == 10000 and data.shape == (1, 28, 28)


def test_dequantization_and_batches():
    images = torch.randint(0, 256, (10, 1, 4, 4), dtype=torch.uint8)
    x = dequantize(images, 256)
    assert ((x + 0.5) * 256).floor().to(torch.uint8).equal(images)
    assert pad_images(images, 2).shape == (10, 1, 8, 8)
    from pipeline.data import ImageSplit

    split = ImageSplit(images, torch.arange(10))
    first = [labels.tolist() for _, labels in iterate_batches(split, 4, shuffle=True, seed=3)]
    again = [labels.tolist() for _, labels in iterate_batches(split, 4, shuffle=True, seed=3)]
    assert first == again and sorted(sum(first, [])) == list(range(10))
    assert len(list(iterate_batches(split, 4, shuffle=False, drop_last=True))) == 2


def test_a_dataset_with_pixels_beyond_its_levels_is_refused_where_it_is_loaded():
    from pipeline.data import ImageDataset, ImageSplit

    good = ImageSplit(torch.full((2, 1, 2, 2), 16, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    ImageDataset("d", good, good, n_levels=17, num_classes=1)
    bad = ImageSplit(torch.full((2, 1, 2, 2), 17, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"a test pixel has value 17, but the data has 17 levels \(0 to 16\)"):
        ImageDataset("d", good, bad, n_levels=17, num_classes=1)


# --- no data file is trusted ---------------------------------------------------------------------
class _Payload:
    """Unpickling this with ``pickle.load`` runs ``open(target, 'w')``: the file appears only if code ran."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_a_crafted_cifar_batch_runs_no_code_and_is_refused_naming_the_file(tmp_path):
    _write_cifar10(tmp_path)
    target = tmp_path / "payload-ran"
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(pickle.dumps({b"data": _Payload(target), b"labels": [0]}))
    with pytest.raises(DataFileError, match=r"data_batch_3: not a CIFAR batch \(it names (builtins|io)\.open"):
        load_dataset("cifar10", tmp_path)
    assert not target.exists()
    pickle.loads(batch.read_bytes())  # the payload is real: plain pickle runs it
    assert target.exists()


@pytest.mark.parametrize(
    "batch, message",
    [
        ({b"data": np.zeros((4, 3072), np.uint8)}, r"test_batch: the batch has no 'labels' entry"),
        ([1, 2, 3], r"test_batch: not a CIFAR batch \(holds a list, not a dict\)"),
        ({b"data": np.zeros((4, 1000), np.uint8), b"labels": [0] * 4}, r"'data' is uint8 \(4, 1000\), expected"),
        ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, r"'data' is float32"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, r"'labels' is int64 \(3,\), expected 4"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 200]}, r"1 test labels lie outside 0 to 9"),
    ],
)
def test_a_cifar_batch_of_the_wrong_shape_keys_or_labels_is_one_line(tmp_path, batch, message):
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(DataFileError, match=message):
        load_dataset("cifar10", tmp_path)


def test_a_truncated_cifar_batch_is_one_line(tmp_path):
    _write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataFileError, match=r"data_batch_1: not a CIFAR batch"):
        load_dataset("cifar10", tmp_path)


def test_cifar_batches_saved_as_numpy_arrays_by_python_2_and_3_load(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": np.array([i % 10, 3])}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2 if i % 2 else 5))
    data = load_dataset("cifar10", tmp_path)
    assert len(data.train) == 10 and data.train.labels.tolist()[:4] == [0, 3, 1, 3]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], r"train-images-idx3-ubyte\.gz: not a complete gzip file"),
        (lambda b: b"not gzip at all", r"train-images-idx3-ubyte\.gz: not a complete gzip file"),
        (lambda b: gzip.compress(b"\x00\x00\x0d\x03" + gzip.decompress(b)[4:]), r"not an unsigned-byte IDX file"),
        (lambda b: gzip.compress(gzip.decompress(b)[:-10]), r"the header says \(12, 28, 28\)"),
    ],
)
def test_a_damaged_idx_file_is_one_line_naming_it(tmp_path, damage, message):
    _write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataFileError, match=message):
        load_dataset("mnist", tmp_path)


def test_idx_labels_out_of_range_or_miscounted_are_refused_where_they_load(tmp_path):
    _write_mnist(tmp_path, gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2, 200, 3, 4]), gz=False)
    with pytest.raises(DataFileError, match=r"1 test labels lie outside 0 to 9 \(e\.g\. 200\)"):
        load_dataset("mnist", tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2, 3]), gz=False)
    with pytest.raises(DataFileError, match=r"5 images, but .*t10k-labels-idx1-ubyte holds 3 labels"):
        load_dataset("mnist", tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((5, 2)), gz=False)
    with pytest.raises(DataFileError, match=r"an IDX file of 2 dimensions, expected 1"):
        load_dataset("mnist", tmp_path)


def test_a_damaged_svhn_file_is_one_line(tmp_path):
    from scipy.io import savemat

    (tmp_path / "train_32x32.mat").write_bytes(b"garbage" * 100)
    savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [2]])})
    with pytest.raises(DataFileError, match=r"train_32x32\.mat: not a MATLAB \.mat file"):
        load_dataset("svhn", tmp_path)
    savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(DataFileError, match=r"train_32x32\.mat: no 'y' array"):
        load_dataset("svhn", tmp_path)
    savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [11]])})
    with pytest.raises(DataFileError, match=r"labels lie in 0 to 11, SVHN's are 1 to 10"):
        load_dataset("svhn", tmp_path)
