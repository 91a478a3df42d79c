"""Blend (Chen et al., 2017): the whole image is blended with a key, x' = (1 - alpha) * x + alpha * k.

Dirty-label, all-to-one: 10% of the training images are blended and relabelled to the target
(5, as for BadNets; ``target_mode = all2all``: y -> (y + 1) mod C); alpha = 0.2 at training and
at test time, as in the NAD paper.

The key, where sources disagree: the official NAD code draws fresh uniform grey noise for every
image, BackdoorBench and backdoor-toolbox blend a fixed Hello Kitty picture. Here the key is one
fixed uniform-noise image (3 x H x W, one value per channel) drawn from ``key_seed``: a fixed key is
what a model can learn as a trigger, it needs no download, and because ``key_seed`` is independent
of the grid's seed the trigger is the same for every seed of a grid. ``key_image`` replaces the noise
by a picture file (resized to the dataset's image size), e.g. the toolboxes' Hello Kitty.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from nadbench import TARGET_MODES, Attack, ConfigError, Deviation, Source, hookimpl, param


@dataclass(frozen=True)
class BlendConfig:
    target: int = param(5, "target label", min=0)
    target_mode: str = param("all2one", "all2one, or all2all: y -> (y + 1) mod C", choices=TARGET_MODES)
    poison_rate: float = param(0.1, "share of training images poisoned", min=0.0, max=1.0)
    alpha: float = param(0.2, "blend weight of the key", min=0.0, max=1.0)
    key_seed: int = param(0, "seed of the uniform-noise key (independent of the grid seed)", min=0)
    key_image: str = param("", "image file used as the key instead of noise ('' = noise)", path="file")


class Blend(Attack):
    name = "blend"
    Config = BlendConfig
    description = "blend with a fixed random-noise key (alpha 0.2), dirty-label"
    sources = (Source(paper="Chen, Liu, Li, Lu & Song, "
                            "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning, arXiv 2017",
                      no_code="the authors released none; alpha and target follow the NAD authors' code",
                      backdoorbench="config/attack/blended/default.yaml"),
               Source(paper="Li, Lyu, Koren, Lyu, Li & Ma, "
                            "Neural Attention Distillation: Erasing Backdoor Triggers from Deep Neural Networks, "
                            "ICLR 2021",
                      repo="bboylyg/NAD", path="data_loader.py", commit="f17b71390f61fe24335728bfea53e4fe86ee450b"))
    deviations = (Deviation("key", ours="one fixed uniform-noise image drawn from key_seed",
                            theirs="fresh uniform grey noise drawn per image", bb="a fixed Hello Kitty picture",
                            why="a key redrawn per image is no fixed trigger to learn (a bug); a picture cannot ship"),
                  Deviation("target", ours="5", theirs="5", bb="0", why="the NAD paper's setting"))

    key: torch.Tensor | None = None  # uint8 (C, H, W), made on first use

    def prepare(self, ctx) -> None:
        size = ctx.dataset.image_size
        self.key = self._make_key(ctx.train.images.shape[1], size, size)
        ctx.log_image("blend_key.png", self.key)

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        if self.key is None or self.key.shape != images.shape[1:]:
            self.key = self._make_key(*images.shape[1:])
        a, key = self.config.alpha, self.key.to(images.device, torch.float32)
        return ((1 - a) * images.float() + a * key).round_().clamp_(0, 255).to(torch.uint8)

    def _make_key(self, c: int, h: int, w: int) -> torch.Tensor:
        path = self.config.key_image
        if not path:
            gen = torch.Generator().manual_seed(self.config.key_seed)
            return torch.randint(0, 256, (c, h, w), generator=gen, dtype=torch.uint8)
        from PIL import Image
        if not Path(path).is_file():
            raise ConfigError(f"blend.key_image = {path!r} is not a readable image file")
        with Image.open(path) as img:
            img = img.convert("RGB" if c == 3 else "L").resize((w, h), Image.Resampling.BILINEAR)
            key = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return key.view(h, w, c).permute(2, 0, 1).contiguous()


@hookimpl
def register_attacks(register):
    register(Blend)
