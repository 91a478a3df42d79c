"""The detect stages' rules: a detector runs seeded and timed, held to the plugin contract (one
finite score per row or input), gets the engine's decision when it makes none (the threshold at a
false-positive rate on the defender's clean share), and is measured by the one set of detection
metrics: AUROC, TPR at the chosen FPR, and its decision's precision, recall and F1."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..contract.api import Detection, DetectionContext, Detector, Split
from ..contract.config import PluginError

FPR = 0.05       # the default false-positive rate of the engine's decision, and of the TPR reported
BATCH = 200      # inputs per batch shown to an input detector


@dataclass
class Detected:
    """A detector's scores over what it inspected, its decision (a bool per row or input), whether
    that decision is its own (else the engine's threshold on the clean share), its seconds, and the
    scores of the clean share (what the threshold is drawn from)."""

    scores: torch.Tensor
    flagged: torch.Tensor
    own_decision: bool
    seconds: float
    threshold: float | None = None
    clean_scores: torch.Tensor | None = None


def _broken(detector: Detector, what: str) -> PluginError:
    return PluginError(f"detector {detector.name!r} ({detector.provider}) breaks the plugin contract: {what}")


def checked(detector: Detector, out, n: int) -> Detection:
    """``out`` (a tensor or a Detection) as a Detection of ``n`` finite float64 scores on the CPU (near-ties
    stay apart: a score such as a probability close to 1 would round away in float32), or a
    one-line PluginError naming the plugin."""
    detection = out if isinstance(out, Detection) else Detection(out)
    scores = detection.scores
    if not isinstance(scores, torch.Tensor) or scores.shape != (n,):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise _broken(detector, f"it must return one score per {'row' if detector.level == 'data' else 'input'} "
                                f"(a tensor of shape ({n},)), it returned {shape}")
    scores = scores.detach().double().cpu()
    if not bool(torch.isfinite(scores).all()):
        raise _broken(detector, f"{int((~torch.isfinite(scores)).sum())} of its {n} scores are not finite")
    flagged = detection.flagged
    if flagged is not None:
        if not isinstance(flagged, torch.Tensor) or flagged.shape != (n,) or flagged.dtype != torch.bool:
            raise _broken(detector, f"its decision (Detection.flagged) must be a bool tensor of shape ({n},)")
        flagged = flagged.detach().cpu()
    return Detection(scores, flagged)


def threshold(clean_scores: torch.Tensor, fpr: float) -> float:
    """The score above which the share ``fpr`` of the clean scores lies (the engine's decision)."""
    if len(clean_scores) == 0:
        raise ValueError("the engine's decision needs the scores of a clean share, and it is empty")
    return float(torch.quantile(clean_scores.double(), 1 - fpr))


def _mixed(data: Split, clean: Split, seed: int) -> tuple[Split, torch.Tensor, torch.Tensor]:
    """The rows a data detector inspects: ``data`` with the clean share's images among them, in a
    seeded order; returns (inspected, positions of data's rows, positions of the clean rows)."""
    n = len(data)
    order = torch.randperm(n + len(clean), generator=torch.Generator().manual_seed(seed))
    device = data.labels.device
    images = torch.cat([data.images, clean.images.to(device)])
    labels = torch.cat([data.labels, clean.labels.to(device)])
    inspected = Split(images[order.to(device)], labels[order.to(device)])
    where = torch.empty_like(order)
    where[order] = torch.arange(len(order))
    return inspected, where[:n], where[n:]


def inspect_data(detector: Detector, data: Split, clean: Split, model, ctx: DetectionContext,
                 fpr: float = FPR) -> Detected:
    """A data detector over ``data``. It inspects ``data`` with the clean share's images mixed in (not
    told which), so that the engine can threshold scores it knows to be clean; the returned scores and
    decision are ``data``'s rows, in order."""
    inspected, rows, reference = _mixed(data, clean, ctx.seed)
    torch.manual_seed(ctx.seed)
    start = time.perf_counter()
    out = checked(detector, detector.detect(inspected, clean, model if detector.uses_model else None, ctx),
                  len(inspected))
    seconds = time.perf_counter() - start
    own = out.flagged is not None
    cut = None if own else threshold(out.scores[reference], fpr)  # a detector's own decision needs no clean share
    flagged = out.flagged[rows] if own else out.scores[rows] > cut
    return Detected(out.scores[rows], flagged, own, seconds, cut, out.scores[reference])


def score_inputs(detector: Detector, model, images: torch.Tensor, batch_size: int = BATCH) -> Detection:
    """An (already prepared) input detector's scores and decisions over ``images``, shown in batches."""
    scores, flags = [], []
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        out = checked(detector, detector.score(model, batch), len(batch))
        scores.append(out.scores)
        flags.append(out.flagged)
    own = bool(flags) and all(f is not None for f in flags)
    return Detection(torch.cat(scores) if scores else torch.empty(0),
                     torch.cat(flags) if own else None)


def screen_inputs(detector: Detector, model, clean: Split, inputs: torch.Tensor, ctx: DetectionContext,
                  fpr: float = FPR, batch_size: int = BATCH) -> Detected:
    """An input detector prepared on the clean share, then shown ``inputs`` (the caller mixes clean and
    triggered ones in every batch) in batches; the engine's threshold comes from the clean share's scores.
    ``seconds`` is the time per input, preparation excluded."""
    torch.manual_seed(ctx.seed)
    detector.prepare(model, clean, ctx)
    start = time.perf_counter()
    out = score_inputs(detector, model, inputs, batch_size)
    per_input = (time.perf_counter() - start) / max(1, len(inputs))
    own = out.flagged is not None
    clean_scores = score_inputs(detector, model, clean.images, batch_size).scores
    cut = None if own else threshold(clean_scores, fpr)
    return Detected(out.scores, out.flagged if own else out.scores > cut, own, per_input, cut, clean_scores)


def detection_metrics(scores: torch.Tensor, truth: torch.Tensor, flagged: torch.Tensor | None = None,
                      fpr: float = FPR) -> dict[str, float]:
    """``auroc`` and ``tpr`` at ``fpr`` (the largest true-positive rate whose false-positive rate is at most
    ``fpr``, from the ROC curve) of ``scores`` against ``truth`` (True: poisoned or triggered); with a
    decision, its ``precision``, ``recall``, ``f1`` and ``fpr`` (the measured one)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y, s = truth.cpu().numpy().astype(bool), scores.cpu().double().numpy()
    if y.all() or not y.any():
        raise ValueError("detection metrics need both clean and poisoned (or triggered) rows")
    false_pos, true_pos, _ = roc_curve(y, s)
    out = {"auroc": float(roc_auc_score(y, s)), "tpr": float(true_pos[false_pos <= fpr + 1e-12].max())}
    if flagged is not None:
        f = flagged.cpu().numpy().astype(bool)
        tp = float((f & y).sum())
        precision = tp / f.sum() if f.sum() else 0.0
        recall = tp / y.sum()
        out.update(precision=float(precision), recall=float(recall),
                   f1=float(2 * precision * recall / (precision + recall or 1)), fpr=float((f & ~y).sum() / (~y).sum()))
    return out
