"""Dataset loading: idx and CIFAR-10 files written on the fly, the synthetic set, the real data."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsetrain.data import DatasetInfo, cifar10, dataset_info, list_datasets, load_dataset
from sparsetrain.data.fashion_mnist import FASHION_MNIST, MNIST
from sparsetrain.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from sparsetrain.errors import ConfigError, DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes, compress: bool) -> Path:
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_idx_split(
    directory: Path, split: str, n: int = 6, compress: bool = False, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    image_stem, label_stem = STEMS[split]
    write(directory / image_stem, idx_bytes(images), compress)
    write(directory / label_stem, idx_bytes(labels), compress)
    return images, labels


def test_registry_and_info() -> None:
    assert list_datasets() == ["fashion_mnist", "mnist", "cifar10", "synthetic", "text"]
    assert dataset_info("fashion_mnist") == DatasetInfo("fashion_mnist", 1, 28, 10)
    assert dataset_info("mnist") == DatasetInfo("mnist", 1, 28, 10)
    assert dataset_info("cifar10") == DatasetInfo("cifar10", 3, 32, 10)
    assert dataset_info("synthetic", image_size=9, in_channels=2, num_classes=4) == DatasetInfo(
        "synthetic", 2, 9, 4
    )


def test_bad_names_options_and_splits_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="known: fashion_mnist, mnist, cifar10, synthetic"):
        load_dataset("imagenet", "train")
    with pytest.raises(ConfigError, match="'val'"):
        load_dataset("synthetic", "val")
    with pytest.raises(ConfigError, match="num_sample"):
        dataset_info("synthetic", num_sample=10)
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("synthetic", "train", image_size=0)
    with pytest.raises(ConfigError, match="takes no options"):
        load_dataset("mnist", "train", tmp_path, seed=1)


def test_read_idx_checks_magic_and_size(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = write(tmp_path / "a", idx_bytes(array), compress=False)
    np.testing.assert_array_equal(read_idx(path, IMAGES_MAGIC, "hint"), array)
    with pytest.raises(DataError, match="magic number 2051, expected 2049"):
        read_idx(path, LABELS_MAGIC, "hint")
    path.write_bytes(idx_bytes(array) + b"\0")
    with pytest.raises(DataError, match="holds 41"):
        read_idx(path, IMAGES_MAGIC, "hint")
    path.write_bytes(b"\0\0\x08")
    with pytest.raises(DataError, match="too short"):
        read_idx(path, IMAGES_MAGIC, "hint")


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_dataset_round_trip(tmp_path: Path, name: str, compress: bool) -> None:
    images, labels = write_idx_split(tmp_path, "test", n=7, compress=compress)
    dataset, info = load_dataset(name, "test", tmp_path)
    x, y = dataset.tensors
    assert info.name == name
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    np.testing.assert_array_equal(y.numpy(), labels)
    source = {"mnist": MNIST, "fashion_mnist": FASHION_MNIST}[name]
    expected = (torch.from_numpy(images).float() / 255 - source.mean) / source.std
    torch.testing.assert_close(x[:, 0], expected)


def test_torchvision_layout_is_found(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _, labels = write_idx_split(raw, "train", n=3, compress=True)
    dataset, _ = load_dataset("mnist", "train", tmp_path)
    np.testing.assert_array_equal(dataset.tensors[1].numpy(), labels)


def test_mnist_requires_a_directory() -> None:
    with pytest.raises(DataError, match="no default location.*--data-dir"):
        load_dataset("mnist", "train")


def test_missing_directory_and_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere not found"):
        load_dataset("fashion_mnist", "train", tmp_path / "nowhere")
    write(tmp_path / STEMS["train"][0], idx_bytes(np.zeros((2, 28, 28))), compress=False)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\[\.gz\] not found.*apt-get"):
        load_dataset("fashion_mnist", "train", tmp_path)


def one_line_error(name: str, directory: Path, split: str = "train") -> str:
    with pytest.raises(DataError) as excinfo:
        load_dataset(name, split, directory)
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("compress", [False, True])
def test_corrupt_idx_files_name_the_file(tmp_path: Path, compress: bool) -> None:
    write_idx_split(tmp_path, "train", n=5, compress=compress)
    image_stem, label_stem = STEMS["train"]
    suffix = ".gz" if compress else ""
    image_path, label_path = tmp_path / (image_stem + suffix), tmp_path / (label_stem + suffix)
    good_images = image_path.read_bytes()

    def put(path: Path, data: bytes) -> None:
        path.write_bytes(gzip.compress(data) if compress else data)

    images = idx_bytes(np.zeros((5, 28, 28)))
    put(image_path, b"\0\0\x09\x03" + images[4:])  # dtype byte 0x09 (signed) instead of 0x08
    assert f"{image_path}: not an idx file" in one_line_error("fashion_mnist", tmp_path)
    put(image_path, images[:-100])
    assert f"{image_path}: header declares 5x28x28" in one_line_error("fashion_mnist", tmp_path)
    put(image_path, idx_bytes(np.zeros((4, 28, 28))))
    message = one_line_error("fashion_mnist", tmp_path)
    assert "holds 4 images" in message and str(label_path) in message
    put(image_path, idx_bytes(np.zeros((5, 32, 32))))
    assert "images are 32x32" in one_line_error("fashion_mnist", tmp_path)
    image_path.write_bytes(good_images)
    put(label_path, idx_bytes(np.array([0, 1, 2, 3, 10])))
    assert f"{label_path}: labels must lie in 0..9" in one_line_error("fashion_mnist", tmp_path)


def test_truncated_gzip_names_the_file(tmp_path: Path) -> None:
    write_idx_split(tmp_path, "train", n=5, compress=True)
    path = tmp_path / (STEMS["train"][0] + ".gz")
    path.write_bytes(path.read_bytes()[:-50])
    assert f"{path}: corrupt or truncated gzip" in one_line_error("mnist", tmp_path)


def write_cifar_batch(path: Path, n: int, seed: int, str_keys: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"fake",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
    }
    if str_keys:
        batch = {k.decode(): v for k, v in batch.items()}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return batch


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-py"])
def test_cifar10_from_fake_batches(tmp_path: Path, subdir: str) -> None:
    folder = tmp_path / subdir
    folder.mkdir(exist_ok=True)
    batches = [write_cifar_batch(folder / f"data_batch_{i}", 2, i) for i in range(1, 6)]
    test_batch = write_cifar_batch(folder / "test_batch", 3, 9, str_keys=True)

    train, info = load_dataset("cifar10", "train", tmp_path)
    x, y = train.tensors
    assert info == DatasetInfo("cifar10", 3, 32, 10)
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [label for b in batches for label in b[b"labels"]]
    red = torch.from_numpy(batches[0][b"data"][0, :1024]).float().view(32, 32)
    torch.testing.assert_close(x[0, 0], (red / 255 - cifar10.MEAN[0]) / cifar10.STD[0])

    test, _ = load_dataset("cifar10", "test", tmp_path)
    assert test.tensors[1].tolist() == test_batch["labels"]


def py2_batch_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch as the original files store it: Python 2 protocol 2, str (bytes) keys and data."""

    def string(b: bytes) -> bytes:  # BINSTRING: how Python 2 pickles a str
        return b"T" + len(b).to_bytes(4, "little") + b

    n, width = data.shape
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b")
        + b"\x87R(K\x01J" + n.to_bytes(4, "little") + b"J" + width.to_bytes(4, "little")
        + b"\x86cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R(K\x03" + string(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + string(data.tobytes()) + b"tb"
    )  # fmt: skip
    items = b"".join(b"K" + bytes([label]) for label in labels)
    return (
        b"\x80\x02}(" + string(b"data") + array + string(b"labels") + b"](" + items + b"eu."
    )  # fmt: skip


def test_cifar10_reads_python2_pickles(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, (2, 3072), dtype=np.uint8)
    (tmp_path / "test_batch").write_bytes(py2_batch_pickle(data, [7, 3]))
    dataset, _ = load_dataset("cifar10", "test", tmp_path)
    x, y = dataset.tensors
    assert y.tolist() == [7, 3]
    blue = torch.from_numpy(data[1, 2048:]).float().view(32, 32)  # rows are channel-major
    torch.testing.assert_close(x[1, 2], (blue / 255 - cifar10.MEAN[2]) / cifar10.STD[2])


def test_cifar10_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no default location"):
        load_dataset("cifar10", "test")
    path = tmp_path / "test_batch"
    assert f"{path} not found" in one_line_error("cifar10", tmp_path, "test")
    batch = write_cifar_batch(path, 3, 0)
    path.write_bytes(path.read_bytes()[:-20])
    assert f"{path}: corrupt CIFAR-10 batch" in one_line_error("cifar10", tmp_path, "test")
    path.write_bytes(pickle.dumps({b"data": batch[b"data"]}))
    assert "no 'labels' entry" in one_line_error("cifar10", tmp_path, "test")
    path.write_bytes(pickle.dumps({**batch, b"labels": [0, 1]}))
    assert "3 images but labels of shape [2]" in one_line_error("cifar10", tmp_path, "test")
    path.write_bytes(pickle.dumps({**batch, b"data": batch[b"data"][:, :100]}))
    assert "'data' must be uint8" in one_line_error("cifar10", tmp_path, "test")
    path.write_bytes(pickle.dumps({**batch, b"labels": [0, 1, 10]}))
    assert "labels must lie in 0..9" in one_line_error("cifar10", tmp_path, "test")


class _Exploit:
    """Unpickling this would create a directory: a stand-in for arbitrary code."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_cifar10_pickle_cannot_run_code(tmp_path: Path) -> None:
    target = tmp_path / "created-by-pickle"
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": _Exploit(str(target))}))
    assert "unexpected object" in one_line_error("cifar10", tmp_path, "test")
    assert not target.exists()


def test_synthetic_is_deterministic_and_splits_differ() -> None:
    a, info = load_dataset("synthetic", "train", num_samples=40, seed=3)
    b, _ = load_dataset("synthetic", "train", num_samples=40, seed=3)
    c, _ = load_dataset("synthetic", "train", num_samples=40, seed=4)
    test, _ = load_dataset("synthetic", "test", num_samples=40, seed=3)
    assert info == DatasetInfo("synthetic", 1, 12, 10)
    assert a.tensors[0].shape == (40, 1, 12, 12) and a.tensors[0].dtype == torch.float32
    assert a.tensors[1].dtype == torch.int64
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[0], c.tensors[0])
    assert len(test) == 10
    assert a.tensors[1].bincount().tolist() == [4] * 10  # balanced classes


def test_synthetic_classes_are_learnable_and_shared_across_splits() -> None:
    options = {"num_samples": 600, "image_size": 8, "in_channels": 2, "num_classes": 5}
    train, _ = load_dataset("synthetic", "train", **options)
    test, _ = load_dataset("synthetic", "test", **options)
    x, y = train.tensors
    assert x.shape == (600, 2, 8, 8)
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1) < 0.1
    means = torch.stack([x[y == c].mean(0).flatten() for c in range(5)])
    # class means of train classify test well above chance (20%): same distribution, real signal
    x_test, y_test = test.tensors
    predicted = torch.cdist(x_test.flatten(1), means).argmin(1)
    assert (predicted == y_test).float().mean() > 0.8
    # and pure noise is not learnable: the same rule fails at noise >> signal
    noisy, _ = load_dataset("synthetic", "test", **options, noise=100.0)
    accuracy = torch.cdist(noisy.tensors[0].flatten(1), means).argmin(1) == noisy.tensors[1]
    assert accuracy.float().mean() < 0.5


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist() -> None:
    train, info = load_dataset("fashion_mnist", "train")
    test, _ = load_dataset("fashion_mnist", "test")
    assert info == DatasetInfo("fashion_mnist", 1, 28, 10)
    assert train.tensors[0].shape == (60000, 1, 28, 28)
    assert test.tensors[0].shape == (10000, 1, 28, 28)
    assert train.tensors[1].bincount().tolist() == [6000] * 10
    assert test.tensors[1].bincount().tolist() == [1000] * 10
    # the normalization constants are those of this data
    assert abs(train.tensors[0].mean().item()) < 0.01
    assert abs(train.tensors[0].std().item() - 1) < 0.01
