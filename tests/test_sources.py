"""Every built-in method declares its sources and deviations (nadbench.contract.sources); `bench list NAME` shows
them, each cell logs them, and the committed fidelity table (docs/fidelity.md) is the one they generate."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from nadbench import Attack, Deviation, Source
from nadbench.commands.cli import main
from nadbench.commands.fidelity import render
from nadbench.engine.registry import get_registry
from nadbench.contract.sources import cell_tag, problems

ROOT = Path(__file__).resolve().parent.parent


def built_ins(kind):
    reg = get_registry()
    return [(n, reg.get(kind, n)) for n in reg.names(kind) if reg.get(kind, n).provider.startswith("nadbench ")]


@pytest.mark.parametrize("kind", ["attacks", "defenses", "detectors"])
def test_every_built_in_declares_well_formed_sources(kind):
    items = built_ins(kind)
    assert len(items) >= (8 if kind == "detectors" else 12)
    bad = {name: problems(item, required=True) for name, item in items if problems(item, required=True)}
    assert not bad, bad
    for name, item in items:  # the official code is named wherever one was read
        assert any(s.repo for s in item.sources), f"{name}: no source names a repository it was read from"


def test_malformed_declarations_are_reported():
    good = Source(paper="A & B, Title, Venue 2020", repo="owner/name", path="main.py", commit="0" * 40)

    def declared(**attrs):
        return type("X", (Attack,), {"name": "x", **attrs})

    assert problems(declared(sources=(good,)), required=True) == []
    assert problems(declared(sources=good), required=True) == []  # one Source, not a tuple
    assert problems(declared(), required=True) == ["declares no sources"]
    assert problems(declared()) == []  # a third party may declare none
    cases = {"not 'owner/name'": dict(repo="https://github.com/owner/name"),
             "40 lowercase hex": dict(commit="abc123"),
             "no path": dict(path=""),
             "says not why": dict(repo="", commit="", path=""),
             "names no paper": dict(paper=" ")}
    for message, change in cases.items():
        found = problems(declared(sources=(Source(**{**good.__dict__, **change}),)))
        assert len(found) == 1 and message in found[0], (message, found)
    assert problems(declared(sources=(Source(paper="P", no_code="none released"),))) == []
    half = Deviation("lr", ours="0.1", theirs="", why="x")
    assert "leaves setting, ours, theirs or why empty" in problems(declared(sources=good, deviations=(half,)))[0]


def test_bench_list_name_shows_sources_and_deviations():
    out = CliRunner().invoke(main, ["list", "anp"])
    assert out.exit_code == 0, out.output
    assert "csdongxian/ANP_backdoor@" in out.output and "optimize_mask_cifar.py" in out.output
    assert "config/defense/anp/cifar10.yaml" in out.output and "threshold:" in out.output
    out = CliRunner().invoke(main, ["list", "badnets@all2all"])
    assert out.exit_code == 0 and "no official code (the authors released none" in out.output
    assert CliRunner().invoke(main, ["list", "no-such-method"]).exit_code != 0


def test_committed_fidelity_table_is_current():
    """CI fails here when a declaration changed without `python -m nadbench.commands.fidelity --output docs/fidelity.md`."""
    committed = (ROOT / "docs" / "fidelity.md").read_text()
    assert committed == render(get_registry()), \
        "docs/fidelity.md is stale: python -m nadbench.commands.fidelity --output docs/fidelity.md"


def test_each_cell_logs_its_sources(monkeypatch):
    """run_cell tags its run ``nadbench.sources`` (a small JSON) before any stage runs."""
    from nadbench import engine
    from nadbench.engine.grid import Cell, profile

    reg = get_registry()
    tags = {}

    class Tracker:
        def start(self, name, params, parent=None, tags=None):
            return "run"

        def tag(self, run_id, key, value):
            tags[key] = value

        def end(self, run_id, status="FINISHED"):
            tags["status"] = status

        def __getattr__(self, name):  # params, metrics, text, ...: nothing to record here
            return lambda *a, **k: None

    runner = engine.Runner(reg, profile("quick"), device=torch.device("cpu"), tracker=Tracker(), progress=False)
    monkeypatch.setattr(runner, "plan", lambda cell: SimpleNamespace(key=("k", "")))
    monkeypatch.setattr(runner, "data", lambda name: (_ for _ in ()).throw(RuntimeError("no stage runs here")))
    with pytest.raises(RuntimeError, match="no stage runs here"):
        runner.run_cell(Cell("cifar10", "badnets@all2all", "anp", "wrn-16-1", "wrn-16-1", 0))
    assert tags["status"] == "FAILED"
    logged = json.loads(tags["nadbench.sources"])
    assert logged == json.loads(cell_tag(reg.attack("badnets"), reg.defense("anp")))
    assert logged["attack"]["sources"][1].startswith("bboylyg/NAD@f17b71390f61:")
    assert "threshold" in logged["defense"]["deviations"] and len(tags["nadbench.sources"]) < 2000
