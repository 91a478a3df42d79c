"""Shared pytest fixtures. Keep each section small and self-contained."""
import os
from pathlib import Path

import pytest

# ------------------------------------------------------------------------------ parallel workers
# The suite runs on one pytest-xdist worker per CPU core with one CPU thread each (pyproject's addopts:
# `-n auto --dist loadfile`), set here before torch starts and inherited by every process a test starts
# (`bench`, grid workers): on a 2-core machine two one-thread processes get through the suite faster than
# one with two threads, whose small convolutions scale poorly across threads, and the CLI tests' start-ups
# overlap (benchmarks/results/suite-time.md). A file's tests run on one worker, so its module fixtures
# (trained models) are made once. `pytest -n 0` runs everything in one process with torch's default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"


def shared_datasets(tmp_path_factory) -> Path:
    """The decoded datasets' folder of this run, shared by its workers (written atomically): each
    archive is decoded once per run."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "datasets"
    folder.mkdir(exist_ok=True)
    return folder


# ------------------------------------------------------------------------------ dataset cache
@pytest.fixture(scope="session", autouse=True)
def nadbench_cache(tmp_path_factory):
    """One NADBENCH_CACHE for the whole session: tests never write to ~/.cache/nadbench, and the
    real datasets are decoded at most once per run. Tests that need an empty cache monkeypatch
    NADBENCH_CACHE to their own tmp_path."""
    path = tmp_path_factory.mktemp("nadbench-cache")
    (path / "datasets").symlink_to(shared_datasets(tmp_path_factory), target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NADBENCH_CACHE", str(path))
        yield path


def own_stage_cache(folder: Path) -> Path:
    """``folder`` as a stage cache of its own (for a `bench` process that must train its models
    afresh) whose decoded datasets are the session's: the JPEGs are decoded once per session."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "datasets").exists():
        shared = Path(os.environ["NADBENCH_CACHE"]) / "datasets"
        shared.mkdir(parents=True, exist_ok=True)
        (folder / "datasets").symlink_to(shared, target_is_directory=True)
    return folder


# ------------------------------------------------------------------------------ precision
# The suite runs in float32, whatever this CPU's `auto` precision is. bf16 kernels differ between the
# CPU kinds that run the suite (AVX2-only, where bf16 is emulated; AVX512-BF16; AVX512-BF16 with AMX)
# enough to move a trained outcome across a bound, so a test's verdict must not hang on them. float32
# is not bit-identical across kinds either: every bound on a trained outcome lies beyond the worst of
# three seeds (`effect_seed`) measured in float32, with those values written beside it, and a
# do-nothing method still fails it (`python benchmarks/test_margins.py` measures them).
# Tests of the bf16 path opt in with `@pytest.mark.bf16`: they run under `auto` (bf16 where the CPU has
# it natively, float32 elsewhere, as a user's run) and assert only what every bf16 kernel shares.
SUITE_PRECISION = "float32"


def pytest_configure(config):
    config.addinivalue_line("markers", "bf16: runs under the CPU's default precision (`auto`: bf16 where "
                                       "native) instead of the suite's float32")
    config.addinivalue_line("markers", "seeded: its verdict is a trained outcome that depends on "
                                       "NADBENCH_TEST_SEED (benchmarks/test_margins.py sweeps it)")


# Test files that make one costly thing in a worker's session: on one worker, it is made once. The
# StegaStamp encoder (``stegastamp_prepared``) serves test_attack_stegastamp.py and the stegastamp
# implant of test_attacks_e2e.py; the README round trip (test_defend.py) trains the backdoored model
# test_e2e.py's grid finds in the session's stage cache.
SAME_WORKER = {"tests/test_attack_stegastamp.py": "tests/test_attacks_e2e.py",
               "tests/test_defend.py": "tests/test_e2e.py"}


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's ``--dist loadfile`` (pyproject's addopts), with the files of ``SAME_WORKER`` one unit."""
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SAME_WORKER.get(scope, scope)
    return Scheduling(config, log)


def pytest_collection_modifyitems(items):
    for item in items:
        if "effect_seed" in item.fixturenames:
            item.add_marker("seeded")


@pytest.fixture(scope="session", autouse=True)
def suite_precision():
    """float32 for the whole session, set before any fixture trains (module fixtures included): the
    process's default RunSettings for in-process runs, and the CLI's default (its --precision reads
    NADBENCH_PRECISION) for the `bench` processes tests start."""
    import torch

    from nadbench.training import settings

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)  # as OMP_NUM_THREADS (above), should torch have started before it
    old = settings.set_default(settings.RunSettings(precision=SUITE_PRECISION))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NADBENCH_PRECISION", SUITE_PRECISION)
        yield SUITE_PRECISION
    settings.set_default(old)


@pytest.fixture
def run_settings(monkeypatch):
    """``run_settings(**fields)``: make the process default RunSettings the suite's with ``fields``
    changed, for this test (e.g. ``precision="bf16"``, ``fused=True``); returns them."""
    from nadbench.training import settings

    def change(**fields):
        new = settings.current().replace(**fields)
        monkeypatch.setattr(settings, "_DEFAULT", [new])
        return new
    return change


@pytest.fixture(autouse=True)
def _bf16_marker(request, monkeypatch):
    if request.node.get_closest_marker("bf16"):
        from nadbench.training import settings

        monkeypatch.setattr(settings, "_DEFAULT", [settings.current().replace(precision="auto")])
        monkeypatch.setenv("NADBENCH_PRECISION", "auto")


# ------------------------------------------------------------------------------ trained outcomes
@pytest.fixture(scope="session")
def effect_seed() -> int:
    """The seed of the randomness a trained outcome depends on (a defense's, a training's):
    ``NADBENCH_TEST_SEED``, 0 by default. benchmarks/test_margins.py runs the `seeded` tests at 0, 1, 2."""
    import os

    return int(os.environ.get("NADBENCH_TEST_SEED", "0"))


@pytest.fixture
def record(request, effect_seed):
    """``record(key=value, ...)``: print the trained outcomes a test bounds and, where
    ``NADBENCH_TEST_RECORD`` names a file, append them to it as one JSON line (test, seed, values)."""
    import json
    import os

    def write(**values):
        values = {k: round(float(v), 4) for k, v in values.items()}
        print(f"{request.node.nodeid} seed {effect_seed}: {values}")
        if os.environ.get("NADBENCH_TEST_RECORD"):
            with open(os.environ["NADBENCH_TEST_RECORD"], "a") as f:
                f.write(json.dumps({"test": request.node.nodeid, "seed": effect_seed, **values}) + "\n")
    return write


# ------------------------------------------------------------------------------ toy registry
def _tiny(num_classes):
    """A network small enough that training it costs nothing: for tests of rules, not effects."""
    import torch.nn.functional as F
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, num_classes)

        def forward(self, x):
            return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))
    return Tiny()


def _tiny_spec():
    from nadbench import ModelSpec

    return ModelSpec("tiny", _tiny, attention_layers=("bn",), classifier_layer="fc")


TINY = _tiny_spec()


def toy_split(n, seed):
    """``n`` random 32x32 images, labels 0..9 in turn: shapes only, nothing to learn."""
    import torch
    from nadbench import Split

    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10)


@pytest.fixture(scope="session")
def toy_registry():
    """A factory: the installed plugins plus the dataset "toy" (64 training and 40 test images of
    ``toy_split``) and the extra models / defenses / detectors given, registered as a third party would."""
    import types

    from nadbench import DatasetSpec, hookimpl
    from nadbench.engine.registry import PluginInfo, Registry

    def make(models=(), defenses=(), detectors=()):
        reg = Registry()
        reg.load_entrypoints()
        toy = DatasetSpec("toy", lambda root: (toy_split(64, 0), toy_split(40, 1)), 10,
                          (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        module = types.ModuleType("toy_plugin")
        module.register_datasets = hookimpl(lambda register: register(toy))
        module.register_models = hookimpl(lambda register: [register(m) for m in models])
        module.register_defenses = hookimpl(lambda register: [register(d) for d in defenses])
        module.register_detectors = hookimpl(lambda register: [register(d) for d in detectors])
        info = PluginInfo("toy", "toy_plugin", "toy-dist 0.1")
        reg.add_plugin(module, info)
        assert info.error is None, info.traceback
        return reg
    return make


# ------------------------------------------------------------------------------ MLflow stores
@pytest.fixture(scope="session")
def fresh_store(tmp_path_factory):
    """A factory: ``fresh_store(folder)`` puts a new, empty MLflow SQLite store at
    ``folder/nadbench.db`` (where `bench` looks by default) and returns its URI. Creating a store
    runs MLflow's schema migrations (~6 s on these CPUs): they run once per session, and each store
    is a copy of that one."""
    import shutil

    from mlflow.tracking import MlflowClient

    template = tmp_path_factory.mktemp("mlflow-template") / "nadbench.db"
    MlflowClient(f"sqlite:///{template}").search_experiments()  # creates and migrates the schema

    def make(folder: Path, name: str = "nadbench.db") -> str:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, folder / name)
        return f"sqlite:///{folder / name}"
    return make


# ------------------------------------------------------------------------------ committed fixture models
FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_TRAIN_LIMIT = 20000  # tests/fixtures/make_fixtures.py: the models saw limit(train, this, seed=0)


def data_root() -> Path:
    """The folder of the dataset archives (``NADBENCH_DATA_ROOT``); skips the test without it."""
    import os

    root = os.environ.get("NADBENCH_DATA_ROOT")
    if not root or not Path(root).is_dir():
        pytest.skip("NADBENCH_DATA_ROOT is not set to the folder holding the dataset archives")
    return Path(root)


def fixture_model(name: str):
    """A committed real-data model (tests/fixtures/make_fixtures.py): "clean" or "badnets"
    (WRN-16-1, CIFAR-10), loaded from its safetensors file, in eval mode on the CPU."""
    from nadbench.commands.userfiles import load_model
    from nadbench.engine.registry import get_registry

    return load_model(FIXTURES / f"{name}-wrn16-1.safetensors", get_registry().model("wrn-16-1"), 10).eval()


def real_subset(n_train: int, n_test: int, dataset: str = "cifar10"):
    """(train, test) of a real dataset on the CPU: a seeded ``n_train`` of the fixture models'
    training subset (for CIFAR-10, images they saw) and a seeded ``n_test`` of the test split, each
    in the split's order (sorted by class: take subsets, never the first rows)."""
    from nadbench.engine.registry import get_registry
    from nadbench.training.subsets import limit

    train, test = get_registry().dataset(dataset).load(data_root())
    return limit(limit(train, FIXTURE_TRAIN_LIMIT, seed=0), n_train, seed=1), limit(test, n_test, seed=0)


# ------------------------------------------------------------------------------ shared crafted attacks
STEGASTAMP_ENCODER = {"bits": 8, "encoder_images": 3000, "encoder_epochs": 10}


@pytest.fixture(scope="session")
def stegastamp_prepared(effect_seed):
    """The stegastamp attack with a reduced encoder (``STEGASTAMP_ENCODER``: 8 bits in ~470 steps; the
    default 32 bits need ~2,500), prepared once per worker on the training images of
    ``real_subset(4000, ...)``: tests/test_attack_stegastamp.py checks its properties and
    tests/test_attacks_e2e.py implants it."""
    import torch

    from nadbench import AttackContext
    from nadbench.plugins.attacks.stegastamp import StegaStampResidual
    from nadbench.engine.registry import get_registry

    train, _ = real_subset(4000, 1)
    attack = StegaStampResidual(StegaStampResidual.Config(**STEGASTAMP_ENCODER))
    attack.prepare(AttackContext(dataset=get_registry().dataset("cifar10"), train=train,
                                 device=torch.device("cpu"), seed=effect_seed, progress=False))
    return attack


# ------------------------------------------------------------------------------ detection on the fixture
@pytest.fixture(scope="session")
def badnets_detection():
    """What the detectors' effect tests share (tests/test_detectors*.py): the committed BadNets model
    (``fixture_model("badnets")``) and the clean one, the BadNets poisoning those saw re-crafted from the
    fixture's seed (the poison stage's generator over the same 20,000 training images), and:

    - ``data``: a seeded 4,000 of those poisoned training rows, ``poisoned`` (bool) marking BadNets'
      rows among them, ``clean``: the defender's clean share, 200 clean training images: 5 % of the
      rows inspected, as a grid's share is of its training set (the engine mixes the share into what a
      data detector inspects, so a larger one would dilute the poison there: AC's verdict turns on it);
    - ``inputs``: 300 clean test images and 300 triggered ones (the ASR set: target-class images
      excluded), shuffled together, ``triggered`` (bool) marking them;
    - ``ctx``: the DetectionContext of a WRN-16-1 on CIFAR-10, seed 0, as the engine makes it."""
    import json
    import types

    import torch

    from nadbench.engine.poisoning import seeded
    from nadbench.engine.registry import get_registry
    from nadbench.engine.stages.detect import context
    from nadbench.training.subsets import clean_subset, limit

    registry = get_registry()
    spec = registry.dataset("cifar10")
    meta = json.loads((FIXTURES / "fixtures.json").read_text())["models"]["badnets-wrn16-1.safetensors"]
    attack = registry.attack("badnets")(registry.attack("badnets").Config(**json.loads(meta["attack.config"])))
    attack.num_classes = spec.num_classes
    full_train, full_test = spec.load(data_root())
    train, test = limit(full_train, FIXTURE_TRAIN_LIMIT, seed=0), limit(full_test, 2000, seed=0)
    poisoned, index = attack.poison_train(train, seeded(0, "poison"))
    truth = torch.zeros(len(train), dtype=torch.bool)
    truth[index] = True
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(3))[:4000].sort().values
    triggered = attack.trigger_test(test)
    g = torch.Generator().manual_seed(4)
    clean_in = test.images[torch.randperm(len(test), generator=g)[:300]]
    trig_in = triggered.images[torch.randperm(len(triggered), generator=g)[:300]]
    order = torch.randperm(600, generator=g)
    model = fixture_model("badnets")
    ctx = context(registry, spec, arch="wrn-16-1", seed=0, device=torch.device("cpu"),
                  log_metric=lambda *a, **k: None, log_figure=lambda figure, path: None, progress=False)
    return types.SimpleNamespace(
        model=model, clean_model=fixture_model("clean"), attack=attack, data=poisoned.subset(rows),
        poisoned=truth[rows], clean=clean_subset(train, 0.01, seed=0),
        inputs=torch.cat([clean_in, trig_in])[order], triggered=(torch.arange(600) >= 300)[order], ctx=ctx)
