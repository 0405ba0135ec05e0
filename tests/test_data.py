"""distcnn.data: IDX parsing, Fashion-MNIST, image folders and their cache, synthetic data, splits."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from helpers import make_imagefolder, write_idx
from PIL import Image

from distcnn.data import DATA_KINDS, DataSplits, ImageSet, fashion_mnist, image_cache, load_data
from distcnn.data.fashion_mnist import read_idx
from distcnn.data.splits import class_quotas, stratified_split
from distcnn.errors import UsageError

HAVE_FASHION_MNIST = fashion_mnist.find_files(fashion_mnist.SYSTEM_DIR) is not None
needs_fashion_mnist = pytest.mark.skipif(
    not HAVE_FASHION_MNIST, reason=f"Fashion-MNIST not installed in {fashion_mnist.SYSTEM_DIR} (dataset-fashion-mnist)"
)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """No test writes into the user's ~/.cache."""
    monkeypatch.setenv("DISTCNN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tensors are small and the work memory-bound: a second intra-op thread gains little here, and
    when other processes share the cores its spin-waiting doubles the file's run time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def usage_error(call, *args, **kwargs) -> str:
    """Run ``call``, expect a UsageError, return its message (checked to be one line)."""
    with pytest.raises(UsageError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def per_class(labels: torch.Tensor, classes: int) -> np.ndarray:
    return torch.bincount(labels, minlength=classes).numpy()


# ------------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["data-idx3-ubyte", "data-idx3-ubyte.gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([0, 9, 3], dtype=np.uint8),
        np.arange(-6, 6, dtype=np.int32).reshape(3, 4),
        np.linspace(-1, 1, 5, dtype=np.float32),
    ],
    ids=["u8-3d", "u8-1d", "i32", "f32"],
)
def test_idx_round_trip(tmp_path, name, array):
    back = read_idx(write_idx(tmp_path / name, array))
    assert back.shape == array.shape and back.dtype.kind == array.dtype.kind
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:-5],  # truncated payload
        lambda raw: b"\x00\x00\x07\x01" + raw[4:],  # unknown type code
        lambda raw: raw[:6],  # header cut short
        lambda raw: raw + b"\x00",  # trailing bytes
    ],
    ids=["truncated", "bad-magic", "short-header", "trailing"],
)
def test_corrupt_idx_names_the_file(tmp_path, damage):
    path = write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(10, dtype=np.uint8))
    path.write_bytes(damage(path.read_bytes()))
    assert str(path) in usage_error(read_idx, path)


def test_truncated_gzip_names_the_file(tmp_path):
    path = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((50, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-30])
    assert str(path) in usage_error(read_idx, path)


# --------------------------------------------------------------------------------------- Fashion-MNIST


def write_fake_fashion_mnist(folder: Path, n_train=60, n_test=20, gz=True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8))
    return folder


@pytest.mark.parametrize("layout", ["flat-gz", "flat-plain", "torchvision"])
def test_fashion_mnist_from_data_dir(tmp_path, layout):
    if layout == "torchvision":
        write_fake_fashion_mnist(tmp_path / "FashionMNIST" / "raw")
    else:
        write_fake_fashion_mnist(tmp_path, gz=layout == "flat-gz")
    data = load_data("fashion-mnist", data_dir=str(tmp_path), val_fraction=0.2)
    assert (len(data.train), len(data.val), len(data.test)) == (48, 12, 20)
    assert data.classes[0] == "T-shirt/top" and data.classes[-1] == "Ankle boot"


def test_fashion_mnist_download_only_when_asked(tmp_path, monkeypatch):
    """Downloads (faked here: no network in tests) land in <root>/FashionMNIST/raw and happen only once."""
    calls = []

    def fake_fetch(root: Path) -> None:
        calls.append(root)
        write_fake_fashion_mnist(root / "FashionMNIST" / "raw")

    monkeypatch.setattr(fashion_mnist, "fetch", fake_fetch)
    usage_error(load_data, "fashion-mnist", data_dir=str(tmp_path))
    assert calls == []
    data = load_data("fashion-mnist", data_dir=str(tmp_path), download=True)
    assert calls == [tmp_path] and len(data.test) == 20
    load_data("fashion-mnist", data_dir=str(tmp_path), download=True)  # found now: no second download
    assert len(calls) == 1


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    message = usage_error(load_data, "fashion-mnist", data_dir=str(tmp_path / "nowhere"))
    assert "apt-get install -y dataset-fashion-mnist" in message and "--download" in message


def test_fashion_mnist_label_file_mismatch_names_files(tmp_path):
    write_fake_fashion_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(7, dtype=np.uint8))
    assert "t10k-labels-idx1-ubyte.gz" in usage_error(load_data, "fashion-mnist", data_dir=str(tmp_path))


@pytest.fixture(scope="module")
def fashion():
    if not HAVE_FASHION_MNIST:
        pytest.skip(f"Fashion-MNIST not installed in {fashion_mnist.SYSTEM_DIR} (dataset-fashion-mnist)")
    start = time.perf_counter()
    data = load_data("fashion-mnist")
    data.seconds_to_load = time.perf_counter() - start
    return data


@needs_fashion_mnist
def test_fashion_mnist_files_and_default_splits(fashion):
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (54000, 6000, 10000)
    assert fashion.train.images.shape == (54000, 1, 28, 28) and fashion.train.images.dtype == torch.uint8
    assert fashion.train.labels.dtype == torch.int64
    assert set(fashion.test.labels.unique().tolist()) == set(range(10))
    assert fashion.num_classes == 10 and fashion.channels == 1 and fashion.image_size == 28
    assert 0.2 < fashion.mean[0] < 0.4 and 0.3 < fashion.std[0] < 0.4
    assert fashion.source == str(fashion_mnist.SYSTEM_DIR)


@needs_fashion_mnist
def test_fashion_mnist_loads_fast(fashion):
    assert fashion.seconds_to_load < 5  # target < 1 s; loose here so a busy machine does not fail it


@needs_fashion_mnist
def test_fashion_mnist_subset_is_stratified_and_keeps_val(fashion):
    subset = load_data("fashion-mnist", train_subset=1003, image_size=32)
    assert len(subset.train) == 1003 and subset.train.images.shape[1:] == (1, 32, 32)
    shares = per_class(subset.train.labels, 10)
    assert shares.min() >= 100 and shares.max() <= 101
    assert torch.equal(subset.val.labels, fashion.val.labels)
    assert np.array_equal(per_class(fashion.val.labels, 10), [600] * 10)


# ------------------------------------------------------------------------------------------------ splits


def test_quotas_are_exact_and_within_one_per_class():
    counts = np.array([500, 37, 3, 120, 1])
    for total in (0, 1, 7, 50, 333, 661):
        quotas = class_quotas(counts, total)
        assert quotas.sum() == total and (quotas <= counts).all()
        assert np.abs(quotas - counts * total / counts.sum()).max() < 1


def test_stratified_split_is_deterministic_and_proportional():
    labels = torch.tensor([0] * 300 + [1] * 90 + [2] * 10)
    indices = torch.arange(len(labels))
    first = stratified_split(indices, labels, [40], torch.Generator().manual_seed(3))
    again = stratified_split(indices, labels, [40], torch.Generator().manual_seed(3))
    other = stratified_split(indices, labels, [40], torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert np.array_equal(per_class(labels[first[0]], 3), [30, 9, 1])
    assert torch.equal(torch.sort(torch.cat(first)).values, indices)  # a partition


def test_split_seed_fixes_val_and_subset_does_not_move_it():
    a = load_data("synthetic", split_seed=1)
    b = load_data("synthetic", split_seed=1, train_subset=100)
    c = load_data("synthetic", split_seed=2)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.val.images, c.val.images)
    assert torch.equal(a.test.images, c.test.images)  # synthetic has its own test set
    assert np.array_equal(per_class(a.val.labels, 10), [20] * 10)
    assert np.array_equal(per_class(b.train.labels, 10), [10] * 10)


def test_val_fraction_zero_gives_empty_val():
    data = load_data("synthetic:n=100,test=20", val_fraction=0)
    assert len(data.val) == 0 and data.val.images.shape == (0, 1, 28, 28) and len(data.train) == 100


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"train_subset": 5}, "train_subset 5 is out of range; allowed: 10"),
        ({"train_subset": 5000}, "to 1800"),
        ({"val_fraction": 0.5}, "val_fraction"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"image_size": 3}, "image_size 3"),
        ({"image_size": 2000}, "image_size 2000"),
    ],
)
def test_bad_common_options(options, expected):
    assert expected in usage_error(load_data, "synthetic", **options)


# ----------------------------------------------------------------------------------------- image folders


def test_imagefolder_without_split_folders(tmp_path):
    root = make_imagefolder(tmp_path / "flat", classes=3, per_class=40)
    (root / "class0" / "notes.txt").write_text("not an image")
    (root / "class0" / ".hidden.png").write_bytes(b"ignored")
    (root / ".thumbnails").mkdir()
    data = load_data(f"imagefolder:{root}")
    assert data.name == "imagefolder" and data.source == str(root.resolve())
    assert data.classes == ["class0", "class1", "class2"]
    assert (len(data.train), len(data.val), len(data.test)) == (84, 12, 24)  # 70/10/20 of 120
    assert np.array_equal(per_class(data.test.labels, 3), [8, 8, 8])
    assert data.channels == 3 and data.image_size == 32 and data.train.images.dtype == torch.uint8
    assert len(data.mean) == 3 and all(0 < s for s in data.std)
    same = load_data("imagefolder", data_dir=str(root))
    assert torch.equal(same.test.images, data.test.images)


def test_imagefolder_with_split_folders(tmp_path):
    root = make_imagefolder(tmp_path / "split", classes=3, per_class=20, mode="L", splits=True)
    data = load_data(f"imagefolder:{root}", image_size=16)
    assert (len(data.train), len(data.val), len(data.test)) == (60, 15, 15)
    assert data.channels == 1 and data.train.images.shape[1:] == (1, 16, 16)

    (root / "val").rename(root / "elsewhere")  # no val/: cut from train/
    (root / "test").rename(root / "Validation")  # spelled differently, any case
    data = load_data(f"imagefolder:{root}", val_fraction=0.2)
    assert (len(data.train), len(data.val), len(data.test)) == (48, 15, 12)


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("RGBA", 3), ("L", 1), ("LA", 1), ("I;16", 1)])
def test_imagefolder_channels(tmp_path, mode, channels):
    root = make_imagefolder(tmp_path / mode.replace(";", ""), classes=2, per_class=5, size=12, mode=mode)
    data = load_data(f"imagefolder:{root}", val_fraction=0)
    assert data.channels == channels and data.train.images.shape[1] == channels
    if channels == 1:  # 16-bit grey is scaled to 8 bits, not clipped
        grey = load_data(f"imagefolder:{make_imagefolder(tmp_path / 'ref', 2, 5, 12, 'L')}", val_fraction=0)
        assert torch.equal(data.train.images, grey.train.images)


def test_imagefolder_mixed_modes_become_rgb(tmp_path):
    root = make_imagefolder(tmp_path / "mixed", classes=2, per_class=4, size=12, mode="L")
    Image.new("RGB", (12, 12), (200, 10, 10)).save(root / "class1" / "colour.png")
    assert load_data(f"imagefolder:{root}", val_fraction=0).channels == 3


def test_imagefolder_resize_and_default_size(tmp_path):
    root = tmp_path / "sizes"
    for label, colour in enumerate(["red", "blue"]):
        (root / colour).mkdir(parents=True)
        for k in range(6):
            width, height = (60, 40) if k < 4 else (90, 90)  # most common shorter side: 40
            image = Image.new("RGB", (width, height), colour)
            image.paste((255, 255, 255), (0, 0, 10, height))  # a white band at the left edge: cropped away
            image.save(root / colour / f"{k}.jpg")
    data = load_data(f"imagefolder:{root}", val_fraction=0)
    assert data.image_size == 40 and data.train.images.shape[2:] == (40, 40)
    red = data.train.images[data.train.labels == data.classes.index("red")].float()
    assert red[:, 0].mean() > 200 and red[:, 2].mean() < 60  # centre crop kept red, not the white band
    assert load_data(f"imagefolder:{root}", image_size=24, val_fraction=0).train.images.shape[2:] == (24, 24)


def test_imagefolder_cache_is_reused_not_redecoded(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "cached", classes=3, per_class=20)
    cache = tmp_path / "mycache"
    first = load_data(f"imagefolder:{root}", cache_dir=str(cache), split_seed=5)
    assert list(cache.glob("decoded-*.npy")) and not list(cache.glob("*.tmp"))

    def no_decoding(*args):
        raise AssertionError("decoded again although the cache holds the images")

    monkeypatch.setattr(image_cache, "decode_image", no_decoding)
    second = load_data(f"imagefolder:{root}", cache_dir=str(cache), split_seed=5)
    for a, b in ((first.train, second.train), (first.val, second.val), (first.test, second.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other_split = load_data(f"imagefolder:{root}", cache_dir=str(cache), split_seed=6)  # another cut, same decode
    assert not torch.equal(other_split.val.images, first.val.images)

    changed = root / "class0" / "img0000.png"
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        load_data(f"imagefolder:{root}", cache_dir=str(cache))


def test_imagefolder_cache_honours_env(tmp_path):
    root = make_imagefolder(tmp_path / "env", classes=2, per_class=5, size=8)
    load_data(f"imagefolder:{root}", val_fraction=0)
    assert list((tmp_path / "cache" / "imagefolder").glob("decoded-*.npy"))


def test_imagefolder_errors(tmp_path):
    assert "does not exist" in usage_error(load_data, f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "file.txt").write_text("x")
    assert "is not a directory" in usage_error(load_data, f"imagefolder:{tmp_path / 'file.txt'}")
    (tmp_path / "bare").mkdir()
    assert "no class folders" in usage_error(load_data, f"imagefolder:{tmp_path / 'bare'}")
    assert "needs a folder" in usage_error(load_data, "imagefolder")

    root = make_imagefolder(tmp_path / "data", classes=2, per_class=5, size=8)
    (root / "class2").mkdir()
    assert "class2" in usage_error(load_data, f"imagefolder:{root}")  # empty class folder, named
    (root / "class2").rmdir()

    one = make_imagefolder(tmp_path / "one", classes=1, per_class=5, size=8)
    assert "only one class" in usage_error(load_data, f"imagefolder:{one}")


def test_imagefolder_corrupt_image_names_the_file(tmp_path):
    root = make_imagefolder(tmp_path / "corrupt", classes=2, per_class=5, size=16)
    bad = root / "class1" / "img0003.png"
    bad.write_bytes(bad.read_bytes()[:60])  # header intact, pixels cut off
    assert str(bad) in usage_error(load_data, f"imagefolder:{root}")
    bad.write_bytes(b"not an image at all")
    assert str(bad) in usage_error(load_data, f"imagefolder:{root}")
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_imagefolder_split_classes_must_match_train(tmp_path):
    root = make_imagefolder(tmp_path / "mismatch", classes=2, per_class=4, size=8, splits=True)
    (root / "test" / "class1").rename(root / "test" / "klass1")
    message = usage_error(load_data, f"imagefolder:{root}")
    assert "klass1" in message and "nearest: class1" in message


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_learnable_but_not_trivial():
    data = load_data("synthetic")
    assert (len(data.train), len(data.val), len(data.test)) == (1800, 200, 500)
    train = data.train.images.flatten(1).float()
    means = torch.stack([train[data.train.labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(data.test.images.flatten(1).float(), means).argmin(1)
    accuracy = (predicted == data.test.labels).float().mean().item()
    assert 0.4 < accuracy < 0.95  # chance is 0.1


def test_synthetic_options_and_determinism():
    data = load_data("synthetic:n=60,test=12,classes=3,channels=3", image_size=20, val_fraction=0)
    assert data.num_classes == 3 and data.train.images.shape == (60, 3, 20, 20) and len(data.test) == 12
    again = load_data("synthetic:n=60,test=12,classes=3,channels=3", image_size=20, val_fraction=0, split_seed=9)
    assert torch.equal(data.test.images, again.test.images)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("synthetic:size=3", "unknown synthetic option 'size'"),
        ("synthetic:clases=3", "nearest: classes"),
        ("synthetic:n=abc", "n='abc'"),
        ("synthetic:n", "needs a value"),
        ("synthetic:channels=2", "channels=2"),
        ("synthetic:classes=1", "classes=1"),
        ("synthetic:n=5", "n=5"),
    ],
)
def test_bad_synthetic_options(spec, expected):
    assert expected in usage_error(load_data, spec)


def test_unknown_dataset_suggests_the_nearest():
    message = usage_error(load_data, "fashion-mnst")
    assert "unknown dataset 'fashion-mnst'" in message and "nearest: fashion-mnist" in message
    assert all(kind in usage_error(load_data, "cifar10") for kind in DATA_KINDS)


# ---------------------------------------------------------------------------------- tiny CNNs learn them


def train_tiny_cnn(data: DataSplits, steps: int) -> float:
    """Test accuracy of a small CNN after a few SGD-with-momentum steps on batches of 32 (updated by hand:
    torch.optim's first use costs a second of imports)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(data.channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.LazyLinear(data.num_classes),
    )  # fmt: skip
    mean, std = torch.tensor(data.mean).view(1, -1, 1, 1), torch.tensor(data.std).view(1, -1, 1, 1)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        return (images.float() / 255 - mean) / std

    net(prepare(data.train.images[:1]))
    velocities = [torch.zeros_like(p) for p in net.parameters()]
    batches = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randint(0, len(data.train), (32,), generator=batches)
        loss = nn.functional.cross_entropy(net(prepare(data.train.images[pick])), data.train.labels[pick])
        net.zero_grad()
        loss.backward()
        with torch.no_grad():
            for parameter, velocity in zip(net.parameters(), velocities):
                parameter -= 0.03 * velocity.mul_(0.9).add_(parameter.grad)
    with torch.no_grad():
        return (net(prepare(data.test.images)).argmax(1) == data.test.labels).float().mean().item()


def test_tiny_cnn_learns_synthetic_and_helper_folders(tmp_path):
    assert train_tiny_cnn(load_data("synthetic"), steps=30) > 0.5  # chance 0.1
    grey = make_imagefolder(tmp_path / "grey", classes=4, per_class=40, size=24, mode="L")
    assert train_tiny_cnn(load_data(f"imagefolder:{grey}"), steps=20) > 0.6  # chance 0.25


def test_imageset_len_and_repr():
    images = ImageSet(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    assert len(images) == 3 and "n=3" in repr(images)
