import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from pipeline.data import DatasetNotFoundError, dequantize, iterate_batches, load_dataset, pad_images
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
