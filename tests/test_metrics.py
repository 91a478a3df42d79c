"""RA and DER (issue: beyond ASR) on hand-computed examples, in tables and in the run summary."""
import pytest
import torch
from torch import nn

from nadbench import Split
from nadbench.evaluate import backdoor_metrics, defense_effectiveness, evaluate


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
    from nadbench import table

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
