"""The data layer: real offline archives, tiny generated ImageFolder trees, the safetensors cache,
seeded subsets, and the torchvision path (faked: the test machines have no internet)."""
from __future__ import annotations

import os
import socket
import tarfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

from nadbench import Split, data
from nadbench.plugins.datasets import cifar10 as cifar10_plugin
from nadbench.plugins.datasets import gtsrb as gtsrb_plugin


# ------------------------------------------------------------------------------- real data

@pytest.fixture(scope="session")
def real_root() -> Path:
    value = os.environ.get("NADBENCH_DATA_ROOT")
    if not value:
        pytest.skip("NADBENCH_DATA_ROOT is not set (point it at the folder holding cifar10-jpeg.tar.xz)")
    if not Path(value).is_dir():
        pytest.skip(f"NADBENCH_DATA_ROOT={value} does not exist")
    return Path(value)


def _spec(plugin):
    specs = []
    plugin.register_datasets(register=specs.append)
    (spec,) = specs
    return spec


@pytest.mark.parametrize("plugin, n_train, n_test", [(cifar10_plugin, 50_000, 10_000),
                                                     (gtsrb_plugin, 39_209, 12_630)],
                         ids=["cifar10", "gtsrb"])
def test_real_dataset_and_cache(real_root, plugin, n_train, n_test, monkeypatch):
    spec = _spec(plugin)
    train, test = spec.load(real_root)  # decodes, unless an earlier test of this session did
    for split, n in ((train, n_train), (test, n_test)):
        assert split.images.shape == (n, 3, 32, 32) and split.images.dtype == torch.uint8
        assert split.labels.shape == (n,) and split.labels.dtype == torch.int64
        assert torch.equal(split.labels.unique(), torch.arange(spec.num_classes))
    # The hard-coded statistics of the plugin match the data (means are cheap to check exactly).
    mean = train.images.sum(dim=(0, 2, 3), dtype=torch.int64).double() / (n_train * 32 * 32 * 255)
    assert torch.allclose(mean, torch.tensor(spec.mean, dtype=torch.float64), atol=2e-3)

    # Second load: served by the cache (decoding is disabled), fast, and identical.
    monkeypatch.setattr(data, "_decode", lambda *a: pytest.fail("decoded instead of using the cache"))
    start = time.perf_counter()
    train2, test2 = spec.load(real_root)
    assert time.perf_counter() - start < 2.0
    assert torch.equal(train.images, train2.images) and torch.equal(train.labels, train2.labels)
    assert torch.equal(test.images, test2.images) and torch.equal(test.labels, test2.labels)


# ----------------------------------------------------------------------- tiny ImageFolder trees

# Class folders are created out of order; labels must follow the sorted names: ant, mole, zebra.
CLASSES = {"zebra": 200, "ant": 40, "mole": 120}  # red channel of every image of the class


def _make_tree(base: Path, name: str = "toy") -> dict[str, tuple[list[int], list[tuple[int, int, int]]]]:
    """Write base/<name>/{train,test}/<class>/<file>.png; return per split the expected labels
    and RGB colours in load order (class sorted, then file name sorted)."""
    expected = {}
    for split, files in (("train", ["b.png", "a.png", "c.png"]), ("test", ["x.png", "w.png"])):
        rows = []
        for cls, red in CLASSES.items():
            folder = base / name / split / cls
            folder.mkdir(parents=True)
            (folder / ".DS_Store").write_bytes(b"junk")  # hidden and non-image files are skipped
            (folder / "notes.txt").write_text("not an image")
            for i, file in enumerate(files):
                colour = (red, 10 * (ord(file[0]) - ord("a")), 7)
                size = (40, 24) if i == 0 else (32, 32)  # the first one needs a resize
                Image.new("RGB", size, colour).save(folder / file)
                rows.append((cls, file, colour))
        # A grayscale image, converted to RGB.
        gray = base / name / split / "ant" / "zz.png"
        Image.new("L", (32, 32), 99).save(gray)
        rows.append(("ant", "zz.png", (99, 99, 99)))
        rows.sort(key=lambda r: (r[0], r[1]))
        labels = [sorted(CLASSES).index(cls) for cls, _, _ in rows]
        expected[split] = (labels, [colour for _, _, colour in rows])
    return expected


def _check(split: Split, labels: list[int], colours: list[tuple[int, int, int]]) -> None:
    assert split.images.shape == (len(labels), 3, 32, 32) and split.images.dtype == torch.uint8
    assert split.labels.tolist() == labels
    want = torch.tensor(colours, dtype=torch.uint8)[:, :, None, None].expand(-1, -1, 32, 32)
    assert torch.equal(split.images, want)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NADBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_imagefolder_folder_labels_order_and_cache(tmp_path, fresh_cache, monkeypatch):
    expected = _make_tree(tmp_path / "data")
    train, test = data.load_imagefolder(tmp_path / "data", "toy")
    _check(train, *expected["train"])
    _check(test, *expected["test"])
    assert len(list((fresh_cache / "datasets").glob("toy-*.safetensors"))) == 1
    assert not list((fresh_cache / "datasets").glob("*.tmp"))

    # The <name> folder itself is accepted as root, and the second load comes from the cache.
    with monkeypatch.context() as mp:
        mp.setattr(data, "_decode", lambda *a: pytest.fail("decoded instead of using the cache"))
        train2, _ = data.load_imagefolder(tmp_path / "data" / "toy", "toy")
    assert torch.equal(train.images, train2.images)

    # Adding an image changes the class folder's mtime: the cache entry no longer applies.
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "data" / "toy" / "train" / "mole" / "d.png")
    train3, _ = data.load_imagefolder(tmp_path / "data", "toy")
    assert len(train3) == len(train) + 1


def test_unreadable_cache_file_is_replaced(tmp_path, fresh_cache):
    expected = _make_tree(tmp_path / "data")
    data.load_imagefolder(tmp_path / "data", "toy")
    (cache_file,) = (fresh_cache / "datasets").glob("toy-*.safetensors")
    cache_file.write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        train, _ = data.load_imagefolder(tmp_path / "data", "toy")
    _check(train, *expected["train"])
    assert data._read_cache(cache_file) is not None


def test_imagefolder_archive_matches_folder(tmp_path, fresh_cache):
    expected = _make_tree(tmp_path / "data")
    archives = tmp_path / "archives"
    archives.mkdir()
    with tarfile.open(archives / "other.tar.gz", "w:gz") as tar:  # a decoy with another top folder
        tar.add(tmp_path / "data" / "toy", arcname="other")
    with tarfile.open(archives / "toy-images.tar.xz", "w:xz") as tar:
        tar.add(tmp_path / "data" / "toy", arcname="toy")
    train, test = data.load_dataset("toy", archives)
    _check(train, *expected["train"])
    _check(test, *expected["test"])


def test_imagefolder_missing_says_what_it_expected(tmp_path, fresh_cache):
    with pytest.raises(data.DataError, match=r"toy/\{train,test\}/<class>/<image>"):
        data.load_imagefolder(tmp_path, "toy")


# --------------------------------------------------------------------------------- subsets

def _indexed(n: int) -> Split:
    """A split whose labels are the image indices, so subsets are easy to identify."""
    return Split(torch.arange(n, dtype=torch.uint8).repeat_interleave(3 * 4).view(n, 3, 2, 2),
                 torch.arange(n, dtype=torch.int64))


def test_clean_subset_is_seeded_and_sized():
    train = _indexed(200)
    torch.manual_seed(1)
    a = data.clean_subset(train, 0.05, seed=3)
    torch.manual_seed(2)  # the global RNG state must not matter
    b = data.clean_subset(train, 0.05, seed=3)
    assert len(a) == 10 and torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    assert len(a.labels.unique()) == 10 and torch.equal(a.images[:, 0, 0, 0].long(), a.labels)
    assert not torch.equal(a.labels, data.clean_subset(train, 0.05, seed=4).labels)
    with pytest.raises(ValueError):
        data.clean_subset(train, 0.0, seed=0)


def test_limit():
    split = _indexed(50)
    assert data.limit(split, None, seed=0) is split and data.limit(split, 80, seed=0) is split
    small = data.limit(split, 7, seed=0)
    assert len(small) == 7 and torch.equal(small.labels, data.limit(split, 7, seed=0).labels)


# ------------------------------------------------------------------- torchvision (faked, offline)

class _OfflineCIFAR10:
    """Fails the way torchvision does without a network: urlopen raises URLError."""

    def __init__(self, root, train=True, download=False, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))


def test_no_data_and_no_internet_gives_a_helpful_error(tmp_path, fresh_cache, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _OfflineCIFAR10)
    (tmp_path / "empty").mkdir()  # an existing, empty data root is a download target
    with pytest.raises(data.DataError) as info:
        data.load_dataset("cifar10", tmp_path / "empty")
    message = str(info.value)
    for part in (str(tmp_path / "empty"), "cifar10/{train,test}/<class>/<image>", "URLError",
                 "--data-root DIR", "NADBENCH_DATA_ROOT=DIR"):
        assert part in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)

    with pytest.raises(data.DataError) as info:
        data.load_dataset("cifar10", None)
    assert str(fresh_cache / "torchvision") in str(info.value) and "--data-root" in str(info.value)


def test_torchvision_adapters(tmp_path, fresh_cache, monkeypatch):
    rng = np.random.default_rng(0)
    made = {}

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False):
            assert download
            n = 20 if train else 8
            self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = [i % 10 for i in range(n)]
            made["train" if train else "test"] = (root, self.data)

    class FakeGTSRB:
        def __init__(self, root, split="train", download=False):
            self.sizes = [(15, 20), (32, 32), (250, 100)]

        def __len__(self):
            return len(self.sizes)

        def __getitem__(self, i):
            return Image.new("RGB", self.sizes[i], (i, 2 * i, 3 * i)), 40 + i

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    monkeypatch.setattr(torchvision.datasets, "GTSRB", FakeGTSRB)

    train, test = data.load_dataset("cifar10", None)  # no root: download into the cache
    assert made["train"][0] == str(fresh_cache / "torchvision")
    assert torch.equal(train.images, torch.from_numpy(made["train"][1]).permute(0, 3, 1, 2))
    assert train.labels.tolist() == [i % 10 for i in range(20)] and train.labels.dtype == torch.int64
    assert test.images.shape == (8, 3, 32, 32) and test.images.is_contiguous()

    # Cached: a second load does not need torchvision (or the network) any more.
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _OfflineCIFAR10)
    train2, _ = data.load_dataset("cifar10", None)
    assert torch.equal(train.images, train2.images)

    train, test = data.load_torchvision("gtsrb", tmp_path / "tv")
    assert train.images.shape == (3, 3, 32, 32) and train.labels.tolist() == [40, 41, 42]
    assert train.images[2, :, 5, 5].tolist() == [2, 4, 6]  # resized whole frame keeps the colour


def test_locations(tmp_path, monkeypatch):
    monkeypatch.setenv("NADBENCH_DATA_ROOT", str(tmp_path / "env"))
    assert data.data_root("given") == Path("given")
    assert data.data_root(None) == tmp_path / "env"
    monkeypatch.delenv("NADBENCH_DATA_ROOT")
    assert data.data_root(None) is None
    monkeypatch.setenv("NADBENCH_CACHE", str(tmp_path / "c" / "d"))
    assert data.cache_dir() == tmp_path / "c" / "d" and data.cache_dir().is_dir()
