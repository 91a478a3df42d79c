"""How a run computes is a value (nadbench.training.settings.RunSettings), never written into the environment."""
import ast
from pathlib import Path

import torch

CORE = Path(__file__).resolve().parents[1] / "core"


def _environment_writes(tree: ast.AST) -> list[str]:
    """Each write to ``os.environ`` in a module: item assignment, or a mutating method call."""
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else []
        for target in targets:
            for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(t, ast.Subscript) and ast.unparse(t.value).endswith("environ"):
                    found.append(ast.unparse(t))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner, method = ast.unparse(node.func.value), node.func.attr
            if (owner.endswith("environ") and method in ("update", "setdefault", "pop", "clear", "popitem")) \
                    or method == "putenv":
                found.append(ast.unparse(node)[:80])
    return found


def test_core_writes_the_environment_only_in_one_module_and_never_its_own_settings():
    from nadbench.engine import environment

    writers = {}
    for file in sorted(CORE.rglob("*.py")):
        writes = _environment_writes(ast.parse(file.read_text()))
        if writes:
            writers[file.relative_to(CORE).as_posix()] = writes
    assert list(writers) == ["engine/environment.py"], writers
    assert environment.WRITES == ("CUDA_VISIBLE_DEVICES", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                  "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
                                  "MLFLOW_ALLOW_FILE_STORE")
    written = " ".join(writers["engine/environment.py"])
    assert all(name in written for name in environment.WRITES) and "NADBENCH" not in written


def test_a_runner_computes_under_its_own_settings_whatever_the_process_default(toy_registry, tmp_path,
                                                                              monkeypatch):
    """The settings a Runner was made with are in force in its stages (the loop reads them there), and
    its train keys hold their numerics; the process default is untouched outside."""
    import nadbench.engine.stages.train as train_stage
    from nadbench.training import settings
    from nadbench.engine import Cell, Runner
    from nadbench.engine.grid import profile

    seen = []
    real = train_stage.train
    monkeypatch.setattr(train_stage, "train", lambda *a, **kw: seen.append(settings.current()) or real(*a, **kw))
    reg, prof = toy_registry(), profile("quick", {"epochs": "1", "batch_size": "32", "crop": "0"})
    cell = Cell("toy", "badnets", "finetune", "wrn-16-1", "wrn-16-1", 0)
    own = settings.RunSettings(precision="bf16", threads=torch.get_num_threads())
    runner = Runner(reg, prof, settings=own, progress=False, cache_dir=tmp_path)
    default = Runner(reg, prof, device=torch.device("cpu"), progress=False, cache_dir=tmp_path)
    assert settings.current().precision == "float32"  # the suite's default
    assert runner.settings == own.replace(device="cpu") and default.settings.precision == "float32"
    runner.backdoored(cell)
    assert [s.precision for s in seen] == ["bf16"]
    assert "bf16" in runner.keys.numerics and "float32" in default.keys.numerics
    assert runner.plan(cell).student != default.plan(cell).student
    assert settings.current().precision == "float32"


def test_workers_get_the_drivers_settings_and_plugin_filter_as_values(toy_registry, tmp_path):
    from nadbench.engine import executors
    from nadbench.training import settings
    from nadbench.engine import Runner
    from nadbench.engine.grid import profile

    reg = toy_registry()
    reg.disabled = {"some-plugin"}
    runner = Runner(reg, profile("quick"), settings=settings.RunSettings(precision="bf16", fused=True),
                    progress=False, cache_dir=tmp_path)
    spec = executors.spec_of(runner, threads=3)
    assert spec.settings == settings.RunSettings(device="cpu", precision="bf16", fused=True, threads=3)
    assert spec.disabled == ("some-plugin",)

