"""`bench table` and the clean-share axis, read back from a real MLflow store: a toy grid over two
seeds and two clean shares, then the table in every format, the paired comparison, and what
`bench run` leaves on its parent run (description, Markdown, JSON, bar chart)."""
import json
import math
import statistics
import subprocess
import sys
import types

import pytest
import torch
from click.testing import CliRunner

from conftest import toy_split
from nadbench.training import data as datamod
from nadbench.commands import tables as table
from nadbench.commands.cli import main
from nadbench.engine import Runner, expand, profile, run_grid
from nadbench.engine.tracking import Tracker


@pytest.fixture(scope="module")
def store(toy_registry, tmp_path_factory, fresh_store):
    """A finished toy grid: badnets x {finetune, fine-pruning} x shares {0.25, 0.5} x seeds {0, 1}."""
    tmp = tmp_path_factory.mktemp("table")
    reg = toy_registry()
    uri = fresh_store(tmp)
    tracker = Tracker(uri, "nadbench")
    runner = Runner(reg, profile("quick", {"epochs": "1", "batch_size": "32", "crop": "0"}),
                    device=torch.device("cpu"), progress=False, cache_dir=tmp / "cache", tracker=tracker,
                    overrides={"finetune": {"epochs": "1"}, "fine-pruning": {"epochs": "1"}})
    cells = expand(reg, ["toy"], ["badnets"], ["finetune", "fine-pruning"], ["wrn-16-1"], None, [0, 1],
                   clean_shares=[0.25, 0.5])
    results, failures = run_grid(runner, cells, name="toy grid", summarise=table.log_grid)
    assert not failures and len(results) == 8
    return uri, results, tracker


def _cli(uri, *args):
    out = CliRunner().invoke(main, ["table", "--tracking-uri", uri, *args])
    assert out.exit_code == 0, out.output
    return out.stdout


def test_table_json_is_mean_and_std_over_seeds_per_share(store):
    uri, results, _ = store
    data = json.loads(_cli(uri, "--format", "json"))
    assert data["axes"] == ["clean share"] and data["defenses"] == ["none", "finetune", "fine-pruning"]
    assert [(r["attack"], r["clean share"], r["seeds"]) for r in data["rows"]] == [("badnets", 0.25, 2),
                                                                                 ("badnets", 0.5, 2)]
    for row in data["rows"]:
        mine = [r for r in results if r["cell"]["clean_share"] == row["clean share"]
                and r["cell"]["defense"] == "finetune"]
        asr = [100 * r["after"]["asr"] for r in mine]
        assert row["finetune"]["asr"]["mean"] == pytest.approx(statistics.fmean(asr))
        assert row["finetune"]["asr"]["std"] == pytest.approx(statistics.stdev(asr))
        before = sorted(100 * r["before"]["acc"] for r in mine)
        assert sorted(row["none"]["acc"]["values"].values()) == pytest.approx(before)
    avg = statistics.fmean(r["finetune"]["acc"]["mean"] for r in data["rows"])
    assert data["average"]["finetune"]["acc"] == pytest.approx(avg)
    assert data["deviation"]["finetune"]["acc"] == pytest.approx(avg - data["average"]["none"]["acc"])


def test_table_formats_paper_and_paired(store):
    uri, results, _ = store
    text = _cli(uri)
    assert "± " in text and "average" in text and "deviation" in text and "clean share" in text
    md = _cli(uri, "--format", "markdown", "--paper")
    assert "| dataset | attack | clean share | seeds | no defense | finetune | fine-pruning |" in md
    assert "in italics" in md and "*17.18 / 81.22*" not in md  # toy data, shares 0.25, 0.5: not Table 1
    rows = list(__import__("csv").reader(_cli(uri, "--format", "csv").splitlines()))
    assert rows[0][:4] == ["dataset", "attack", "clean share", "defense"] and len(rows) == 1 + 2 * 3
    paired = _cli(uri, "--paired", "fine-pruning,finetune")
    assert "fine-pruning - finetune, paired by seed" in paired and "(n=2)" in paired
    data = json.loads(_cli(uri, "--paired", "fine-pruning,finetune", "--format", "json"))
    diffs = [100 * (p["after"]["asr"] - f["after"]["asr"]) for p in results for f in results
             if p["cell"]["defense"] == "fine-pruning" and f["cell"]["defense"] == "finetune"
             and p["cell"]["seed"] == f["cell"]["seed"] and p["cell"]["clean_share"] == f["cell"]["clean_share"] == 0.25]
    row = next(r for r in data["paired"]["rows"] if r["row"][-1] == 0.25)
    assert row["n"] == 2 and row["asr"] == pytest.approx(statistics.fmean(diffs))
    assert row["asr_2se"] == pytest.approx(2 * statistics.stdev(diffs) / 2 ** 0.5)


def test_bench_run_leaves_the_table_on_its_parent_run(store):
    uri, results, tracker = store
    parent, read = tracker.grid_results()
    assert len(read) == len(results)
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("## toy grid") and "| no defense |" in note
    arts = {a.path for a in tracker.client.list_artifacts(parent.info.run_id, "table")}
    assert arts == {"table/table1.md", "table/table1.json", "table/table1.png", "table/leaderboard.md",
                    "table/leaderboard.json", "table/leaderboard.png"}
    defenses = {r["cell"]["defense"] for r in results}
    assert {f"{d}.der" for d in defenses} <= set(parent.data.metrics)  # the runs list compares grids
    out = CliRunner().invoke(main, ["table", "--tracking-uri", uri, "--leaderboard", "--format", "json"])
    board = json.loads(out.stdout)
    assert out.exit_code == 0 and {e["defense"] for e in board} == defenses
    assert board == sorted(board, key=lambda e: -e["der"]["mean"])


def test_table_errors_name_what_is_missing(tmp_path):
    out = CliRunner().invoke(main, ["table", "--tracking-uri", f"sqlite:///{tmp_path}/empty.db"])
    assert out.exit_code != 0 and "no `bench run` grid" in out.output
    out = CliRunner().invoke(main, ["table", "--tracking-uri", f"sqlite:///{tmp_path}/empty.db", "--run-id", "abc"])
    assert out.exit_code != 0 and "no run 'abc'" in out.output


def test_clean_subsets_are_nested_across_shares():
    train = toy_split(400, 7)
    rows = lambda split: {bytes(img.flatten().tolist()) for img in split.images}  # noqa: E731
    small, mid, large = (rows(datamod.clean_subset(train, s, seed=3)) for s in (0.01, 0.05, 0.1))
    assert len(small) == 4 and len(mid) == 20 and small <= mid <= large
    assert rows(datamod.clean_subset(train, 0.05, seed=4)) != mid  # another seed, another subset


def test_clean_shares_axis_multiplies_cells_and_is_checked(toy_registry):
    cells = expand(toy_registry(), ["toy"], ["badnets"], ["finetune", "nad"], ["wrn-16-1"], None, [0],
                   clean_shares=[0.01, 0.1])
    assert sorted((c.defense, c.clean_share) for c in cells) == [("finetune", 0.01), ("finetune", 0.1),
                                                                 ("nad", 0.01), ("nad", 0.1)]
    assert cells[0].label.endswith("/clean0.01/seed0")
    out = subprocess.run([sys.executable, "-m", "nadbench.commands.cli", "run", "--clean-shares", "0.05,2"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "every share must be in (0, 1]" in out.stderr


def test_render_rejects_unknown_format():
    with pytest.raises(ValueError, match="valid: text, markdown, csv, json"):
        table.render(table.build([]), "html")


def _result(defense, seed, asr, teacher="wrn-16-1", source="supplied", before=(1.0, 0.8), **fields):
    """A synthetic cell result; ``fields`` override (or add to) the cell's fields."""
    from nadbench.engine import Cell

    student = fields.get("student", "wrn-16-1")
    cell = Cell("cifar10", "badnets", defense, student, teacher if source else student, seed, source)
    return {"cell": {**__import__("dataclasses").asdict(cell), **fields},
            "before": {"asr": before[0], "acc": before[1]}, "after": {"asr": asr, "acc": 0.78}, "status": "FINISHED"}


def test_columns_follow_the_papers_order_whatever_the_grid_order():
    # `--defenses all` lists the built-ins by name; Table 1 reads FT, FP, MCR, NAD; others after them.
    cells = [_result(d, 0, 0.1, source="" if d != "nad" else "supplied")
             for d in ("fine-pruning", "zz-mine", "finetune", "mcr", "nad")]
    assert table.build(cells).defenses == ["none", "finetune", "fine-pruning", "mcr", "nad", "zz-mine"]


def test_a_cell_with_fewer_seeds_than_its_row_says_so():
    # An interrupted grid: NAD finished one seed of two; its mean is over that one, and reads so.
    t = table.build([_result("finetune", 0, 0.1, source=""), _result("finetune", 1, 0.3, source=""),
                     _result("nad", 0, 0.2)])
    row = table.render(t, "markdown").splitlines()[4]
    assert "20.00 ± 14.14 / 78.00 ± 0.00 |" in row and "20.00 / 78.00 (n=1)" in row
    assert "(n=1)" in table.render(t, "text")


def test_teacher_rows_only_when_the_teachers_vary():
    one = table.build([_result("finetune", 0, 0.05, source=""), _result("nad", 0, 0.04)])
    assert one.axes == [] and list(one.rows) == [("cifar10", "badnets")]
    two = table.build([_result("finetune", 0, 0.05, source=""), _result("nad", 0, 0.04),
                       _result("nad", 0, 0.02, teacher="wrn-16-2")])
    assert two.axes == ["teacher"] and len(two.rows) == 2
    assert all(row["finetune"]["asr"].mean == 5.0 for row in two.rows.values())  # repeated in each
    assert [row["nad"]["asr"].mean for row in two.rows.values()] == [4.0, 2.0]


def test_a_resumed_cell_takes_the_share_its_grid_names(toy_registry, tmp_path, fresh_store):
    """A cell recorded without --clean-shares (the profile's 0.05) is the same cell as 0.05 named
    explicitly: reused, it appears under the share of the grid that reuses it. Its grids go to a store
    of their own: the module's store holds one grid, whatever order its tests run in."""
    tracker = Tracker(fresh_store(tmp_path), "nadbench")
    reg = toy_registry()
    runner = Runner(reg, profile("quick", {"epochs": "1", "batch_size": "32", "crop": "0"}),
                    device=torch.device("cpu"), progress=False, cache_dir=tmp_path, tracker=tracker,
                    overrides={"finetune": {"epochs": "1"}})
    plain = expand(reg, ["toy"], ["badnets"], ["finetune"], ["wrn-16-1"], None, [0])
    first, _ = run_grid(runner, plain, name="no shares")
    named, _ = run_grid(runner, expand(reg, ["toy"], ["badnets"], ["finetune"], ["wrn-16-1"], None, [0],
                                       clean_shares=[0.05]), name="named share")
    assert first[0]["cell"]["clean_share"] is None
    assert named[0]["reused_from"] and named[0]["cell"]["clean_share"] == 0.05


def test_an_average_over_fewer_rows_says_so_and_its_deviation_pairs_rows():
    # NAD failed on Blend: its average is over BadNets only, and so is the "no defense" it is compared
    # with (BadNets' 80.00 ACC, not the 70.00 of both rows), else NAD would gain 8 points of ACC.
    blend = {"attack": "blend", "before": (0.9, 0.6)}
    t = table.build([_result("finetune", 0, 0.1, source=""), _result("nad", 0, 0.04),
                     _result("finetune", 0, 0.1, source="", **blend)])
    data = table.to_json(t)
    assert data["average"]["nad"] == {"asr": 4.0, "acc": 78.0, "rows": 1}
    assert data["deviation"]["nad"] == {"asr": -96.0, "acc": pytest.approx(-2.0), "rows": 1}
    assert data["average"]["finetune"]["rows"] == data["average"]["none"]["rows"] == 2
    assert data["deviation"]["finetune"]["acc"] == pytest.approx(78.0 - 70.0)
    for fmt in ("text", "markdown"):
        lines = table.render(t, fmt).splitlines()
        average, deviation = (next(x for x in lines if x.lstrip("| ").startswith(w)) for w in ("average", "deviation"))
        assert "-96.00 / -2.00 (1/2 rows)" in deviation and "4.00 / 78.00 (1/2 rows)" in average
        assert average.count("rows)") == deviation.count("rows)") == 1  # finetune and none: every row
    full = table.render(table.build([_result("finetune", 0, 0.1, source=""), _result("nad", 0, 0.04)]), "text")
    assert "rows)" not in full and "-90.00 / -2.00  -96.00 / -2.00" in full


@pytest.mark.parametrize("fields, paper", [
    ({}, True), ({"clean_share": 0.05}, True),
    ({"attack": "refool", "dataset": "gtsrb"}, True),
    ({"dataset": "gtsrb"}, False), ({"attack": "refool"}, False),  # refool's row is on GTSRB only
    ({"student": "preact-resnet18"}, False), ({"teacher": "wrn-16-2"}, False),
    ({"teacher_source": "scratch"}, False), ({"clean_share": 0.1}, False),
    ({"attack": "badnets@all2all"}, False),
], ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "paper" if isinstance(v, dict) else str(v))
def test_paper_numbers_only_beside_the_papers_setting(fields, paper):
    # One row (no axis varies): NAD's cell outside the paper's setting takes the whole row out, "no
    # defense" and finetuning too, since the row's numbers mix it in.
    results = [_result("finetune", 0, 0.1, source="", **{k: v for k, v in fields.items()
                                                          if k not in ("teacher", "teacher_source")}),
               _result("nad", 0, 0.04, **fields)]
    t = table.build(results, paper=True)
    (row,) = table.to_json(t)["rows"]
    assert [("paper" in row[d]) for d in ("none", "finetune", "nad")] == [paper] * 3
    assert ("(paper " in table.render(t, "text")) == paper
    assert all(bool(r[-2:] != ["", ""]) == paper for r in list(__import__("csv").reader(
        table.render(t, "csv").splitlines()))[1:])


def test_paired_rows_without_a_common_seed_have_n_0(monkeypatch):
    # finetune ran seed 0 and NAD seed 1 of the same row: nothing to pair, yet no crash.
    results = [_result("finetune", 0, 0.1, source=""), _result("nad", 1, 0.04)]
    (item,) = table.paired(results, "nad", "finetune").values()
    assert item["n"] == 0 and all(math.isnan(item[k]) for k in ("asr", "acc", "asr_2se", "acc_2se"))

    class Tracker:  # `bench table` without MLflow: the grid's results as read back
        def __init__(self, *args):
            pass

        def grid_results(self, run_id):
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1", run_name="grid")), results

    monkeypatch.setattr("nadbench.engine.tracking.Tracker", Tracker)
    for fmt, shown in (("text", "ASR +nan ± nan, ACC +nan ± nan (n=0)"), ("json", '"n": 0')):
        out = CliRunner().invoke(main, ["table", "--paired", "nad,finetune", "--format", fmt])
        assert out.exit_code == 0 and shown in out.stdout, out.output


def test_a_row_whose_defenses_repaired_different_backdoored_models_says_so():
    """A table composed from grids that each trained their own backdoored model (another device, another
    precision) used to show one model's "no defense" beside defenses run on the other, silently."""
    same = table.build([_result("finetune", 0, 0.1, source=""), _result("nad", 0, 0.2),
                        _result("mcr", 0, 0.3, source="", before=(1.0, 0.80001))])  # one model, re-evaluated
    assert not same.mixed and "Warning" not in table.render(same, "markdown")
    t = table.build([_result("finetune", 0, 0.1, source="", before=(0.8244, 0.9272)),
                     _result("nad", 0, 0.2, before=(0.7982, 0.9146))])
    assert t.mixed == {("cifar10", "badnets"): {0: {"asr": [82.44, 79.82], "acc": [92.72, 91.46]}}}
    for fmt in ("markdown", "text"):
        assert "repaired different backdoored models" in table.render(t, fmt)
        assert "cifar10/badnets seed 0 (ASR 82.44 vs 79.82; ACC 92.72 vs 91.46)" in table.render(t, fmt)
    assert table.to_json(t)["rows"][0]["mixed_no_defense"] == {"0": {"asr": [82.44, 79.82], "acc": [92.72, 91.46]}}


# ------------------------------------------------------------------------------ bench report
def _toy_grid(tracker) -> str:
    """The fixture's grid, by its name."""
    grids = tracker.client.search_runs([tracker.experiment_id], "tags.`nadbench.grid` = '1'")
    return next(r for r in grids if r.info.run_name == "toy grid").info.run_id


def _report(store, tmp_path) -> str:
    uri, _, tracker = store
    out = tmp_path / "report.html"
    res = CliRunner().invoke(main, ["report", "--tracking-uri", uri, "--run-id", _toy_grid(tracker),
                                    "--output", str(out)])
    assert res.exit_code == 0 and "1 grid(s), 8 finished cell(s)" in res.output, res.output
    return out.read_text()


def test_bench_report_is_one_self_contained_page_with_every_cells_numbers(store, tmp_path):
    """Every number `bench table --format json` gives is on the page; the figures are inlined and
    nothing on it reaches the network."""
    import re

    uri, results, tracker = store
    page = _report(store, tmp_path)
    data = json.loads(_cli(uri, "--format", "json", "--run-id", _toy_grid(tracker)))
    for row in data["rows"]:
        for defense in data["defenses"]:
            for metric, s in row[defense].items():
                if metric != "paper":
                    assert f"{s['mean']:.2f} ± {s['std']:.2f}" in page, (row["attack"], defense, metric)
    assert "toy grid" in page and "RA: robust accuracy" in page and "Leaderboard" in page
    assert page.count("<details>") == len(results)  # one per cell, its figures behind the click
    assert page.count('src="data:image/png;base64,') >= 2 + len(results)  # the charts and each cell's maps
    assert not re.findall(r'(?:src|href)="(?!data:)', page) and "http://" not in page and "https://" not in page


def _chromium():
    import shutil

    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def test_the_report_shows_its_numbers_in_a_real_browser(store, tmp_path):
    """Headless Chromium opens the file (no server) and its DOM holds the table. CI installs Chromium
    and sets NADBENCH_REQUIRE_BROWSER, so it never skips there."""
    import os

    browser = _chromium()
    if browser is None:
        if os.environ.get("NADBENCH_REQUIRE_BROWSER"):
            pytest.fail("NADBENCH_REQUIRE_BROWSER is set and no chromium is installed")
        pytest.skip("no chromium on this machine (.ci/run installs it)")
    uri, _, tracker = store
    _report(store, tmp_path)
    data = json.loads(_cli(uri, "--format", "json", "--run-id", _toy_grid(tracker)))
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          "--dump-dom", (tmp_path / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert "<table" in dom.stdout, dom.stderr[-2000:]
    first = data["rows"][0]["finetune"]["asr"]
    assert f"{first['mean']:.2f} ± {first['std']:.2f}" in dom.stdout and "Leaderboard" in dom.stdout


def test_a_grid_is_named_by_what_ran():
    from nadbench.commands.cli import grid_name

    assert grid_name("quick", ["cifar10"], ["badnets"], ["finetune", "nad"], [0]) == \
        "quick · cifar10 · badnets × finetune, nad · seed 0"
    assert grid_name("paper", ["cifar10"], [f"a{i}" for i in range(13)], ["nad"], [0, 1]) == \
        "paper · cifar10 · 13 attacks × nad · seeds 0,1"


def test_the_report_lists_a_failed_cell_with_its_errors_first_line(tmp_path):
    from types import SimpleNamespace

    from nadbench.commands.report import _cells

    run = SimpleNamespace(info=SimpleNamespace(run_name="cifar10/badnets/nad/wrn-16-1/seed0", run_id="r1",
                                               status="FAILED"),
                          data=SimpleNamespace(tags={"error": "DataError: no images in clean/\nmore"}, params={}))
    assert _cells(None, [run], tmp_path) == ('<p class="failed">cifar10/badnets/nad/wrn-16-1/seed0: failed: '
                                             "DataError: no images in clean/</p>")
