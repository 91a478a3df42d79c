"""`bench detect`: a detector run on files a practitioner was handed — a training set to inspect
before (or after) training on it, or inputs to screen before a model sees them — through the grid's
own pieces (``inspect_data`` / ``screen_inputs``, the engine's decision at a false-positive rate on
the user's clean data), so a flagged file means what a grid's detection cell means."""
from __future__ import annotations

import csv
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..contract.api import DatasetSpec
from ..contract.config import flatten
from ..engine.detecting import inspect_data, screen_inputs
from ..engine.registry import Registry
from ..engine.stages import detect as detect_stage
from .practitioner import UserData, _align, sha256_of
from .userfiles import HandoverError, load_model


def detect_files(registry: Registry, *, detector_name: str, overrides: dict[str, str], clean: UserData,
                 names: list[str], data: UserData | None = None, inputs: UserData | None = None,
                 model_path: Path | None = None, arch: str = "", mean=None, std=None, seed: int = 0,
                 device: torch.device = torch.device("cpu"), fpr: float = 0.05, out: Path = Path("scores.csv"),
                 progress: bool = True) -> dict[str, Any]:
    """Score each file of ``data`` (a data detector) or ``inputs`` (an input detector; ``names``: their
    paths) and write ``out`` (file, score, flagged), the flagged files beside it (``.flagged.txt``), a
    report (``.report.json``) and the scores' histogram beside the clean data's (``.scores.png``)."""
    start = time.perf_counter()
    detector = registry.detector(detector_name).from_overrides(overrides)
    looked_at = data if detector.level == "data" else inputs
    if looked_at is None:
        option = "--data FOLDER (a training set)" if detector.level == "data" else "--inputs FOLDER"
        raise HandoverError(f"{detector_name} is {'a data' if detector.level == 'data' else 'an input'}-level "
                            f"detector: give {option}")
    needs_model = detector.level == "input" or detector.uses_model
    if needs_model and model_path is None:
        raise HandoverError(f"{detector_name} reads the model{' trained on that set' * (detector.level == 'data')}: "
                            "give MODEL_FILE (safetensors) and --model ARCH")
    model = load_model(model_path, registry.model(arch), clean.num_classes, mean, std).to(device).eval() \
        if needs_model else None
    if model is not None:
        mean, std = tuple(model.mean.flatten().tolist()), tuple(model.std.flatten().tolist())
    size = int(clean.split.images.shape[-1])
    dataset = DatasetSpec(clean.where, None, clean.num_classes, mean or (0.5,) * 3, std or (0.25,) * 3, image_size=size)
    ctx = detect_stage.context(registry, dataset, arch=arch if needs_model else "", seed=seed, device=device,
                               log_metric=lambda *a, **k: None, log_figure=lambda figure, path: None, progress=progress)
    clean_split = clean.split.to(device)
    if detector.level == "data":
        split = _align(looked_at, clean, "--data").split.to(device)
        detected = inspect_data(detector, split, clean_split, model, ctx, fpr)
    else:
        detected = screen_inputs(detector, model, clean_split, looked_at.split.images.to(device), ctx, fpr)
    report = {"detector": detector_name, "level": detector.level, "config": dataclasses.asdict(detector.config),
              "provider": detector.provider, "nadbench.version": __version__, "seed": seed, "fpr": fpr,
              "model": str(model_path or ""), "model.sha256": sha256_of(model_path) if model_path else "",
              "arch": arch if needs_model else "", "inspected": looked_at.where, "n_inspected": len(names),
              "clean": clean.where, "n_clean": len(clean.split), "n_flagged": int(detected.flagged.sum()),
              "decision": "its own" if detected.own_decision else f"threshold at {fpr:.0%} FPR on the clean data",
              "threshold": detected.threshold, "time_total_s": time.perf_counter() - start,
              ("time_per_input_s" if detector.level == "input" else "time_detect_s"): detected.seconds,
              **flatten(detector.config, "config")}
    _write(out, names, detected, report)
    return report


def _write(out: Path, names: list[str], detected, report: dict) -> None:
    from ..engine.figures import scores_figure

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(("file", "score", "flagged"))
        rows.writerows((n, f"{s:.6g}", int(b)) for n, s, b in zip(names, detected.scores.tolist(),
                                                                  detected.flagged.tolist()))
    flagged = [n for n, b in zip(names, detected.flagged.tolist()) if b]
    out.with_suffix(".flagged.txt").write_text("".join(f"{n}\n" for n in flagged))
    figure = scores_figure(detected.scores, detected.clean_scores, detected.threshold,
                           f"{report['detector']} on {report['inspected']}")
    figure.savefig(out.with_suffix(".scores.png"), dpi=100)
    report.update(scores=str(out), flagged=str(out.with_suffix(".flagged.txt")),
                  figure=str(out.with_suffix(".scores.png")))
    out.with_suffix(".report.json").write_text(json.dumps(report, indent=2))
