"""Shared pytest fixtures. Keep each section small and self-contained."""
import pytest


# ------------------------------------------------------------------------------ dataset cache
@pytest.fixture(scope="session", autouse=True)
def nadbench_cache(tmp_path_factory):
    """One NADBENCH_CACHE for the whole session: tests never write to ~/.cache/nadbench, and the
    real datasets are decoded at most once per run. Tests that need an empty cache monkeypatch
    NADBENCH_CACHE to their own tmp_path."""
    path = tmp_path_factory.mktemp("nadbench-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NADBENCH_CACHE", str(path))
        yield path


# ------------------------------------------------------------------------------ toy registry
def toy_split(n, seed):
    """``n`` random 32x32 images, labels 0..9 in turn: shapes only, nothing to learn."""
    import torch
    from nadbench import Split

    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10)


@pytest.fixture(scope="session")
def toy_registry():
    """A factory: the installed plugins plus the dataset "toy" (64 training and 40 test images of
    ``toy_split``) and the extra models / defenses given, registered as a third party would."""
    import types

    from nadbench import DatasetSpec, hookimpl
    from nadbench.registry import PluginInfo, Registry

    def make(models=(), defenses=()):
        reg = Registry()
        reg.load_entrypoints()
        toy = DatasetSpec("toy", lambda root: (toy_split(64, 0), toy_split(40, 1)), 10,
                          (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        module = types.ModuleType("toy_plugin")
        module.register_datasets = hookimpl(lambda register: register(toy))
        module.register_models = hookimpl(lambda register: [register(m) for m in models])
        module.register_defenses = hookimpl(lambda register: [register(d) for d in defenses])
        info = PluginInfo("toy", "toy_plugin", "toy-dist 0.1")
        reg.add_plugin(module, info)
        assert info.error is None, info.traceback
        return reg
    return make


# ------------------------------------------------------------------------------ real-data subset
# The CIFAR-10 subset and schedule the real-data tests share (test_attacks_e2e, test_e2e,
# test_defenses_e2e): no augmentation, as the official NAD code trains, so a backdoor implants in
# few steps; lr 0.1, not the profile's 0.2 (at 0.2 BadNets' implant on this subset depends on the
# CPU's kernels: seed 0 ASR 0.99 on one machine, 0.17 on an AVX2-only one). One session cache, so
# the backdoored models are trained once per run.
SUBSET = {"train_limit": "8000", "test_limit": "1000", "epochs": "6", "lr": "0.1", "crop": "0", "flip": "false"}


@pytest.fixture(scope="session")
def subset_runner():
    """A factory of Runners on the real datasets with the ``SUBSET`` profile (on the CPU, no
    tracking); skips when ``NADBENCH_DATA_ROOT`` does not point at the dataset archives."""
    import os
    from pathlib import Path

    root = os.environ.get("NADBENCH_DATA_ROOT")
    if not root or not Path(root).is_dir():
        pytest.skip("NADBENCH_DATA_ROOT is not set to the folder holding the dataset archives")

    def make(overrides=None, **profile_fields):
        import torch
        from nadbench.engine import Runner, profile
        from nadbench.registry import get_registry

        prof = profile("quick", {**SUBSET, **{k: str(v) for k, v in profile_fields.items()}})
        return Runner(get_registry(), prof, device=torch.device("cpu"), data_root=Path(root), progress=False,
                      overrides=overrides)
    return make
