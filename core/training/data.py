"""The data layer: load a dataset as uint8 tensors from a local ImageFolder tree or archive, or
through torchvision's downloaders, and cache the decoded arrays as safetensors.

Everything the engine trains on is a :class:`~nadbench.contract.api.Split` of uint8 images (N, 3, 32, 32)
and int64 labels (N,) on the CPU; augmentation and normalisation happen later, batched on the
device. Decoding 60,000 JPEGs takes seconds, so the result is cached under
``cache_dir()/datasets`` and a second load only reads one safetensors file.
"""
from __future__ import annotations

import hashlib
import io
import lzma
import os
import tarfile
import warnings
import zlib
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from ..contract.api import Split
from .models import save_tensors
from .subsets import clean_subset, limit  # noqa: F401 — part of this module's API

__all__ = ["DataError", "cache_dir", "clean_subset", "data_root", "limit", "load_dataset",
           "load_imagefolder", "load_torchvision"]

IMAGE_SIZE = 32
SPLITS = ("train", "test")
ARCHIVE_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Bump when the decoding or the cache file format changes: old cache files are then ignored.
_CACHE_VERSION = "1"
DATASETS_DIR = "datasets"  # under cache_dir()


class DataError(RuntimeError):
    """A dataset could not be found or loaded; the message says where we looked and what to do."""


# --------------------------------------------------------------------------------------- locations

def data_root(value: str | Path | None = None) -> Path | None:
    """The local data folder: the CLI's ``--data-root`` value, else ``$NADBENCH_DATA_ROOT``, else None."""
    value = value or os.environ.get("NADBENCH_DATA_ROOT") or None
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """``$NADBENCH_CACHE`` or ``~/.cache/nadbench``, created on demand."""
    path = Path(os.environ.get("NADBENCH_CACHE") or "~/.cache/nadbench").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _layout_help(name: str, root: Path | str) -> str:
    return (f"expected either a folder {root}/{name}/{{train,test}}/<class>/<image> or an archive "
            f"{root}/<anything>{{{','.join(ARCHIVE_SUFFIXES)}}} whose top folder is {name}/; "
            f"class folders sort into label order")


def _find_local(root: Path, name: str) -> Path | None:
    """The folder or archive under ``root`` that holds dataset ``name``, or None."""
    if root.is_file():
        return root if root.name.endswith(ARCHIVE_SUFFIXES) and _archive_top(root) == name else None
    candidates = [root / name] + ([root] if root.name == name else [])
    for folder in candidates:
        if all((folder / split).is_dir() for split in SPLITS):
            return folder
    if not root.is_dir():
        return None
    archives = sorted(p for p in root.iterdir() if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES))
    # Archives named after the dataset first: peeking into each one costs a little decompression.
    for path in sorted(archives, key=lambda p: not p.name.lower().startswith(name.lower())):
        if _archive_top(path) == name:
            return path
    return None


def _archive_top(path: Path) -> str | None:
    """The top folder of an archive, read from its first member (no full decompression)."""
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                parts = _parts(member.name)
                if parts:
                    return parts[0]
    except (tarfile.TarError, OSError, EOFError):
        return None
    return None


def _parts(member_name: str) -> tuple[str, ...]:
    return tuple(p for p in PurePosixPath(member_name).parts if p not in (".", "/"))


# ------------------------------------------------------------------------------------------- cache

def _fingerprint(source: Path) -> str:
    """Path, size and mtime of the source; for a folder, also of its split and class folders (whose
    mtimes change when images are added, removed or renamed) and the number of entries in each
    class folder (for file systems with coarse mtimes). Much cheaper than stat-ing all 60,000
    images; an image edited in place goes unnoticed (delete the cache file, or touch its folder)."""
    if not source.exists():
        return f"{source.resolve()}:missing"
    source = source.resolve()
    splits = sorted(source.iterdir()) if source.is_dir() else []
    classes = sorted(p for d in splits if d.is_dir() for p in d.iterdir())
    lines = []
    for path in [source, *splits, *classes]:
        st = path.stat()
        lines.append(f"{path}:{st.st_size}:{st.st_mtime_ns}")
    lines += [f"{path}:{len(os.listdir(path))}" for path in classes if path.is_dir()]
    return "\n".join(lines)


def _cache_path(name: str, source: Path, kind: str) -> Path:
    key = hashlib.sha256(f"{_CACHE_VERSION}\n{name}\n{kind}\n{_fingerprint(source)}".encode()).hexdigest()
    return cache_dir() / DATASETS_DIR / f"{name}-{kind}-{key[:20]}.safetensors"


def _read_cache(path: Path) -> tuple[Split, Split] | None:
    if not path.is_file():
        return None
    try:
        t = load_file(path)
        return Split(t["train_images"], t["train_labels"]), Split(t["test_images"], t["test_labels"])
    except Exception as exc:  # a truncated or foreign file: decode again and overwrite it
        warnings.warn(f"ignoring unreadable dataset cache {path}: {exc}", stacklevel=3)
        return None


def _write_cache(path: Path, name: str, source: Path, train: Split, test: Split) -> None:
    """Atomic (tmp file + os.replace), so a concurrent or interrupted run never sees half a file.
    A read-only cache only costs speed, so failures are a warning."""
    tensors = {"train_images": train.images, "train_labels": train.labels,
               "test_images": test.images, "test_labels": test.labels}
    try:
        save_tensors(tensors, path, {"dataset": name, "source": str(source), "version": _CACHE_VERSION})
    except OSError as exc:
        warnings.warn(f"could not write dataset cache {path}: {exc}", stacklevel=3)


# ---------------------------------------------------------------------------------------- decoding

def _to_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 (32, 32, 3); bilinear resize of the whole frame only when the size differs."""
    image = image.convert("RGB")
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return _to_array(image)


def _to_split(arrays: list[np.ndarray] | np.ndarray, labels: Iterable[int]) -> Split:
    """NHWC uint8 arrays -> Split with contiguous NCHW images."""
    images = torch.from_numpy(np.ascontiguousarray(np.stack(arrays) if isinstance(arrays, list) else arrays))
    return Split(images.permute(0, 3, 1, 2).contiguous(), torch.as_tensor(list(labels), dtype=torch.int64))


def _is_image(parts: tuple[str, ...]) -> bool:
    return not any(p.startswith(".") for p in parts) and parts[-1].lower().endswith(IMAGE_SUFFIXES)


def _folder_items(folder: Path) -> Iterator[tuple[str, str, str, bytes]]:
    """(split, class, file name, bytes) for every image of an ImageFolder tree."""
    for split in SPLITS:
        for dirpath, _, files in os.walk(folder / split):
            rel = Path(dirpath).relative_to(folder / split).parts
            for file in files:
                if rel and _is_image(rel + (file,)):
                    yield split, rel[0], "/".join(rel[1:] + (file,)), (Path(dirpath) / file).read_bytes()


def _archive_items(path: Path, name: str) -> Iterator[tuple[str, str, str, bytes]]:
    """The same from an archive, streamed member by member (nothing is extracted to disk)."""
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            parts = _parts(member.name)
            if (member.isfile() and len(parts) >= 4 and parts[0] == name and parts[1] in SPLITS
                    and _is_image(parts[2:])):
                yield parts[1], parts[2], "/".join(parts[3:]), tar.extractfile(member).read()


def _decode_items(items: Iterable[tuple[str, str, str, bytes]], where: str) -> tuple[Split, Split]:
    """Decode, then order by (class, file name) and label by sorted class folder.

    Decoding runs in this thread as the items stream in: for tiny JPEGs on a 2-core machine a
    thread pool was slower (the per-image work is too small to win back the GIL hand-offs), and
    decompressing the archive in a second thread saved little.
    """
    found: dict[str, list[tuple[str, str, np.ndarray]]] = {split: [] for split in SPLITS}
    for split, cls, file, data in items:
        try:
            found[split].append((cls, file, _decode(data)))
        except Exception as exc:
            raise DataError(f"cannot decode {where}: {split}/{cls}/{file}: {exc}") from exc
    classes = sorted({cls for entries in found.values() for cls, _, _ in entries})
    index = {cls: i for i, cls in enumerate(classes)}
    splits = []
    for split in SPLITS:
        entries = sorted(found[split], key=lambda e: (e[0], e[1]))
        if not entries:
            raise DataError(f"no images under {split}/ in {where}")
        splits.append(_to_split([e[2] for e in entries], (index[e[0]] for e in entries)))
    return splits[0], splits[1]


# --------------------------------------------------------------------------------------- loaders

def load_imagefolder(root: Path, name: str) -> tuple[Split, Split]:
    """(train, test) of dataset ``name`` from ``root/<name>/{train,test}/<class>/<image>`` (``root``
    may also be that folder itself) or from an archive in ``root`` whose top folder is ``<name>/``.
    Labels are class folder indices in sorted order; the decoded arrays are cached."""
    root = Path(root).expanduser()
    source = _find_local(root, name)
    if source is None:
        raise DataError(f"dataset {name!r} not found in {root}: {_layout_help(name, root)}")
    cache = _cache_path(name, source, "imagefolder")
    if (cached := _read_cache(cache)) is not None:
        return cached
    items = _folder_items(source) if source.is_dir() else _archive_items(source, name)
    try:
        train, test = _decode_items(items, str(source))
    except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError) as exc:
        raise DataError(
            f"cannot read dataset {name!r} from {source}: {type(exc).__name__}: {exc}. The "
            f"{'archive' if source.is_file() else 'folder'} is truncated or corrupt: replace it with a good copy "
            f"(check an archive against its SHA256SUMS with `sha256sum -c SHA256SUMS`, or let torchvision "
            f"download the dataset by leaving out --data-root)") from exc
    _write_cache(cache, name, source, train, test)
    return train, test


def _torchvision_cifar10(root: Path) -> tuple[Split, Split]:
    from torchvision import datasets

    splits = []
    for train in (True, False):
        ds = datasets.CIFAR10(str(root), train=train, download=True)
        splits.append(_to_split(np.asarray(ds.data, dtype=np.uint8), ds.targets))  # already 32x32 NHWC
    return splits[0], splits[1]


def _torchvision_gtsrb(root: Path) -> tuple[Split, Split]:
    """Images come in many sizes: each whole frame is resized to 32x32 (bilinear, no ROI crop), the
    same preprocessing as the offline archive in the project's shared data."""
    from torchvision import datasets

    splits = []
    for split in SPLITS:
        ds = datasets.GTSRB(str(root), split=split, download=True)
        pairs = [ds[i] for i in range(len(ds))]
        splits.append(_to_split([_to_array(image) for image, _ in pairs], (label for _, label in pairs)))
    return splits[0], splits[1]


# name -> (loader, the folder torchvision keeps the data in, below the download root)
_TORCHVISION = {"cifar10": (_torchvision_cifar10, "cifar-10-batches-py"),
                "gtsrb": (_torchvision_gtsrb, "gtsrb")}


def load_torchvision(name: str, download_root: Path) -> tuple[Split, Split]:
    """(train, test) through torchvision's downloader (needs internet the first time; files already
    in ``download_root`` in torchvision's own layout are reused). The decoded arrays are cached."""
    if name not in _TORCHVISION:
        raise DataError(f"no torchvision downloader for dataset {name!r} (have: {', '.join(_TORCHVISION)})")
    loader, folder = _TORCHVISION[name]
    download_root = Path(download_root).expanduser()
    if (cached := _read_cache(_cache_path(name, download_root / folder, "torchvision"))) is not None:
        return cached
    train, test = loader(download_root)
    # Keyed again: the download has just created (or changed) the folder.
    _write_cache(_cache_path(name, download_root / folder, "torchvision"), name, download_root / folder,
                 train, test)
    return train, test


def load_dataset(name: str, root: Path | None) -> tuple[Split, Split]:
    """The entry point of the dataset plugins: the local copy in ``root`` if there is one, else a
    torchvision download into ``root`` (or, with no root, into ``cache_dir()/torchvision``)."""
    if root is not None:
        root = Path(root).expanduser()
        if not root.exists():  # a typo: never a download target
            raise DataError(f"data root {root} does not exist (from --data-root or NADBENCH_DATA_ROOT): "
                            f"{_layout_help(name, root)}")
        if _find_local(root, name) is not None:
            return load_imagefolder(root, name)
    target = root if root is not None else cache_dir() / "torchvision"
    try:
        return load_torchvision(name, target)
    except DataError:
        raise
    except Exception as exc:  # no internet shows up as URLError, socket errors or RuntimeError
        looked = (f"no local copy of {name!r} in {root} ({_layout_help(name, root)})" if root is not None
                  else "no data root given (neither --data-root nor NADBENCH_DATA_ROOT is set)")
        raise DataError(
            f"cannot load dataset {name!r}: {looked}, and the torchvision download into {target} failed "
            f"({type(exc).__name__}: {exc}). Without internet, put the data in the layout "
            f"DIR/{name}/{{train,test}}/<class>/<image> (or an archive DIR/<anything>.tar.xz with top "
            f"folder {name}/) and point nadbench at it with `--data-root DIR` or `NADBENCH_DATA_ROOT=DIR`."
        ) from exc


def digest(split: Split) -> str:
    """sha256 of a split's images and labels as they are (shape, dtype and bytes): what the stage
    keys hold for the data, so two data roots with one layout and different images never share a
    stored poisoning or model."""
    h = hashlib.sha256()
    for t in (split.images, split.labels):
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.numpy())  # the buffer itself: no copy
    return h.hexdigest()


class GridData:
    """A grid's datasets as its profile limits them (``train_limit``, ``test_limit``): on the CPU with
    their content digests, which keys need before any stage runs (the driver of a grid with workers
    never trains), and on the grid's device, loaded once each."""

    def __init__(self, registry, profile, data_root, device):
        self.registry, self.profile, self.data_root, self.device = registry, profile, data_root, device
        self._cpu: dict[str, tuple] = {}
        self._device: dict[str, tuple] = {}

    def on_cpu(self, name: str) -> tuple:
        """(train, test, digests) on the CPU."""
        if name not in self._cpu:
            train_set, test_set = self.registry.dataset(name).load(self.data_root)
            train_set = limit(train_set, self.profile.train_limit, seed=0)
            test_set = limit(test_set, self.profile.test_limit, seed=0)
            self._cpu[name] = (train_set, test_set, {"train": digest(train_set), "test": digest(test_set)})
        return self._cpu[name]

    def digests(self, name: str) -> dict[str, str]:
        return self.on_cpu(name)[2]

    def on_device(self, name: str) -> tuple:
        """(spec, train, test) on the device."""
        if name not in self._device:
            train_set, test_set, _ = self.on_cpu(name)
            self._device[name] = (self.registry.dataset(name), train_set.to(self.device), test_set.to(self.device))
        return self._device[name]
