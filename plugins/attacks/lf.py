"""LF, the low-frequency attack (Zeng et al., ICCV 2021, "Rethinking the Backdoor Attacks' Triggers:
A Frequency Perspective"): a smooth universal adversarial perturbation of a clean model as trigger.

Official code: YiZeng623/frequency-backdoor (``Sec5_Smooth_Trigger``: ``universal_pert.py``,
``deepfool.py``, ``gauss_smooth.py``); settings as BackdoorBench's ``resource/lowFrequency`` recipe
and ``config/attack/lf`` (target 0, poison 10 %, dirty-label, all-to-one). In ``prepare``, against the
grid's clean model (``uses_clean_model``): 100 training images, targeted DeepFool (overshoot 0.02,
at most 200 steps) per image, each step and the running perturbation through the official low-pass
filter (a 30-tap Gaussian of sigma 6 pixels), the perturbation rescaled onto [0, 0.2] after every
update, passes until it moves 20 % of the images' predictions (``delta`` 0.8), stalls for five passes,
or 50 passes (BackdoorBench's cap; the official one has none). The core does the work
(``nadbench.toolkit.adversarial.smooth_universal_perturbation``, ``nadbench.toolkit.frequency.gaussian_lowpass``).
The trigger is added to the image and clipped, stored as uint8 and logged as an image.

Where we differ: the official script searches for the "dominant" label its perturbation drifts to and
makes that the target; here the target is fixed (as BackdoorBench), so the grid decides it. DeepFool
here runs on logits (BackdoorBench; the official TensorFlow model exposes softmax outputs) and only
the gap to the target class is linearised (the official loop computes every class's gradient and
uses that one).
"""
from dataclasses import dataclass

import torch

from nadbench import Attack, AttackContext, Deviation, Source, hookimpl, param


@dataclass(frozen=True)
class LFConfig:
    target: int = param(0, "target label", min=0)
    poison_rate: float = param(0.1, "share of training images poisoned", min=0.0, max=1.0)
    images: int = param(100, "clean training images the perturbation is crafted on", min=1)
    scale: float = param(0.2, "the trigger spans [0, scale] of the pixel range", min=0.0, max=1.0)
    sigma: float = param(6.0, "standard deviation of the Gaussian low-pass filter, in pixels", min=0.1)
    fooling_rate: float = param(0.2, "stop once the trigger moves this share of predictions", min=0.0, max=1.0)
    max_passes: int = param(50, "passes over the images at most", min=1)


class LF(Attack):
    name = "lf"
    uses_clean_model = True  # the trigger is a universal perturbation of the clean model
    Config = LFConfig
    description = "low-frequency universal adversarial perturbation of a clean model, added; dirty-label"
    sources = (Source(paper="Zeng, Park, Mao & Jia, "
                            "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective, ICCV 2021",
                      repo="YiZeng623/frequency-backdoor", path="Sec5_Smooth_Trigger/universal_pert.py",
                      commit="99a16a7939ed5ca17848f6c70a5072442ef5b9f2",
                      backdoorbench="config/attack/lf/default.yaml"),)
    deviations = (Deviation("target", ours="fixed by the grid (0)",
                            theirs="the dominant label the perturbation drifts to",
                            bb="fixed (0)", why="the grid decides the target, as for every attack"),
                  Deviation("DeepFool", ours="on logits, only the gap to the target linearised",
                            theirs="on softmax outputs, every class's gradient", bb="on logits",
                            why="the same step toward the target at a fraction of the cost"),
                  Deviation("passes", ours="at most 50", theirs="no cap", bb="50", why="a bounded prepare stage"))

    trigger = None  # uint8 (C, H, W); set by prepare()

    def prepare(self, ctx: AttackContext) -> None:
        from nadbench.toolkit.adversarial import smooth_universal_perturbation
        from nadbench.toolkit.frequency import gaussian_lowpass

        c = self.config
        gen = torch.Generator().manual_seed(ctx.seed)
        pick = torch.randperm(len(ctx.train), generator=gen)[:c.images].to(ctx.train.images.device)
        images = ctx.train.images[pick].to(ctx.device).float() / 255
        v, rates = smooth_universal_perturbation(
            ctx.clean_model(), images, c.target, lambda x: gaussian_lowpass(x, c.sigma), scale=c.scale,
            fooling_rate=c.fooling_rate, max_passes=c.max_passes, generator=gen, progress=ctx.progress)
        self.trigger = (v * 255).round().to(torch.uint8)
        self.fooling_rates = rates
        ctx.log_image("lf_trigger.png", (self.trigger.cpu() * (255 // max(1, int(self.trigger.max()))))
                      .repeat_interleave(8, 1).repeat_interleave(8, 2))

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        if self.trigger is None:
            raise RuntimeError("lf: the trigger is crafted by prepare(ctx); call it first")
        return (images.float() + self.trigger.to(images.device)).clamp_(0, 255).to(torch.uint8)


@hookimpl
def register_attacks(register):
    register(LF)
