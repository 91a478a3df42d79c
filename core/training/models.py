"""Building models from their specs, and storing weights safely (safetensors, never pickles)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..contract.api import DatasetSpec, ModelSpec
from ..contract.config import PluginError


class Normalized(nn.Module):
    """Wraps a network so that it takes float images in [0, 1]: attacks that optimise pixels
    (PGD, trigger generation) and the engine then share one input space."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def build(spec: ModelSpec, dataset: DatasetSpec, device=None) -> Normalized:
    model = Normalized(spec.build(num_classes=dataset.num_classes), dataset.mean, dataset.std)
    return model.to(device) if device is not None else model


def classifier_name(model: nn.Module, spec: ModelSpec) -> str:
    """The dotted name of a built model's final linear layer: its own ``classifier_layer`` attribute,
    else the spec's; "" when neither declares one. A declared one is checked to exist and to be an
    ``nn.Linear`` (the model plugin's contract)."""
    inner = getattr(model, "net", model)
    name = getattr(inner, "classifier_layer", None) or spec.classifier_layer
    if not name:
        return ""
    full = ("net." if inner is not model else "") + name
    try:
        layer = model.get_submodule(full)
    except AttributeError:
        raise PluginError(f"model {spec.name!r} ({spec.provider}) breaks the plugin contract: its classifier_layer "
                          f"{name!r} is not a module of the built network") from None
    if not isinstance(layer, nn.Linear):
        raise PluginError(f"model {spec.name!r} ({spec.provider}) breaks the plugin contract: its classifier_layer "
                          f"{name!r} is a {type(layer).__name__}, not an nn.Linear")
    return full


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as safetensors, atomically: a unique temporary file in the same folder, then a
    rename, so concurrent writers or a kill mid-write never leave a broken file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the state dict as safetensors (atomically, see :func:`save_tensors`)."""
    return save_tensors(model.state_dict(), path, metadata)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors state dict (no code is executed, whatever the file's origin)."""
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(path), device=str(device)))
    return model
