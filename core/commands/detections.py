"""The detectors' tables from a grid's detection cells: AUROC and TPR at the grid's FPR per attack
(rows) and detector (columns), mean ± standard deviation over seeds, with an average row; and the
detectors' leaderboard, ranked by AUROC averaged over the attacks each ran on. Used by `bench table
--detectors`, by `bench run` (logged on the grid's run) and by `bench report`."""
from __future__ import annotations

import csv
import io
import json
import statistics

from .tables import FORMATS, Stat, _mean, over_seeds

METRICS = ("auroc", "tpr")
ALL_METRICS = ("auroc", "tpr", "precision", "recall", "f1", "fpr")


def detections(results: list[dict]) -> list[dict]:
    """The finished detection cells of ``results`` (a grid's results hold defense cells too)."""
    return [r for r in results if r.get("kind") == "detection" and r.get("status", "FINISHED") == "FINISHED"]


def check_metrics(metrics: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown detection metric(s) {', '.join(unknown) or '(none given)'}; valid: "
                         f"{', '.join(ALL_METRICS)}")
    return metrics


def build(results: list[dict], metrics: tuple[str, ...] = METRICS) -> dict:
    """{"detectors": [...], "rows": {(dataset, attack): {detector: {metric: Stat}}}, "metrics": ...}:
    values in %, keyed by seed (a data detector has no row for an attack that controls training)."""
    check_metrics(metrics)
    cells = detections(results)
    detectors = list(dict.fromkeys(r["cell"]["detector"] for r in cells))
    rows: dict[tuple, dict[str, dict[str, Stat]]] = {}
    for r in cells:
        c = r["cell"]
        stats = rows.setdefault((c["dataset"], c["attack"]), {}).setdefault(c["detector"], {m: Stat() for m in metrics})
        for m in metrics:
            if m in r["detection"]:
                stats[m].values[c["seed"]] = 100 * r["detection"][m]
    return {"detectors": detectors, "rows": rows, "metrics": tuple(metrics)}


def _average(t: dict, detector: str) -> dict[str, float | None]:
    have = [entry[detector] for entry in t["rows"].values() if detector in entry]
    return {m: _mean([s[m].mean for s in have if s[m]]) for m in t["metrics"]} | {"rows": len(have)}


def _names(t: dict) -> str:
    return " / ".join(m.upper() for m in t["metrics"]) + " in %"


def render(t: dict, fmt: str = "text", fpr: float = 0.05) -> str:
    """The table as ``text``, ``markdown``, ``csv`` or ``json``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps({"metrics": _names(t), "detectors": t["detectors"], "rows": [
            {"dataset": d, "attack": a, **{det: {m: {"mean": s[m].mean, "std": s[m].std, "values": s[m].values}
                                                 for m in t["metrics"] if s[m]} for det, s in entry.items()}}
            for (d, a), entry in t["rows"].items()],
            "average": {det: _average(t, det) for det in t["detectors"]}}, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["dataset", "attack", "detector", "seeds", *(f"{m}_{k}" for m in t["metrics"] for k in ("mean", "std"))])
        for (d, a), entry in t["rows"].items():
            for det, s in entry.items():
                w.writerow([d, a, det, max(len(x.values) for x in s.values()),
                            *(v for m in t["metrics"] for v in ((f"{s[m].mean:.4f}", f"{s[m].std:.4f}") if s[m] else ("", "")))])
        return buf.getvalue()
    lines = [["dataset", "attack", *t["detectors"]]]
    for (d, a), entry in t["rows"].items():
        lines.append([d, a, *(" / ".join(s[m].text() for m in t["metrics"]) if (s := entry.get(det)) else "-"
                              for det in t["detectors"])])
    averages = [_average(t, det) for det in t["detectors"]]
    lines.append(["average", "", *(" / ".join("-" if v[m] is None else f"{v[m]:.2f}" for m in t["metrics"])
                                   + (f" ({v['rows']}/{len(t['rows'])} rows)" if v["rows"] < len(t["rows"]) else "")
                                   for v in averages)])
    note = (f"{_names(t)}, mean ± std over seeds; TPR at {fpr:.0%} FPR. '-': not run (a data detector on an attack "
            "that controls training has no poisoned rows to inspect).")
    if fmt == "markdown":
        out = ["| " + " | ".join(lines[0]) + " |", "|" + " --- |" * len(lines[0])]
        return note + "\n\n" + "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines[1:]]) + "\n"
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return note + "\n" + "\n".join("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in
                                             enumerate(zip(line, widths))) for line in lines) + "\n"


def leaderboard(results: list[dict]) -> list[dict]:
    """The detectors ranked by AUROC: averaged over the attacks it ran on, ± its std over seeds
    (``tables.over_seeds``); beside it, averaged over its cells, TPR at the FPR, its decision's F1
    and, for input detectors, the seconds per input. Configurations and profiles are never pooled."""
    cells = detections(results)

    def group(r):
        return r["cell"]["detector"], r.get("profile"), json.dumps(r.get("detector_config"), sort_keys=True)
    groups = list(dict.fromkeys(group(r) for r in cells))
    board = []
    for g in groups:
        mine = [r for r in cells if group(r) == g]
        label = g[0] + (f" [{g[1]}]" if len({h[1] for h in groups if h[0] == g[0]}) > 1 else "")
        siblings = [h for h in groups if h[:2] == g[:2]]
        label += f" #{siblings.index(g) + 1}" if len(siblings) > 1 else ""
        board.append({"detector": label, "level": mine[0]["level"], "profile": g[1], "config": json.loads(g[2]),
                      "auroc": over_seeds(mine, lambda r: 100 * r["detection"]["auroc"]),
                      "attacks": len({(r["cell"]["dataset"], r["cell"]["attack"]) for r in mine}),
                      "tpr": statistics.fmean(100 * r["detection"]["tpr"] for r in mine),
                      "f1": _mean([100 * r["detection"]["f1"] for r in mine if "f1" in r["detection"]]),
                      "s_per_input": _mean([r["time_per_input_s"] for r in mine if "time_per_input_s" in r])})
    board.sort(key=lambda e: -e["auroc"]["mean"])
    for rank, e in enumerate(board, 1):
        e["rank"] = rank
    return board


def render_leaderboard(board: list[dict], fmt: str = "text") -> str:
    if fmt == "json":
        return json.dumps(board, indent=2)
    head = ["rank", "detector", "level", "AUROC %", "attacks", "TPR %", "F1 %", "ms / input"]
    lines = [[str(e["rank"]), e["detector"], e["level"],
              f"{e['auroc']['mean']:.2f} ± {e['auroc']['std']:.2f}" if e["auroc"]["seeds"] > 1 else f"{e['auroc']['mean']:.2f}",
              str(e["attacks"]), f"{e['tpr']:.2f}", "-" if e["f1"] is None else f"{e['f1']:.2f}",
              "-" if e["s_per_input"] is None else f"{1000 * e['s_per_input']:.2f}"] for e in board]
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerows([head] + lines)
        return buf.getvalue()
    if fmt == "markdown":
        return "\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
                         + ["| " + " | ".join(line) + " |" for line in lines]) + "\n"
    widths = [max(len(x[i]) for x in [head] + lines) for i in range(len(head))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in [head] + lines) + "\n"


def log_detections(tracker, run_id: str, results: list[dict], fpr: float = 0.05) -> None:
    """The detection table and the detectors' leaderboard on a grid's run (Markdown and JSON), and a
    summary metric per detector (``spectral.auroc``)."""
    t = build(results)
    tracker.text(run_id, render(t, "markdown", fpr), "table/detection.md")
    tracker.text(run_id, render(t, "json", fpr), "table/detection.json")
    board = leaderboard(results)
    tracker.text(run_id, render_leaderboard(board, "markdown"), "table/detectors.md")
    tracker.text(run_id, render_leaderboard(board, "json"), "table/detectors.json")
    tracker.metrics(run_id, {f"{e['detector'].split(' ')[0]}.auroc": e["auroc"]["mean"] / 100 for e in board})
