"""RA and DER (issue: beyond ASR) on hand-computed examples, in tables and in the run summary."""
import statistics

import pytest
import torch
from torch import nn

from nadbench import Split
from nadbench.training.evaluate import backdoor_metrics, defense_effectiveness, evaluate


class ByPixel(nn.Module):
    """Predicts, for an image filled with level v / 255, the class ``answers[v]``."""

    def __init__(self, answers: dict[int, int]):
        super().__init__()
        self.answers = answers
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        levels = (x.flatten(1)[:, 0] * 255).round().long()
        return nn.functional.one_hot(torch.tensor([self.answers[int(v)] for v in levels]), 10).float() + self.dummy


def _images(levels):
    return torch.tensor(levels, dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 4, 4).contiguous()


def test_ra_and_asr_by_hand():
    # four triggered images with true labels 1..4, target 0; predictions 0, 2, 0, 9
    triggered = Split(_images([10, 20, 30, 40]), torch.tensor([1, 2, 3, 4]))
    model = ByPixel({10: 0, 20: 2, 30: 0, 40: 9})
    assert backdoor_metrics(model, triggered, 0) == {"asr": 0.5, "ra": 0.25}
    test = Split(_images([10, 20]), torch.tensor([0, 2]))
    assert evaluate(model, test, triggered, 0) == {"acc": 1.0, "asr": 0.5, "ra": 0.25}


def test_a_model_that_sends_every_triggered_image_to_one_wrong_class_has_neither_asr_nor_ra():
    triggered = Split(_images([10, 20, 30, 40]), torch.tensor([1, 2, 3, 4]))
    model = ByPixel({10: 9, 20: 9, 30: 9, 40: 9})  # garbage: low ASR is not a repair
    assert backdoor_metrics(model, triggered, 0) == {"asr": 0.0, "ra": 0.0}


@pytest.mark.parametrize("before, after, der", [
    ({"asr": 1.0, "acc": 0.9}, {"asr": 0.1, "acc": 0.85}, (0.9 - 0.05 + 1) / 2),
    ({"asr": 0.5, "acc": 0.8}, {"asr": 0.6, "acc": 0.82}, 0.5),   # ASR up, ACC up: both clipped at 0
    ({"asr": 1.0, "acc": 0.9}, {"asr": 0.0, "acc": 0.9}, 1.0),    # the perfect repair
    ({"asr": 1.0, "acc": 0.9}, {"asr": 1.0, "acc": 0.1}, 0.1),    # a wrecked model that keeps the backdoor
])
def test_der_by_hand(before, after, der):
    assert defense_effectiveness(before, after) == pytest.approx(der)


def _result(defense, seed, before, after):
    return {"cell": {"dataset": "cifar10", "attack": "badnets", "defense": defense, "student": "wrn-16-1",
                     "teacher": "wrn-16-1", "seed": seed}, "before": before, "after": after}


def test_tables_show_the_chosen_metrics_and_compute_der_for_results_recorded_without_it():
    from nadbench.commands import tables as table

    before = {"asr": 1.0, "acc": 0.9, "ra": 0.0}
    results = [_result("nad", 0, before, {"asr": 0.1, "acc": 0.85, "ra": 0.7, "der": 0.925}),
               _result("nad", 1, before, {"asr": 0.3, "acc": 0.85, "ra": 0.5}),  # recorded before DER was
               _result("finetune", 0, {"asr": 1.0, "acc": 0.9}, {"asr": 0.5, "acc": 0.9})]  # and before RA
    t = table.build(results, metrics=("asr", "acc", "ra", "der"))
    row = t.rows[("cifar10", "badnets")]
    assert row["nad"]["der"].values == {0: pytest.approx(92.5), 1: pytest.approx(82.5)}
    assert not row["none"]["der"] and row["none"]["ra"].values == {0: 0.0, 1: 0.0}
    assert not row["finetune"]["ra"] and row["finetune"]["der"].values == {0: pytest.approx(75.0)}
    text = table.render(t, "markdown")
    assert "ASR / ACC / RA / DER in %" in text and "RA: robust accuracy" in text
    assert "| 100.00 / 90.00 / 0.00 / - |" in text  # no defense's average: no DER
    assert "50.00 / 90.00 / - / 75.00" in text  # finetune, recorded before RA
    assert table.render(table.build(results), "text").startswith("ASR / ACC in %")  # the default layout
    with pytest.raises(ValueError, match="valid: asr, acc, ra, der"):
        table.build(results, metrics=("asr", "auc"))
    csv = table.render(t, "csv").splitlines()
    assert csv[0].endswith("ra_mean,ra_std,der_mean,der_std")


def test_the_reactivation_check_runs_after_the_defense_and_is_logged(toy_registry, tmp_path, fresh_store):
    """--reactivation: the repaired model and the clean one, retuned on the same images, measured and
    logged as reactivated.* and reactivated.clean.*; the check is part of the cell's key."""
    from nadbench.engine import Cell, Runner
    from nadbench.engine.grid import profile
    from nadbench.engine.tracking import Tracker

    tracker = Tracker(fresh_store(tmp_path), "reactivation")
    runner = Runner(toy_registry(), profile("quick", {"epochs": "1", "batch_size": "32", "crop": "0"}),
                    device=torch.device("cpu"), progress=False, cache_dir=tmp_path, tracker=tracker,
                    reactivation=True)
    cell = Cell("toy", "badnets", "finetune", "wrn-16-1", "wrn-16-1", 0)
    result = runner.run_cell(cell)
    assert set(result["reactivated"]) == {"acc", "asr", "ra", "clean"}
    assert set(result["reactivated"]["clean"]) == {"acc", "asr", "ra"}
    metrics = tracker.client.search_runs([tracker.experiment_id])[0].data.metrics
    assert metrics["reactivated.asr"] == result["reactivated"]["asr"]
    assert metrics["reactivated.clean.acc"] == result["reactivated"]["clean"]["acc"]
    plain = Runner(toy_registry(), runner.profile, device=torch.device("cpu"), progress=False, cache_dir=tmp_path)
    assert plain.plan(cell).key != runner.plan(cell).key and runner.plan(cell).uses_clean


def test_the_leaderboard_ranks_defenses_by_der_and_never_pools_profiles_or_configs():
    from nadbench.commands import tables as table

    before = {"asr": 1.0, "acc": 0.9, "ra": 0.0}

    def cell(defense, attack, seed, asr, acc, profile="quick", config=None, **extra):
        r = _result(defense, seed, before, {"asr": asr, "acc": acc, "ra": 1 - asr})
        r["cell"]["attack"] = attack
        return {**r, "profile": profile, "defense_config": config or {"lr": 0.01}, **extra}

    react = {"reactivated": {"asr": 0.8, "acc": 0.8, "ra": 0.1, "clean": {"asr": 0.1, "acc": 0.8, "ra": 0.8}}}
    results = [cell("nad", "badnets", 0, 0.0, 0.9, **react), cell("nad", "blend", 0, 0.2, 0.8, **react),
               cell("nad", "badnets", 1, 0.0, 0.9), cell("nad", "blend", 1, 0.0, 0.9),
               cell("finetune", "badnets", 0, 0.5, 0.9), cell("finetune", "blend", 0, 0.5, 0.9),
               cell("nad", "badnets", 0, 1.0, 0.9, profile="paper"),
               cell("nad", "badnets", 0, 1.0, 0.5, config={"lr": 0.1})]
    board = table.leaderboard(results)
    assert [e["defense"] for e in board] == ["nad [quick] #1", "finetune", "nad [paper]", "nad [quick] #2"]
    nad = board[0]
    # seed 0: DER (100 + 85) / 2 over the attacks = 92.5; seed 1: 100. Mean 96.25 over seeds.
    assert nad["der"]["mean"] == pytest.approx(96.25) and nad["der"]["seeds"] == 2
    assert nad["acc_drop"] == pytest.approx(2.5) and nad["asr_after"] == pytest.approx(5.0)
    assert nad["reactivated_asr"] == pytest.approx(80) and nad["reactivated_clean_asr"] == pytest.approx(10)
    assert board[1]["der"]["mean"] == pytest.approx(75) and board[1]["reactivated_asr"] is None
    assert board[3]["der"]["mean"] == pytest.approx(30)  # a worse config is its own entry, ranked last
    text = table.render_leaderboard(board, "markdown")
    assert "| 1 | nad [quick] #1 | 96.25 ± 5.30 | 2 | 2 |" in text
    metrics = table.summary_metrics(board)
    assert metrics["finetune.der"] == pytest.approx(75)
    assert metrics["nad quick 1.reactivated.asr"] == 80  # what MLflow allows in a metric name


def test_the_leaderboards_weigh_each_attack_once_when_seeds_ran_different_attacks():
    """Seed 0 ran BadNets and Blend, seeds 1 and 2 only BadNets (a grid extended by seeds of some rows):
    the mean is over the attacks of each one's mean over its seeds, as the table's average row, never a
    mean of per-seed averages (which would count BadNets three times); the std is over seeds on BadNets."""
    from nadbench.commands import detections, tables

    before = {"asr": 1.0, "acc": 0.9, "ra": 0.0}
    ders = [("badnets", 0, 0.0), ("blend", 0, 1.0), ("badnets", 1, 0.0), ("badnets", 2, 0.5)]
    results = []
    for attack, seed, asr in ders:
        r = _result("nad", seed, before, {"asr": asr, "acc": 0.9, "ra": 0.0})
        r["cell"]["attack"] = attack
        results.append({**r, "profile": "quick", "defense_config": {}})
    nad = tables.leaderboard(results)[0]["der"]
    # DER: 100 where ASR falls to 0, 50 where it stays, 75 at half; BadNets (100 + 100 + 75) / 3, Blend 50
    assert nad["mean"] == pytest.approx((275 / 3 + 50) / 2) and nad["seeds"] == 3
    assert nad["std"] == pytest.approx(statistics.stdev([100, 100, 75]))
    cells = [{"kind": "detection", "cell": {"dataset": "c", "attack": a, "seed": s, "detector": "x", "defense": "-"},
              "level": "data", "detection": {"auroc": v, "tpr": v}, "profile": "quick", "detector_config": {}}
             for a, s, v in [("badnets", 0, 1.0), ("refool", 0, 0.5), ("badnets", 1, 1.0), ("badnets", 2, 1.0)]]
    assert detections.leaderboard(cells)[0]["auroc"]["mean"] == pytest.approx(75)  # not (75 + 100 + 100) / 3
