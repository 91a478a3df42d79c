"""Building models from their specs, and storing weights safely (safetensors, never pickles)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .api import DatasetSpec, ModelSpec


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


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the state dict as safetensors (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors state dict (no code is executed, whatever the file's origin)."""
    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(path), device=str(device)))
    return model
