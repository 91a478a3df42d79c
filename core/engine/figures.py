"""Figures a person reads in the MLflow UI: attention maps and clean-vs-poisoned samples."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..training.attention import attention_map, tap  # noqa: E402
from ..training.augment import to_float  # noqa: E402


@torch.no_grad()
def attention_maps(model, layers, images: torch.Tensor, kind="mean_p", p=2.0) -> list[torch.Tensor]:
    """Per-layer (N, H, W) attention maps of ``model`` for uint8 ``images``."""
    model.eval()
    with tap(model, layers) as feats:
        model(to_float(images.to(next(model.parameters()).device)))
    return [attention_map(f.float(), kind, p).cpu() for f in feats]


def _show(ax, img: torch.Tensor, title: str) -> None:
    ax.imshow(img.permute(1, 2, 0).cpu().numpy())
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def attention_figure(before, after, layers, inputs: list[tuple[str, torch.Tensor]], title: str = ""):
    """One figure: rows = input + one per attention layer; columns = each image of ``inputs``
    (name, uint8 (N, C, H, W), e.g. ``[("clean", x), ("triggered", t)]``) before and after the defense."""
    cols = [(f"{name}, {when}", model, images[i:i + 1]) for name, images in inputs for i in range(len(images))
            for when, model in (("before", before), ("after", after))]
    maps = [attention_maps(m, layers, x) for _, m, x in cols]
    fig, axes = plt.subplots(len(layers) + 1, len(cols), figsize=(2.25 * len(cols), 2.2 * (len(layers) + 1)),
                             squeeze=False)
    for c, (label, _, x) in enumerate(cols):
        _show(axes[0, c], x[0], label)
        for r, layer in enumerate(layers):
            ax = axes[r + 1, c]
            im = ax.imshow(maps[c][r][0].numpy(), cmap="jet")
            ax.set_title(layer.removeprefix("net."), fontsize=8)
            ax.axis("off")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title or "attention maps (mean_c |F|^2)", fontsize=10)
    fig.tight_layout()
    return fig


def samples_figure(rows: list[tuple[str, torch.Tensor, torch.Tensor]], title: str = ""):
    """A grid of uint8 images, one row per (name, images, labels), each image titled with its label."""
    n = max(len(images) for _, images, _ in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.5 * n, 1.7 * len(rows)), squeeze=False)
    for r, (name, images, labels) in enumerate(rows):
        for c in range(n):
            axes[r, c].axis("off")
            if c < len(images):
                _show(axes[r, c], images[c], f"{name}: {int(labels[c])}" if c == 0 else str(int(labels[c])))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def line_figure(xs, series: dict[str, list[float]], xlabel: str, ylabel: str, *, vline=None, hline=None,
                title: str = ""):
    """Lines over ``xs`` (one per named series), with an optional marked ``vline`` / ``hline`` given
    as (position, label): a defense's curve (fine-pruning's accuracy against pruned channels, MCR's
    accuracy along t) and the engine's ACC/ASR of a defense's extra models."""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for (name, ys), style in zip(series.items(), ("o-", "s--", "^:")):
        ax.plot(xs, ys, style, markersize=3, label=name)
    if vline is not None:
        ax.axvline(vline[0], color="red", ls="--", label=vline[1])
    if hline is not None:
        ax.axhline(hline[0], color="grey", ls=":", label=hline[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def triggers_figure(triggers: list[tuple[str, torch.Tensor]], title: str = ""):
    """One row of float (C, H, W) images in [0, 1] with their titles (e.g. each class's inverted
    trigger, mask x pattern)."""
    fig, axes = plt.subplots(1, len(triggers), figsize=(1.6 * len(triggers), 2.0), squeeze=False)
    for ax, (label, img) in zip(axes[0], triggers):
        _show(ax, img.clamp(0, 1), label)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def detection_figure(scores: torch.Tensor, truth: torch.Tensor, threshold: float | None, title: str = "",
                     positive: str = "poisoned"):
    """A detector's picture: the ROC curve (with the diagonal of a random detector) and the score
    histograms of the clean and the poisoned (or triggered) rows, the engine's threshold marked."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y, s = truth.cpu().numpy().astype(bool), scores.cpu().double().numpy()
    fpr, tpr, _ = roc_curve(y, s)
    fig, (roc, hist) = plt.subplots(1, 2, figsize=(9, 3.6))
    roc.plot(fpr, tpr, color="tab:blue", label=f"AUROC {roc_auc_score(y, s):.3f}")
    roc.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="random")
    roc.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC")
    roc.legend(loc="lower right", fontsize=8)
    bins = torch.linspace(float(s.min()), float(s.max()) + 1e-12, 41).numpy()
    hist.hist(s[~y], bins=bins, alpha=0.6, color="tab:blue", label="clean", density=True)
    hist.hist(s[y], bins=bins, alpha=0.6, color="tab:red", label=positive, density=True)
    if threshold is not None:
        hist.axvline(threshold, color="k", linestyle="--", linewidth=1, label="threshold")
    hist.set(xlabel="score (higher: more suspicious)", ylabel="density", title="scores")
    hist.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def scores_figure(scores: torch.Tensor, clean_scores: torch.Tensor | None, threshold: float | None, title: str = ""):
    """`bench detect`'s picture, where no truth is known: the histogram of the inspected files' scores
    beside the clean data's, the threshold marked."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    values = [scores] + ([clean_scores] if clean_scores is not None and len(clean_scores) else [])
    low, high = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
    bins = torch.linspace(low, high + 1e-12, 41).numpy()
    ax.hist(scores.numpy(), bins=bins, alpha=0.6, color="tab:orange", label="inspected", density=True)
    if len(values) > 1:
        ax.hist(clean_scores.numpy(), bins=bins, alpha=0.6, color="tab:blue", label="your clean data", density=True)
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label="threshold")
    ax.set(xlabel="score (higher: more suspicious)", ylabel="density", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
