"""WaNet (Nguyen & Tran, ICLR 2021): the trigger is an imperceptible warp of the whole image.

Official code: VinAIResearch/Warping-based_Backdoor_Attack-release (``train.py``, ``config.py``),
read for its settings; the warp itself is ``nadbench.toolkit.warping``. CIFAR-10 defaults as there: a 4 x 4
control grid (k = 4), strength s = 0.5, 10 % of the training images warped and relabelled, target 0,
all-to-one (``target_mode = all2all``: y -> (y + 1) mod C). The attack controls training: in every
batch a share of cross_ratio x poison_rate (20 %) of the other images is warped by the field plus
per-image noise and keeps its label ("noise mode"), so that only the exact warp flips the label.

Where we differ, and why: the official code re-draws which images of a batch are warped at every
step; here the warped images are chosen once (the poison stage stores them, as for every attack),
and only the noise-mode images are drawn per batch. Warped images are stored as uint8 (rounded).
The official schedule (SGD lr 0.01, 1000 epochs, random rotation) is replaced by the profile's.
"""
from dataclasses import dataclass

import torch

from nadbench import TARGET_MODES, Attack, Deviation, Source, hookimpl, param
from nadbench.training.steps import LabelKeepingSamples
from nadbench.toolkit.warping import flow_field, noisy, warp, warp_grid


@dataclass(frozen=True)
class WaNetConfig:
    target: int = param(0, "target label (all2one)", min=0)
    target_mode: str = param("all2one", "all2one, or all2all: y -> (y + 1) mod C", choices=TARGET_MODES)
    poison_rate: float = param(0.1, "share of training images warped and relabelled", min=0.0, max=1.0)
    k: int = param(4, "control grid size of the warp field", min=2, max=64)
    strength: float = param(0.5, "warp strength s", min=0.0, max=10.0)
    cross_ratio: float = param(2.0, "noise-mode images per poisoned image, in every batch", min=0.0, max=9.0)
    field_seed: int = param(0, "seed of the warp field (independent of the grid seed)", min=0)


class WaNet(Attack):
    name = "wanet"
    Config = WaNetConfig
    description = "imperceptible warping field (k 4, s 0.5) with noise-mode samples; controls training"
    sources = (Source(paper="Nguyen & Tran, WaNet: Imperceptible Warping-based Backdoor Attack, ICLR 2021",
                      repo="VinAIResearch/Warping-based_Backdoor_Attack-release", path="config.py",
                      commit="45e8c33c285cd55893ae4efcfcf7fe3d26170387",
                      backdoorbench="config/attack/wanet/default.yaml"),)
    deviations = (Deviation("warped images", ours="chosen once (stored by the poison stage)",
                            theirs="redrawn every batch",
                            why="every attack's poisoning is a stored stage"),
                  Deviation("stored images", ours="uint8, rounded", theirs="float",
                            why="datasets are uint8 tensors"),
                  Deviation("schedule", ours="the profile's", theirs="SGD lr 0.01, 1000 epochs, rotation and crop",
                            bb="lr 0.01, MultiStepLR 100-400, rotation and crop",
                            why="one schedule for every attack of a grid"))

    grid: torch.Tensor | None = None

    def _grid(self, size: int) -> torch.Tensor:
        if self.grid is None or self.grid.shape[1] != size:
            gen = torch.Generator().manual_seed(self.config.field_seed)
            self.grid = warp_grid(flow_field(self.config.k, size, gen), self.config.strength)
        return self.grid

    def prepare(self, ctx) -> None:
        ctx.log_image("wanet_warp.png", self._picture(ctx.train.images[:1]))

    def _picture(self, image: torch.Tensor) -> torch.Tensor:
        """A clean image, its warp and 20x their difference, side by side (uint8)."""
        warped = self.apply_trigger(image)
        diff = ((warped.float() - image.float()).abs() * 20).clamp(0, 255).to(torch.uint8)
        return torch.cat([image[0], warped[0], diff[0]], dim=2).cpu()

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        grid = self._grid(images.shape[-1])
        return (warp(images.float() / 255, grid) * 255).round_().clamp_(0, 255).to(torch.uint8)

    def train_step(self, poisoned, n_train):
        def noise_mode(x, gen):  # the field plus up to a pixel of noise per image; labels kept
            return warp(x, noisy(self._grid(x.shape[-1]), len(x), gen))
        return LabelKeepingSamples(self.config.cross_ratio * self.config.poison_rate, noise_mode, poisoned, n_train)


@hookimpl
def register_attacks(register):
    register(WaNet)
