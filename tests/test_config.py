"""Typed configs: parsing, validation messages that name the field and the valid range."""
import pytest

from nadbench.contract.config import ConfigError, build, describe, flatten
from nadbench.engine.registry import get_registry


def test_defaults_are_the_papers():
    nad = get_registry().defense("nad")()
    assert nad.config.betas == (500.0, 1000.0, 1000.0)
    assert (nad.config.epochs, nad.config.teacher_epochs, nad.config.lr) == (10, 10, 0.1)  # the paper's Table 1
    assert nad.config.milestones == (2,) and nad.config.attention == "mean_p" and nad.config.p == 2.0
    bad = get_registry().attack("badnets")()
    assert (bad.config.poison_rate, bad.config.target) == (0.1, 5)


def test_overrides_parse_and_validate():
    nad = get_registry().defense("nad")
    cfg = nad.from_overrides({"betas": "1,2,3", "epochs": "4", "attention": "sum"}).config
    assert cfg.betas == (1.0, 2.0, 3.0) and cfg.epochs == 4 and cfg.attention == "sum"
    with pytest.raises(ConfigError, match=r"nad.attention = 'max' is invalid: must be one of mean_p, sum_p, sum"):
        nad.from_overrides({"attention": "max"})
    with pytest.raises(ConfigError, match=r"badnets.poison_rate = 1.5 is out of range: must be in \[0.0, 1.0\]"):
        get_registry().attack("badnets").from_overrides({"poison_rate": "1.5"})
    with pytest.raises(ConfigError, match="nad.epochs = 'ten' is not a valid int"):
        nad.from_overrides({"epochs": "ten"})
    with pytest.raises(ConfigError, match="nad.nope is not a field; valid fields: epochs"):
        nad.from_overrides({"nope": "1"})


def test_describe_and_flatten():
    cfg_cls = get_registry().attack("badnets").Config
    rows = {name: (default, help_) for name, default, help_ in describe(cfg_cls)}
    assert rows["poison_rate"][0] == 0.1 and "[0.0, 1.0]" in rows["poison_rate"][1]
    flat = flatten(build(get_registry().defense("nad").Config), "defense")
    assert flat["defense.betas"] == "500.0,1000.0,1000.0"


def test_the_quick_profiles_finetuning_lr_is_what_its_validation_procedure_chose():
    """The value comes from benchmarks/quick_lr.py's committed results (a validation split carved from
    the training set, held-out seeds, a rule fixed before the runs), not from the test set."""
    import importlib.util
    from pathlib import Path

    from nadbench.engine.grid import PROFILES

    path = Path(__file__).parents[1] / "benchmarks" / "quick_lr.py"
    spec = importlib.util.spec_from_file_location("quick_lr", path)
    quick_lr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quick_lr)
    assert PROFILES["quick"].finetune_lr == quick_lr.chosen()
    assert PROFILES["paper"].finetune_lr is None  # the paper's profile keeps each defense's own lr
