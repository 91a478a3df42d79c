"""What a practitioner was handed: a model file from an untrusted party, and image folders.

A model file is read only as safetensors, and only after its header has been checked by hand: a
pickle-based file (``torch.save``: ``.pt``, ``.pth``, ``.bin``, ``.ckpt``) can run code when loaded
(``weights_only=True`` has had bypasses), so it is refused without being opened by ``torch.load``
or ``pickle`` at all.
"""
from __future__ import annotations

import csv
import io
import json
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..contract.api import ModelSpec, Split
from ..training.models import Normalized

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".pyt", ".model")
MAX_HEADER = 64 * 2**20  # a state dict's JSON header is kilobytes; anything near this is hostile
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".gif", ".webp", ".tif", ".tiff")
ARCHIVES = (".tar", ".tar.xz", ".tar.gz", ".tgz", ".zip")
CONVERT = ("convert it to safetensors on a trusted machine, from a file you trust: python -c \"import torch; "
           "from safetensors.torch import save_file; sd = torch.load('MODEL.pt', weights_only=True); "
           "save_file({k: v.contiguous() for k, v in sd.items()}, 'MODEL.safetensors')\"")


class HandoverError(ValueError):
    """A file or folder the user gave cannot be used; one line that says why and what to do."""


# ------------------------------------------------------------------------------------ model files

def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, after checking its header: never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise HandoverError(f"{path}: no such file")
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        raise HandoverError(f"{path}: refused: a {path.suffix} file is a pickle, which runs code when "
                            f"loaded; nadbench reads only safetensors. To use this model, {CONVERT}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HandoverError(f"{path}: refused: {size} bytes is too short for a safetensors file (truncated?)")
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise HandoverError(f"{path}: refused: this is a pickle or zip file (torch.save), not safetensors; "
                                f"to use it, {CONVERT}")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER:
            raise HandoverError(f"{path}: refused: not a safetensors file (it declares a {n:,}-byte header)")
        if 8 + n > size:
            raise HandoverError(f"{path}: refused: truncated safetensors file (header of {n:,} bytes, "
                                f"file of {size:,})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HandoverError(f"{path}: refused: malformed safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise HandoverError(f"{path}: refused: malformed safetensors header (not a JSON object)")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data):
            raise HandoverError(f"{path}: refused: truncated or malformed safetensors file (tensor {name!r} "
                                f"lies outside the file's {data:,} data bytes)")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 — whatever the library says, one line
        raise HandoverError(f"{path}: refused: unreadable safetensors file ({type(exc).__name__}: {exc})") from None


def _normalization(tensors: dict, mean, std, path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalisation: the file's own (nadbench's wrapper) or the user's, never both at odds."""
    if "mean" in tensors and "std" in tensors:
        own = tuple(tensors["mean"].flatten().tolist()), tuple(tensors["std"].flatten().tolist())
        if mean is not None and not np.allclose(own[0], mean, atol=1e-4):
            raise HandoverError(f"{path} carries its own input normalisation mean {_fmt(own[0])}, which "
                                f"contradicts the given {_fmt(mean)}; leave out --mean/--std/--normalize")
        if std is not None and not np.allclose(own[1], std, atol=1e-4):
            raise HandoverError(f"{path} carries its own input normalisation std {_fmt(own[1])}, which "
                                f"contradicts the given {_fmt(std)}; leave out --mean/--std/--normalize")
        return own
    if mean is None or std is None:
        raise HandoverError(f"{path} is a bare state dict: say which input normalisation the model expects, "
                            "with --mean/--std (e.g. 0,0,0 and 1,1,1 for raw [0, 1] pixels) or --normalize DATASET")
    return tuple(mean), tuple(std)


def _fmt(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def load_model(path: str | Path, spec: ModelSpec, num_classes: int, mean=None, std=None) -> Normalized:
    """A model of architecture ``spec`` with the weights of a safetensors file, with or without
    nadbench's input-normalisation wrapper. Every mismatch is one ``HandoverError``."""
    path = Path(path)
    tensors, _ = read_safetensors(path)
    mean, std = _normalization(tensors, mean, std, path)
    bare = {k[4:]: v for k, v in tensors.items() if k.startswith("net.")} if "mean" in tensors else \
        {k: v for k, v in tensors.items() if k not in ("mean", "std")}
    net = spec.build(num_classes)
    expected = net.state_dict()
    missing = [k for k in expected if k not in bare]
    unexpected = [k for k in bare if k not in expected]
    wrong = [k for k in expected if k in bare and bare[k].shape != expected[k].shape]
    if wrong and not missing and not unexpected:
        # Only the output layer differs: a class-count mismatch, said with both numbers.
        classes = {bare[k].shape[0] for k in wrong if expected[k].shape[0] == num_classes}
        if len(classes) == 1 and all(bare[k].shape[1:] == expected[k].shape[1:] for k in wrong):
            raise HandoverError(f"{path} has {classes.pop()} output classes but the data has {num_classes}")
    if missing or unexpected or wrong:
        parts = [f"{label}: {_some(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected),
                  ("wrong shape", [f"{k} {tuple(bare[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong]))
                 if keys]
        raise HandoverError(f"{path} does not fit architecture {spec.name!r}: {'; '.join(parts)}")
    net.load_state_dict(bare)
    return Normalized(net, mean, std)


def _some(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def model_outputs(model: nn.Module) -> int:
    """Number of classes a model predicts (one forward pass on a blank image)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        return int(model.eval()(torch.zeros(1, 3, 32, 32, device=device)).shape[-1])


# ----------------------------------------------------------------------------------- image folders

def _image_entries(path: Path) -> Iterator[tuple[tuple[str, ...], bytes]]:
    """(path parts below the root, bytes) of every file in a folder or an archive (not extracted)."""
    name = path.name.lower()
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file():
                yield file.relative_to(path).parts, file.read_bytes()
    elif name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield PurePosixPath(info.filename).parts, zf.read(info)
    elif name.endswith((".tar", ".tar.xz", ".tar.gz", ".tgz")):
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    yield PurePosixPath(member.name).parts, tar.extractfile(member).read()
    else:
        raise HandoverError(f"{path}: not a folder or an archive ({', '.join(ARCHIVES)})")


TARGETS_FILE = "targets.csv"  # beside the class folders: "file,target" per image (`bench attack`)


def _listing(path: Path, flat: bool = False,
             targets: bool = False) -> tuple[list[tuple[str, tuple[str, ...], bytes]], dict | None]:
    """(class, path parts, bytes) of each image of an ImageFolder tree (``flat``: images directly in the
    folder too, of class "-"), and (with ``targets``) the targets.csv rows when there is one."""
    if not path.exists():
        raise HandoverError(f"{path}: no such folder or archive")
    found: list[tuple[str, tuple[str, ...], bytes]] = []
    listed: dict[str, int] | None = None
    try:
        for parts, data in _image_entries(path):
            if targets and parts[-1] == TARGETS_FILE and len(parts) <= 2:
                listed = _read_targets(path, data)
            if (len(parts) >= 2 or flat) and parts[-1].lower().endswith(IMAGE_SUFFIXES) and not any(
                    p.startswith(".") for p in parts):
                found.append((parts[-2] if len(parts) >= 2 else "-", parts, data))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise HandoverError(f"{path}: unreadable archive ({type(exc).__name__}: {exc})") from None
    if not found:
        raise HandoverError(f"{path}: no images found (expected <class>/<image> with one of "
                            f"{', '.join(IMAGE_SUFFIXES)})")
    return sorted(found, key=lambda e: e[1]), listed


def image_names(path: str | Path, flat: bool = False) -> list[str]:
    """The images of a folder or archive as :func:`load_image_folder` orders them, by their path in it."""
    return ["/".join(parts) for _, parts, _ in _listing(Path(path), flat)[0]]


def load_image_folder(path: str | Path, image_size: int = 32, targets: bool = False, flat: bool = False):
    """An ImageFolder tree (``<class>/<image>``, optionally under one top folder) from a folder or
    archive: (uint8 split, class folder names, number of images resized to ``image_size``).

    Labels: class folders named by integers are those labels (so a folder of triggered images may
    lack the target class); other names are numbered in sorted order, as torchvision does (`bench
    defend` then relabels a --test or --triggered folder by the clean data's class names).

    ``targets``: also return each image's backdoor target from the folder's ``targets.csv`` (None
    when it has none), as a fourth item. ``flat``: images directly in the folder are read too (class "-")."""
    from PIL import Image

    path = Path(path)
    found, listed = _listing(path, flat, targets)
    classes = sorted({cls for cls, _, _ in found})
    numeric = all(c.isdigit() for c in classes)
    index = {c: (int(c) if numeric else i) for i, c in enumerate(classes)}
    images, labels, resized = [], [], 0
    for cls, parts, data in found:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert("RGB")
                if image.size != (image_size, image_size):
                    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
                    resized += 1
                images.append(np.asarray(image, dtype=np.uint8))
        except Exception as exc:  # noqa: BLE001
            raise HandoverError(f"{path}: cannot decode {'/'.join(parts)} ({exc})") from None
        labels.append(index[cls])
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    split = Split(tensor, torch.tensor(labels, dtype=torch.int64))
    if not targets:
        return split, classes, resized
    if listed is None:
        return split, classes, resized, None
    names = ["/".join(parts[-2:]) for _, parts, _ in found]
    missing = [n for n in names if n not in listed]
    if missing:
        raise HandoverError(f"{path}: {TARGETS_FILE} gives no target for {len(missing)} image(s), e.g. {missing[0]}")
    return split, classes, resized, torch.tensor([listed[n] for n in names], dtype=torch.int64)


def _read_targets(path, data: bytes) -> dict[str, int]:
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
    try:
        return {file: int(target) for file, target in rows[1:]}
    except ValueError:
        raise HandoverError(f"{path}: {TARGETS_FILE} must hold rows of file,target (an integer label)") from None


def save_image_folder(split: Split, folder: str | Path, width: int = 0, targets: torch.Tensor | None = None) -> Path:
    """Write a split as PNG files (lossless) under ``folder/<label>/<index>.png``; class folders are
    named by the label, zero-padded to ``width``, so reading them back keeps the labels. ``targets``
    (each image's backdoor target) go to ``folder/targets.csv`` as rows of file,target."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)  # even for no image (an attack's set may select none)
    width = width or len(str(int(split.labels.max()) if len(split) else 0))
    rows = [("file", "target")]
    for i, (image, label) in enumerate(zip(split.images.cpu(), split.labels.cpu().tolist())):
        name = f"{label:0{width}d}/{i:05d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / name)
        if targets is not None:
            rows.append((name, int(targets[i])))
    if targets is not None:
        with open(folder / TARGETS_FILE, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return folder
