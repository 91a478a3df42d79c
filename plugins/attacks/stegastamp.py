"""StegaStamp residual: SSBA's trigger generator (Li et al., ICCV 2021, "Invisible Backdoor Attack
with Sample-Specific Triggers"), a StegaStamp encoder that hides one fixed bit string in each
poisoned image as an invisible residual; dirty-label, all-to-one.

Not SSBA by name: SSBA is defined by its sample-specific trigger, and this encoder's is not. Its
residuals share most of their pattern, and the mean residual added to every image carries the
backdoor almost as far as each image's own (benchmarks/ssba_specificity.py,
results/ssba-specificity-quick.md). The official encoder (yuezunli/ISSBA, trained on ImageNet /
CelebA with LPIPS and a critic, 100 BCH-coded bits) cannot be downloaded here, and the losses tried
on this small encoder in its place (an L2 penalty, a texture-weighted one, one on the batch's mean
residual, a texture mask: benchmarks/stegastamp_losses.py) either erased the string or left the
common part. An ``ssba`` that meets its definition is welcome under that name.

``prepare`` trains the small encoder on the attacker's data (``nadbench.toolkit.stegastamp``: the
core's loop and IAD encoder-decoder, a decoder, an L-inf bound of 12 levels, so >= 26.5 dB PSNR),
cached with the poisoning; it reports its bit accuracy and PSNR on held-out training images
(``bit_accuracy``, ``psnr``); with the defaults (32 bits, 10,000 images, 16 epochs, Adam 1e-3
cosine) most of the string reads back, and 16 epochs read back clearly more than 8
(benchmarks/ssba_encoder.py, results/ssba-encoder.md). The string is ``bits`` seeded random bits
(the official code encodes a short text, BCH-coded to 100 bits; the decoder's exact read-out does
not matter to the backdoor, only the residual it leads to). Poisoning as BackdoorBench's SSBA:
target 0, 10 %, dirty-label.
"""
from dataclasses import dataclass

import torch

from nadbench import Attack, AttackContext, Deviation, Source, hookimpl, param


@dataclass(frozen=True)
class StegaStampConfig:
    target: int = param(0, "target label", min=0)
    poison_rate: float = param(0.1, "share of training images poisoned", min=0.0, max=1.0)
    bits: int = param(32, "length of the hidden bit string", min=1)
    bound: float = param(12.0, "L-inf bound of the residual, in levels of 255", min=0.0, max=255.0)
    encoder_images: int = param(10000, "training images the encoder learns on", min=64)
    encoder_epochs: int = param(16, "epochs of encoder training", min=1)


class StegaStampResidual(Attack):
    name = "stegastamp"
    Config = StegaStampConfig
    description = "invisible residual of a StegaStamp encoder trained here (SSBA's generator, not sample-specific)"
    sources = (Source(paper="Li, Li, Wu, Li, He & Lyu, Invisible Backdoor Attack with Sample-Specific Triggers, "
                            "ICCV 2021",
                      repo="yuezunli/ISSBA", path="encode_image.py", commit="a118e89aeae908c750dc638031cbc09d81e45b36",
                      backdoorbench="config/attack/ssba/default.yaml"),)
    deviations = (Deviation("encoder", ours="a small StegaStamp trained on the attacker's data in prepare",
                            theirs="StegaStamp trained on ImageNet / CelebA", bb="pre-encoded CIFAR-10 images",
                            why="no trained encoder can be downloaded here"),
                  Deviation("secret", ours="32 seeded random bits", theirs="a short text, BCH-coded to 100 bits",
                            bb="1 bit (its issue #1)", why="only the residual matters to the backdoor"),
                  Deviation("encoder losses", ours="the bits' loss under an L-inf bound of 12 levels",
                            theirs="with L2, LPIPS and a critic",
                            why="kept small; the residuals then share a common part, hence not named SSBA"))

    net = None  # the trained StegaStamp; set by prepare()

    def prepare(self, ctx: AttackContext) -> None:
        from nadbench.toolkit.stegastamp import bit_accuracy, train_stegastamp

        c = self.config
        gen = torch.Generator().manual_seed(ctx.seed)
        order = torch.randperm(len(ctx.train), generator=gen).to(ctx.train.images.device)
        fit, held_out = order[:c.encoder_images], order[c.encoder_images:c.encoder_images + 1000]
        if not len(held_out):  # a training set no larger than the encoder's share: measure on what it saw
            held_out = fit[:1000]
        self.net = train_stegastamp(ctx.train.subset(fit).to(ctx.device), c.bits, c.encoder_epochs, ctx.seed,
                                    bound=c.bound / 255, progress=ctx.progress)
        self.secret = torch.randint(0, 2, (c.bits,), generator=gen).to(ctx.device)
        self.bit_accuracy, self.psnr = bit_accuracy(self.net, ctx.train.images[held_out].to(ctx.device), self.secret)
        examples = ctx.train.images[held_out[:4]].to(ctx.device)
        residual = (self.apply_trigger(examples).float() - examples.float()) * (127 / c.bound) + 128
        grid = torch.cat([torch.cat(list(examples), 2), torch.cat(list(residual.round().clamp(0, 255).byte()), 2)], 1)
        ctx.log_image("stegastamp_examples.png", grid.cpu().repeat_interleave(4, 1).repeat_interleave(4, 2))

    @torch.no_grad()
    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError("stegastamp: the encoder is trained by prepare(ctx); call it first")
        net = self.net.to(images.device)
        out = torch.empty_like(images)
        for start in range(0, len(images), 500):
            x = images[start:start + 500].float() / 255
            out[start:start + 500] = (net.stamp(x, self.secret.to(images.device).expand(len(x), -1)) * 255).round().byte()
        return out


@hookimpl
def register_attacks(register):
    register(StegaStampResidual)
