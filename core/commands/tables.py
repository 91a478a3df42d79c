"""Table 1 from a grid's results: ASR / ACC per attack (rows) and defense (columns, "no defense"
first), mean ± standard deviation over seeds, an average row and a deviation row (change against
no defense), as in the NAD paper. Used by `bench table` (reading a tracked `bench run`), by
`bench run` itself (the table, a Markdown copy in the parent run's description and a bar chart) and
by benchmarks/table1.py.

A grid over clean shares, teachers or students gets one row per attack and value of that axis.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from dataclasses import dataclass, field

from ..training.evaluate import defense_effectiveness

# Table 1 of Li et al. (ICLR 2021), (ASR, ACC) in %; Refool on GTSRB, the rest CIFAR-10 / WRN-16-1.
PAPER = {
    "badnets": {"none": (100, 85.65), "finetune": (17.18, 81.22), "fine-pruning": (99.73, 81.14),
                "mcr": (4.65, 80.94), "nad": (4.77, 81.17)},
    "trojan": {"none": (100, 81.24), "finetune": (71.76, 77.88), "fine-pruning": (41.00, 78.17),
               "mcr": (41.25, 78.76), "nad": (19.63, 79.16)},
    "blend": {"none": (99.97, 84.95), "finetune": (36.60, 81.22), "fine-pruning": (93.62, 81.13),
              "mcr": (64.33, 80.34), "nad": (4.04, 81.68)},
    "cl": {"none": (99.21, 82.43), "finetune": (75.08, 81.73), "fine-pruning": (29.88, 79.32),
           "mcr": (32.95, 79.04), "nad": (9.18, 80.34)},
    "sig": {"none": (99.91, 84.36), "finetune": (9.18, 81.28), "fine-pruning": (74.26, 81.60),
            "mcr": (1.62, 80.94), "nad": (2.52, 81.95)},
    "refool": {"none": (95.16, 82.38), "finetune": (14.38, 80.34), "fine-pruning": (63.49, 80.64),
               "mcr": (8.76, 78.84), "nad": (3.18, 80.73)},
}
# The setting of Table 1, which the paper's numbers stand beside only (`_paper`): WRN-16-1 student and
# teacher (supplied: the backdoored model's architecture, as NAD's), 5% clean data (None: the profile's
# share, 0.05 in both built-in profiles), all-to-one targets, CIFAR-10 except Refool (GTSRB).
PAPER_SETTING = {"student": {"wrn-16-1"}, "teacher": {"wrn-16-1"}, "teacher_source": {"supplied", ""},
                 "clean_share": {None, 0.05}}
PAPER_DATASET = {"refool": "gtsrb"}  # else cifar10
NONE = "none"
METRICS = ("asr", "acc")  # the paper's layout, the default
ALL_METRICS = ("asr", "acc", "ra", "der")  # RA: robust accuracy; DER: defense effectiveness (after only)
ATTACK_METRIC = "attack."  # the prefix of an attack's own evaluations (attack.cover), measured like ASR
COLUMNS = ("finetune", "fine-pruning", "mcr", "nad")  # the paper's column order; other defenses follow
FORMATS = ("text", "markdown", "csv", "json")
# Grid axes that split rows when they take more than one value in a grid (cell field, header).
AXES = (("student", "student"), ("teacher", "teacher"), ("teacher_source", "teacher source"),
        ("clean_share", "clean share"))
TEACHER_AXES = ("teacher", "teacher_source")  # axes of defenses that use a teacher only


@dataclass
class Stat:
    """Values over seeds (in %), keyed by seed."""

    values: dict[int, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values())

    @property
    def std(self) -> float:
        return statistics.stdev(self.values.values()) if len(self.values) > 1 else 0.0

    def text(self) -> str:
        if not self.values:
            return "-"  # not measured (RA in results recorded before it was; DER of no defense)
        return f"{self.mean:.2f} ± {self.std:.2f}" if len(self.values) > 1 else f"{self.mean:.2f}"


@dataclass
class Table:
    axes: list[str]                                   # headers of the row-splitting axes
    defenses: list[str]                               # columns, "none" first
    rows: dict[tuple, dict[str, dict[str, Stat]]]     # (dataset, attack, *axis values) -> defense -> metric
    paper: bool = False
    # row -> PAPER_SETTING's fields -> the values its cells have (teacher: of cells with a teacher only)
    settings: dict[tuple, dict[str, set]] = field(default_factory=dict)
    metrics: tuple[str, ...] = METRICS
    # row -> seed -> metric -> the differing "no defense" values of its cells: their defenses repaired
    # different backdoored models (e.g. rows composed from grids that trained their own)
    mixed: dict[tuple, dict[int, dict[str, list[float]]]] = field(default_factory=dict)

    def seeds(self, row: tuple) -> int:
        return max(len(stat.values) for s in self.rows[row].values() for stat in s.values())

    def summary(self) -> dict[str, dict]:
        """Per defense: "average", the average over the rows it has of its mean per metric, with
        "rows", how many; and "deviation" (None for no defense), that average's change against no
        defense averaged over the same rows, so that a failed or missing cell drops its row from both
        sides rather than comparing different rows."""
        out = {}
        for d in self.defenses:
            have = [r for r in self.rows.values() if d in r]
            avg = {m: _mean([r[d][m].mean for r in have if r[d][m]]) for m in self.metrics}
            base = {m: _mean([r[NONE][m].mean for r in have if r[NONE][m]])  # no defense, same rows
                    for m in self.metrics}
            dev = None if d == NONE else {m: None if avg[m] is None or base[m] is None else avg[m] - base[m]
                                          for m in self.metrics}
            out[d] = {"average": {**avg, "rows": len(have)}, "deviation": dev}
        return out


def repairs(results: list[dict]) -> list[dict]:
    """The finished defense cells of ``results`` (a grid's detection cells have tables of their own:
    ``nadbench.commands.detections``)."""
    return [r for r in results if r.get("status", "FINISHED") == "FINISHED" and r.get("kind") != "detection"]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def check_metrics(metrics: tuple[str, ...]) -> tuple[str, ...]:
    """``metrics`` if each is one a table shows; ``ValueError`` naming the valid ones otherwise."""
    unknown = [m for m in metrics if m not in ALL_METRICS and not m.startswith(ATTACK_METRIC)]
    if unknown or not metrics:
        raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(ALL_METRICS)}"
                         f", {ATTACK_METRIC}NAME (an attack's own evaluation)")
    return metrics


def build(results: list[dict], paper: bool = False, metrics: tuple[str, ...] = METRICS) -> Table:
    """Aggregate cell results (``Runner.run_cell``'s dicts) into a table of ``metrics`` (of
    ``ALL_METRICS``, or ``attack.<name>``: an attack's own evaluation, ``Attack.evaluations``); "no
    defense" is the backdoored model of each (dataset, attack, student, seed), counted once. A metric
    a result lacks (RA before it was measured, another attack's evaluation) stays empty."""
    check_metrics(metrics)
    from ..engine.grid import Cell

    cells = [(Cell(**r["cell"]), r) for r in repairs(results)]
    taught = [c for c, _ in cells if c.teacher_source]  # cells of defenses that use a teacher
    axes = [(f, h) for f, h in AXES
            if len({_axis(c, f) for c in (taught if f in TEACHER_AXES else [c for c, _ in cells])}) > 1]
    teacher_axes = [f for f, _ in axes if f in TEACHER_AXES]
    pairs = list(dict.fromkeys(tuple(_axis(c, f) for f in teacher_axes) for c in taught))
    seen = list(dict.fromkeys(c.defense for c, _ in cells))  # `--defenses all` comes in name order
    defenses = [NONE] + sorted(seen, key=lambda d: (COLUMNS.index(d) if d in COLUMNS else len(COLUMNS), seen.index(d)))
    rows: dict[tuple, dict[str, dict[str, Stat]]] = {}
    settings: dict[tuple, dict[str, set]] = {}
    mixed: dict[tuple, dict] = {}
    for cell, r in cells:
        # A defense without a teacher belongs to every teacher row of the grid (its numbers repeat).
        for pair in [tuple(_axis(cell, f) for f in teacher_axes)] if cell.teacher_source or not teacher_axes else pairs:
            values = dict(zip(teacher_axes, pair))
            row = (cell.dataset, cell.attack, *(values[f] if f in values else _axis(cell, f) for f, _ in axes))
            entry = rows.setdefault(row, {})
            setting = settings.setdefault(row, {k: set() for k in PAPER_SETTING})
            for k in PAPER_SETTING:
                if k != "teacher" or cell.teacher_source:
                    setting[k].add(getattr(cell, k))
            for defense, phase in ((NONE, "before"), (cell.defense, "after")):
                stats = entry.setdefault(defense, {m: Stat() for m in metrics})
                for metric in metrics:
                    value = _metric(r, phase, metric)
                    if value is None:
                        continue
                    old = stats[metric].values.get(cell.seed)
                    if defense == NONE and old is not None and abs(old - 100 * value) > MIXED_POINTS:
                        differing = mixed.setdefault(row, {}).setdefault(cell.seed, {})
                        differing.setdefault(metric, [round(old, 2)]).append(round(100 * value, 2))
                    stats[metric].values[cell.seed] = 100 * value
    order = {d: i for i, d in enumerate(defenses)}
    rows = {k: dict(sorted(v.items(), key=lambda kv: order[kv[0]])) for k, v in rows.items()}
    return Table([h for _, h in axes], defenses, rows, paper, settings, tuple(metrics), mixed)


# "No defense" values of one row and seed further apart than this (in points) are different backdoored
# models, not one model evaluated twice (another process may flip an image: 0.01 points on 10,000).
MIXED_POINTS = 0.1


def _mixed_note(t: Table) -> str:
    """A warning for the rows whose defenses repaired different backdoored models: the "no defense"
    column shows the last one, so each defense must be compared with its own model's numbers."""
    if not t.mixed:
        return ""
    parts = []
    for row, seeds in t.mixed.items():
        for seed, by_metric in seeds.items():
            values = "; ".join(f"{m.upper()} " + " vs ".join(f"{v:.2f}" for v in vs) for m, vs in by_metric.items())
            parts.append(f"{'/'.join(map(str, row))} seed {seed} ({values})")
    return ("\nWarning: the defenses of these rows repaired different backdoored models (their cells' \"no defense\" "
            "numbers differ; the column shows the last): " + ", ".join(parts) + ". Compare each defense with "
            "its own model (the cells' before.* values).\n")


def _metric(result: dict, phase: str, metric: str) -> float | None:
    """A cell's metric before or after the defense; DER (after only) from ASR and ACC where a result
    recorded before DER was has none."""
    if metric == "der":
        if phase == "before":
            return None
        return result[phase].get("der", defense_effectiveness(result["before"], result[phase]))
    return result[phase].get(metric)


def _axis(cell, name: str):
    return getattr(cell, name)  # clean_share None: the profile's share, the same for every such cell


def _header(t: Table) -> list[str]:
    return ["dataset", "attack", *t.axes, "seeds"] + ["no defense" if d == NONE else d for d in t.defenses]


def _paper(t: Table, row: tuple, defense: str) -> tuple[float, float] | None:
    """The paper's (ASR, ACC) for a row only when all of the row's cells are in Table 1's setting
    (another dataset, student, teacher or clean share, or an attack variant ``name@...``, is another
    experiment); per row,
    not per defense, since "no defense" and the repeated teacherless columns mix in all its cells."""
    dataset, attack = row[:2]
    if not t.paper or "@" in attack or dataset != PAPER_DATASET.get(attack, "cifar10"):
        return None
    if any(not seen <= PAPER_SETTING[k] for k, seen in t.settings.get(row, {}).items()):
        return None
    return PAPER.get(attack, {}).get(defense)


def _body(t: Table, cell_text) -> list[list[str]]:
    lines = []
    for row, entry in t.rows.items():
        values = [cell_text(entry[d], _paper(t, row, d), t.seeds(row)) if d in entry else "-" for d in t.defenses]
        lines.append([*(str(v) for v in row), str(t.seeds(row)), *values])
    summary = t.summary()
    blank = [""] * (len(t.axes) + 1)

    def rows(d):  # an average over fewer rows than the table's reads so (a failed or missing cell)
        n = summary[d]["average"]["rows"]
        return f" ({n}/{len(t.rows)} rows)" if n < len(t.rows) else ""
    avg = [_pair(summary[d]["average"]) + rows(d) for d in t.defenses]
    dev = ["-" if d == NONE else _pair(summary[d]["deviation"], signed=True) + rows(d) for d in t.defenses]
    lines.append(["average", "", *blank, *avg])
    lines.append(["deviation", "", *blank, *dev])
    return lines


def _values(s: dict[str, Stat], seeds: int) -> str:
    """The metrics of one cell (ASR / ACC by default), marked when fewer seeds finished than in its
    row (an interrupted grid)."""
    n = max(len(stat.values) for stat in s.values())
    return " / ".join(stat.text() for stat in s.values()) + (f" (n={n})" if n < seeds else "")


def _pair(values: dict, signed: bool = False) -> str:
    fmt = "{:+.2f}" if signed else "{:.2f}"
    return " / ".join("-" if v is None else fmt.format(v) for k, v in values.items() if k != "rows")


def _names(t: Table) -> str:
    """"ASR / ACC in %" for the table's metrics."""
    return " / ".join(m if m.startswith(ATTACK_METRIC) else m.upper() for m in t.metrics) + " in %"


def render(t: Table, fmt: str = "text") -> str:
    """The table as ``text`` (aligned columns), ``markdown``, ``csv`` or ``json``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(to_json(t), indent=2)
    if fmt == "csv":
        return _csv(t)
    paper_asr_acc = t.metrics[:2] == METRICS  # the paper's numbers stand beside its own layout only
    if fmt == "markdown":
        def cell(s, paper, seeds):
            return _values(s, seeds) + (f" <br>*{paper[0]} / {paper[1]}*" if paper and paper_asr_acc else "")
        lines = [_header(t)] + _body(t, cell)
        out = ["| " + " | ".join(lines[0]) + " |", "|" + " --- |" * len(lines[0])]
        out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
        note = f"{_names(t)}, mean ± standard deviation over seeds"
        note += "; the paper's Table 1 in italics." if t.paper else "."
        return note + " Deviation: the average's change against no defense." + _der_note(t) + "\n\n" + \
            "\n".join(out) + "\n" + _mixed_note(t)

    def cell(s, paper, seeds):
        return _values(s, seeds) + (f" (paper {paper[0]} / {paper[1]})" if paper and paper_asr_acc else "")
    lines = [_header(t)] + _body(t, cell)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
            for line in lines]
    return f"{_names(t)}, mean ± std over seeds{_der_note(t)}\n" + "\n".join(text) + "\n" + _mixed_note(t)


def _der_note(t: Table) -> str:
    if not {"ra", "der"} & set(t.metrics):
        return ""
    return (" RA: robust accuracy, triggered images classified as their true label. DER: defense effectiveness"
            " rating, 100 x [max(0, ASR drop) - max(0, ACC drop) + 1] / 2 (50: no change).")


def to_json(t: Table) -> dict:
    rows = []
    for row, entry in t.rows.items():
        item = {"dataset": row[0], "attack": row[1], **dict(zip(t.axes, row[2:])), "seeds": t.seeds(row)}
        for d, s in entry.items():
            item[d] = {m: {"mean": s[m].mean, "std": s[m].std, "n": len(s[m].values),
                           "values": s[m].values} for m in t.metrics if s[m]}
            if _paper(t, row, d):
                item[d]["paper"] = dict(zip(METRICS, _paper(t, row, d)))
        if row in t.mixed:  # its defenses repaired different backdoored models: these "no defense" values
            item["mixed_no_defense"] = {str(seed): by_metric for seed, by_metric in t.mixed[row].items()}
        rows.append(item)
    summary = t.summary()
    return {"metrics": _names(t), "axes": t.axes, "defenses": t.defenses, "rows": rows,
            "average": {d: s["average"] for d, s in summary.items()},  # "rows": how many rows it is over
            "deviation": {d: {**s["deviation"], "rows": s["average"]["rows"]}
                          for d, s in summary.items() if d != NONE}}


def _csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    stats = [f"{m}_{k}" for m in t.metrics for k in ("mean", "std")]
    w.writerow(["dataset", "attack", *t.axes, "defense", "seeds", *stats]
               + (["paper_asr", "paper_acc"] if t.paper else []))
    for row, entry in t.rows.items():
        for d, s in entry.items():
            paper = _paper(t, row, d)
            values = [v for m in t.metrics for v in ((f"{s[m].mean:.4f}", f"{s[m].std:.4f}") if s[m] else ("", ""))]
            w.writerow([*row, d, max(len(stat.values) for stat in s.values()), *values]
                       + ([*(paper or ("", ""))] if t.paper else []))
    return buf.getvalue()


def paired(results: list[dict], a: str, b: str) -> dict[tuple, dict[str, float]]:
    """Defense ``a`` against ``b`` on the same backdoored models (paired by seed and row): the mean
    difference of ASR and of ACC (a - b, in points) and twice its standard error, per row. A row
    both have but with no seed in common (each ran other seeds) has n = 0 and NaN values."""
    t = build(results)
    out = {}
    for row, entry in t.rows.items():
        if a not in entry or b not in entry:
            continue
        seeds = sorted(set(entry[a]["asr"].values) & set(entry[b]["asr"].values))
        item = {"n": len(seeds)}
        for m in ("asr", "acc"):
            diffs = [entry[a][m].values[s] - entry[b][m].values[s] for s in seeds]
            item[m] = statistics.fmean(diffs) if diffs else math.nan
            item[f"{m}_2se"] = 2 * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
        out[row] = item
    return out


def figure(t: Table, title: str = ""):
    """Grouped bars of ASR and ACC per row (attack) and defense, with the seeds' standard deviation
    as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["/".join(str(v) for v in row[1:]) for row in t.rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.2 * len(names) * len(t.defenses) / 3), 6.5), sharex=True)
    width = 0.8 / len(t.defenses)
    for ax, metric in zip(axes, ("asr", "acc")):
        for j, d in enumerate(t.defenses):
            xs, means, stds = [], [], []
            for i, entry in enumerate(t.rows.values()):
                if d in entry:
                    xs.append(i + (j - (len(t.defenses) - 1) / 2) * width)
                    means.append(entry[d][metric].mean)
                    stds.append(entry[d][metric].std)
            ax.bar(xs, means, width, yerr=stds, capsize=2, label="no defense" if d == NONE else d)
        ax.set_ylabel(f"{metric.upper()} (%)")
        ax.set_ylim(0, 105)
    axes[0].legend(fontsize=8, ncol=len(t.defenses))
    axes[1].set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    if title:
        axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------ leaderboard

def over_seeds(cells: list[dict], value) -> dict:
    """``value(cell)`` summarised as a leaderboard shows it: ``mean``, the mean over the cells' rows (every
    axis but the seed and the method) of each row's mean over its seeds, as a table's average row; ``std``,
    over seeds, of their average over the rows every seed ran (0 with one seed); ``seeds``. A per-seed
    average over whatever rows each seed ran would weigh seeds that ran only the easy rows as a full grid."""
    by_row: dict[str, list[float]] = {}
    by_seed: dict[int, dict[str, float]] = {}
    for r in cells:
        row = json.dumps({k: v for k, v in r["cell"].items() if k not in ("seed", "defense", "detector")},
                         sort_keys=True)
        by_row.setdefault(row, []).append(value(r))
        by_seed.setdefault(r["cell"]["seed"], {})[row] = value(r)
    common = set.intersection(*(set(rows) for rows in by_seed.values()))
    per_seed = [statistics.fmean(rows[row] for row in common) for rows in by_seed.values()] if common else []
    return {"mean": statistics.fmean(statistics.fmean(v) for v in by_row.values()),
            "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0, "seeds": len(by_seed)}


def leaderboard(results: list[dict]) -> list[dict]:
    """The defenses of one or more grids ranked by DER: averaged over the rows (attacks, and other axes)
    it ran on, ± its std over seeds (``over_seeds``). Beside it, averaged over
    its cells: the ACC drop (points, before - after), ASR and RA after, and where the reactivation
    check ran, the ASR it regained and the clean model's after the same retuning. A defense is
    grouped by name, profile and configuration: cells of different profiles or configurations are
    never pooled (they get entries of their own, "nad [paper]", "nad #2")."""
    cells = repairs(results)

    def group(r):  # results recorded before they carried profile and config group by name alone
        return r["cell"]["defense"], r.get("profile"), json.dumps(r.get("defense_config"), sort_keys=True)
    groups = list(dict.fromkeys(group(r) for r in cells))
    board = []
    for g in groups:
        d, prof, config = g
        mine = [r for r in cells if group(r) == g]
        react = [r["reactivated"] for r in mine if r.get("reactivated")]
        label = d  # several profiles or configs of one defense are never pooled: told apart
        if len({h[1] for h in groups if h[0] == d}) > 1:
            label += f" [{prof}]"
        siblings = [h for h in groups if h[:2] == (d, prof)]
        if len(siblings) > 1:
            label += f" #{siblings.index(g) + 1}"
        board.append({
            "defense": label, "profile": prof, "config": json.loads(config),
            "der": over_seeds(mine, lambda r: 100 * _metric(r, "after", "der")),
            "rows": len({(r["cell"]["dataset"], r["cell"]["attack"]) for r in mine}),
            "acc_drop": statistics.fmean(100 * (r["before"]["acc"] - r["after"]["acc"]) for r in mine),
            "asr_after": statistics.fmean(100 * r["after"]["asr"] for r in mine),
            "ra_after": _mean([100 * r["after"]["ra"] for r in mine if "ra" in r["after"]]),
            "reactivated_asr": _mean([100 * x["asr"] for x in react]),
            "reactivated_clean_asr": _mean([100 * x["clean"]["asr"] for x in react])})
    board.sort(key=lambda e: -e["der"]["mean"])
    for rank, e in enumerate(board, 1):
        e["rank"] = rank
    return board


def render_leaderboard(board: list[dict], fmt: str = "text") -> str:
    """The leaderboard as ``text``, ``markdown``, ``csv`` or ``json``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "json":
        return json.dumps(board, indent=2)

    def num(v):
        return "-" if v is None else f"{v:.2f}"
    header = ["rank", "defense", "DER", "seeds", "rows", "ACC drop", "ASR after", "RA after", "reactivated ASR",
              "clean model reactivated ASR"]
    lines = [[str(e["rank"]), e["defense"],
              f"{e['der']['mean']:.2f} ± {e['der']['std']:.2f}" if e["der"]["seeds"] > 1 else num(e["der"]["mean"]),
              str(e["der"]["seeds"]), str(e["rows"]), num(e["acc_drop"]), num(e["asr_after"]), num(e["ra_after"]),
              num(e["reactivated_asr"]), num(e["reactivated_clean_asr"])] for e in board]
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *lines])
        return buf.getvalue()
    note = ("Defenses ranked by DER (100 x [max(0, ASR drop) - max(0, ACC drop) + 1] / 2, averaged over the "
            "rows, then mean ± std over seeds); the rest in %, averaged over the cells.")
    if fmt == "markdown":
        out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        return note + "\n\n" + "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines]) + "\n"
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
            for line in [header, *lines]]
    return note + "\n" + "\n".join(text) + "\n"


def leaderboard_figure(board: list[dict], title: str = ""):
    """Horizontal bars of each defense's DER (error bars: std over seeds), best on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(board) + 1.2))
    names = [e["defense"] for e in board][::-1]
    ax.barh(names, [e["der"]["mean"] for e in board][::-1], xerr=[e["der"]["std"] for e in board][::-1], capsize=2)
    ax.axvline(50, color="grey", linestyle="--", linewidth=1)  # DER of a defense that changes nothing
    ax.set_xlim(0, 100)
    ax.set_xlabel("DER (%)")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def summary_metrics(board: list[dict]) -> dict[str, float]:
    """Per defense, for the grid's parent run: ``<defense>.der``, ``.after.asr``, ``.after.acc_drop``,
    ``.after.ra``, ``.reactivated.asr`` (where measured)."""
    out = {}
    for e in board:
        # what MLflow allows in a metric name; a variant's '@' as '/' (i-bau@bb -> i-bau/bb.der)
        d = re.sub(r"[^\w\-. /]", "", e["defense"].replace("@", "/")).strip()
        out[f"{d}.der"] = e["der"]["mean"]
        out[f"{d}.after.asr"] = e["asr_after"]
        out[f"{d}.after.acc_drop"] = e["acc_drop"]
        for key, value in ((f"{d}.after.ra", e["ra_after"]), (f"{d}.reactivated.asr", e["reactivated_asr"]),
                           (f"{d}.reactivated.clean_asr", e["reactivated_clean_asr"])):
            if value is not None:
                out[key] = value
    return out


def log_grid(tracker, run_id: str, results: list[dict], title: str) -> None:
    """Table 1 of a grid on its parent run: Markdown (also the run's description, which the MLflow
    UI's Overview page renders), JSON and a bar chart of ASR and ACC with error bars; the defenses'
    leaderboard (Markdown, JSON, a chart of DER) and its summary metrics per defense (``nad.der``,
    ``nad.after.asr``, ...), so that the runs list compares grids without expanding them. A grid's
    detection cells get the detection table and the detectors' leaderboard
    (:func:`nadbench.commands.detections.log_detections`)."""
    from . import detections

    found = detections.detections(results)
    if found:
        detections.log_detections(tracker, run_id, found, found[0].get("fpr_target", 0.05))
    if not repairs(results):
        return
    t = build(results)
    markdown = render(t, "markdown")
    tracker.tag(run_id, "mlflow.note.content", f"## {title}\n\n{markdown}")
    tracker.text(run_id, markdown, "table/table1.md")
    tracker.text(run_id, render(t, "json"), "table/table1.json")
    tracker.figure(run_id, figure(t, title), "table/table1.png")
    board = leaderboard(results)
    tracker.text(run_id, render_leaderboard(board, "markdown"), "table/leaderboard.md")
    tracker.text(run_id, render_leaderboard(board, "json"), "table/leaderboard.json")
    tracker.figure(run_id, leaderboard_figure(board, title), "table/leaderboard.png")
    tracker.metrics(run_id, summary_metrics(board))
