"""The poison stage: an attack crafts its trigger, poisons the training set and builds the ASR set;
what it changed is stored, and a stored poisoning is restored exactly (never re-crafted).
Stage keys hash this module (see ``nadbench.engine.codehash``), so an edit here re-crafts poisonings.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..contract.api import AttackContext, Split
from ..contract.config import PluginError


@dataclass
class Poisoning:
    """The output of the poison stage: the poisoned training set, the indices the attack chose, the
    ASR set (triggered test images whose target differs from their label, labels kept) with each
    one's target, the images the attack logged, and the sets of its own evaluations (name ->
    (triggered images, targets), see :func:`evaluation_sets`). Stored by key, so a cache hit reuses
    exactly what the attack crafted (it is never re-crafted)."""

    key: str
    attack: Any               # the configured attack (prepared only when this process crafted it)
    poisoned: Split
    index: torch.Tensor
    triggered: Split
    targets: torch.Tensor     # the target label of each image of ``triggered``
    images: dict[str, torch.Tensor]
    hit: bool
    evaluations: dict[str, tuple[Split, torch.Tensor]] = field(default_factory=dict)


def evaluation_sets(attack, test: Split) -> dict[str, tuple[Split, torch.Tensor]]:
    """The sets of the attack's own evaluations (``Attack.evaluations``): per name, the triggered test
    images whose target is not their own label (labels kept) and their targets, as the ASR set."""
    out = {}
    for name, targets in attack.evaluations(test.labels).items():
        if not (isinstance(name, str) and name.isidentifier() and isinstance(targets, torch.Tensor)
                and targets.shape == test.labels.shape):
            raise PluginError(f"attack {attack.name!r} ({attack.provider}) breaks the plugin contract: evaluations() "
                              f"must map identifiers to a target per test image, as targets() gives them; it gave "
                              f"{name!r}: {type(targets).__name__} {tuple(getattr(targets, 'shape', ()))} for "
                              f"{len(test)} images")
        keep = targets != test.labels
        out[name] = (Split(attack.apply_trigger(test.images[keep]), test.labels[keep]), targets[keep])
    return out


def pack(sets: dict[str, tuple[Split, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Evaluation sets as tensors to store (``eval/<name>/images|labels|targets``)."""
    return {f"eval/{name}/{k}": v for name, (split, targets) in sets.items()
            for k, v in (("images", split.images), ("labels", split.labels), ("targets", targets))}


def unpack(stored: dict[str, torch.Tensor], device) -> dict[str, tuple[Split, torch.Tensor]]:
    """What :func:`pack` stored, on ``device``."""
    names = sorted({k.split("/")[1] for k in stored if k.startswith("eval/")})
    return {n: (Split(stored[f"eval/{n}/images"].to(device), stored[f"eval/{n}/labels"].to(device)),
                stored[f"eval/{n}/targets"].to(device)) for n in names}


def seeded(seed: int, salt: str) -> torch.Generator:
    """A generator for one purpose of one seed, independent of the global RNG."""
    digest = hashlib.sha256(f"{seed}:{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def image_tensor(image) -> torch.Tensor:
    """A uint8 (C, H, W) tensor of what an attack logs (a tensor, or a matplotlib figure rendered)."""
    if isinstance(image, torch.Tensor):
        return image.detach().cpu().to(torch.uint8)
    import matplotlib.pyplot as plt
    import numpy as np

    image.canvas.draw()
    array = np.asarray(image.canvas.buffer_rgba())[..., :3].copy()
    plt.close(image)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def craft(key: str, attack, ctx: AttackContext, train_set: Split, test_set: Split,
          seed: int) -> tuple[Poisoning, dict[str, torch.Tensor]]:
    """Prepare the attack, poison the training set, trigger the test set. Returns the poisoning
    and the tensors to store (the rows that changed, not the whole training set)."""
    images: dict[str, torch.Tensor] = {}
    ctx.log_image = lambda path, image: images.__setitem__(path, image_tensor(image))
    attack.num_classes = ctx.dataset.num_classes
    attack.prepare(ctx)
    poisoned, index = attack.poison_train(train_set, seeded(seed, "poison"))
    # A trigger learnt in training does not exist yet: its ASR set is made after training (engine).
    triggered = test_set.subset(torch.arange(0)) if attack.learns_trigger else attack.trigger_test(test_set)
    targets = attack.targets(triggered.labels)
    evaluations = {} if attack.learns_trigger else evaluation_sets(attack, test_set)
    rows = ((poisoned.images != train_set.images).flatten(1).any(1)
            | (poisoned.labels != train_set.labels)).nonzero().flatten()
    tensors = {"index": index, "rows": rows, "row_images": poisoned.images[rows],
               "row_labels": poisoned.labels[rows], "asr_images": triggered.images,
               "asr_labels": triggered.labels, "asr_targets": targets, **pack(evaluations),
               **{f"image/{p}": im for p, im in images.items()}}
    return Poisoning(key, attack, poisoned, index, triggered, targets, images, False, evaluations), tensors


def restore(key: str, attack, train_set: Split, stored: dict, device, num_classes: int) -> Poisoning:
    """The poisoning stored by :func:`craft`, put back on the training set it was crafted on (the
    key holds that set's digest, so it is the same set)."""
    attack.num_classes = num_classes
    images, labels = train_set.images.clone(), train_set.labels.clone()
    rows = stored["rows"].to(device)
    images[rows], labels[rows] = stored["row_images"].to(device), stored["row_labels"].to(device)
    logged = {k[len("image/"):]: v for k, v in stored.items() if k.startswith("image/")}
    return Poisoning(key, attack, Split(images, labels), stored["index"].to(device),
                     Split(stored["asr_images"].to(device), stored["asr_labels"].to(device)),
                     stored["asr_targets"].to(device), logged, True, unpack(stored, device))
