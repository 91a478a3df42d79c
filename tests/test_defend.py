"""`bench attack` and `bench defend`: a round trip on real data measured from the files alone, and
one-line refusals (exit code 2) of everything a practitioner might hand over by mistake."""
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nadbench.handover import load_image_folder, load_model, save_image_folder
from nadbench.models import build, save_weights
from nadbench.registry import get_registry
from nadbench import Split

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = os.environ.get("NADBENCH_DATA_ROOT")


def _bench(*args, cwd, **kw):
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    return subprocess.run([sys.executable, "-m", "nadbench.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=1800, env=env, **kw)


def _one_line_error(out, *needles):
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stdout + out.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def tiny(tmp_path):
    """A tiny clean ImageFolder (10 classes) and a wrn-16-1 model file with nadbench's wrapper."""
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(20) % 10)
    save_image_folder(split, tmp_path / "clean")
    reg = get_registry()
    model = build(reg.model("wrn-16-1"), reg.dataset("cifar10"))
    save_weights(model, tmp_path / "model.safetensors")
    return tmp_path


def test_a_pickle_is_refused_and_its_code_never_runs(tiny):
    marker = tiny / "PWNED"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps({"net.conv1.weight": Evil()})
    for name in ("evil.pt", "evil.pth", "evil.ckpt", "evil.bin", "disguised.safetensors"):
        (tiny / name).write_bytes(payload)
        out = _bench("defend", name, "--arch", "wrn-16-1", "--clean", "clean", cwd=tiny)
        _one_line_error(out, name, "refused")
        assert "pickle" in out.stderr and "safetensors" in out.stderr
    torch.save({"w": torch.zeros(2)}, tiny / "zipped.safetensors")  # torch.save's zip format, renamed
    _one_line_error(_bench("defend", "zipped.safetensors", "--arch", "wrn-16-1", "--clean", "clean", cwd=tiny),
                    "pickle or zip")
    assert not marker.exists()


def test_broken_files_and_mismatches_are_one_line_errors(tiny):
    good = (tiny / "model.safetensors").read_bytes()
    (tiny / "truncated.safetensors").write_bytes(good[:len(good) // 2])
    (tiny / "huge-header.safetensors").write_bytes((10 ** 15).to_bytes(8, "little") + b"{}")
    (tiny / "garbage.safetensors").write_bytes((20).to_bytes(8, "little") + b"this is not json....")
    for name, needle in (("truncated.safetensors", "truncated"), ("huge-header.safetensors", "header"),
                         ("garbage.safetensors", "malformed")):
        _one_line_error(_bench("defend", name, "--arch", "wrn-16-1", "--clean", "clean", cwd=tiny), name, needle)
    _one_line_error(_bench("defend", "model.safetensors", "--arch", "wrn-16-2", "--clean", "clean", cwd=tiny),
                    "does not fit architecture 'wrn-16-2'", "wrong shape")
    reg = get_registry()
    save_weights(build(reg.model("wrn-16-1"), reg.dataset("gtsrb")), tiny / "gtsrb.safetensors")
    _one_line_error(_bench("defend", "gtsrb.safetensors", "--arch", "wrn-16-1", "--clean", "clean", cwd=tiny),
                    "has 43 output classes but the data has 10")
    (tiny / "notimages" / "a").mkdir(parents=True)
    (tiny / "notimages" / "a" / "readme.txt").write_text("hello")
    _one_line_error(_bench("defend", "model.safetensors", "--arch", "wrn-16-1", "--clean", "notimages", cwd=tiny),
                    "no images found")
    # normalisation: a bare state dict needs it; flags may not contradict the file's own
    bare = {k[4:]: v for k, v in build(reg.model("wrn-16-1"), reg.dataset("cifar10")).state_dict().items()
            if k.startswith("net.")}
    save_file(bare, str(tiny / "bare.safetensors"))
    _one_line_error(_bench("defend", "bare.safetensors", "--arch", "wrn-16-1", "--clean", "clean", cwd=tiny),
                    "bare state dict", "--mean/--std")
    _one_line_error(_bench("defend", "model.safetensors", "--arch", "wrn-16-1", "--clean", "clean",
                           "--mean", "0,0,0", "--std", "1,1,1", cwd=tiny), "contradicts")


def test_model_files_load_with_or_without_the_wrapper(tiny):
    reg = get_registry()
    spec = reg.model("wrn-16-1")
    wrapped = load_model(tiny / "model.safetensors", spec, 10)
    bare = {k[4:]: v for k, v in wrapped.state_dict().items() if k.startswith("net.")}
    save_file(bare, str(tiny / "bare.safetensors"))
    loaded = load_model(tiny / "bare.safetensors", spec, 10, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert torch.equal(loaded.mean, torch.zeros(1, 3, 1, 1))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in wrapped.state_dict().items()
               if k not in ("mean", "std"))
    split, classes, resized = load_image_folder(tiny / "clean")
    assert len(split) == 20 and resized == 0 and classes == [str(i) for i in range(10)]


def _readme_commands() -> list[str]:
    """The commands of the README's 'Clean a model you were given' section, as written."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Clean a model you were given", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#")[0].strip() for line in block.replace("\\\n", " ").splitlines()
            if line.strip().startswith("bench ")]


@pytest.mark.slow
@pytest.mark.skipif(not DATA_ROOT or not Path(DATA_ROOT).is_dir(), reason="NADBENCH_DATA_ROOT is not set")
def test_readme_round_trip_removes_the_backdoor(tmp_path):
    commands = _readme_commands()
    assert [c.split()[1] for c in commands] == ["attack", "defend"]
    for command in commands:
        out = _bench(*shlex.split(command)[1:], "--no-progress", cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        print(out.stdout)
    # measured from the files alone, the way a user would
    reg = get_registry()
    spec = reg.model("wrn-16-1")
    before = load_model(tmp_path / "backdoored.safetensors", spec, 10).eval()
    after = load_model(tmp_path / "repaired.safetensors", spec, 10).eval()
    triggered, _, _ = load_image_folder(tmp_path / "triggered")
    _, test = reg.dataset("cifar10").load(DATA_ROOT)
    test = test.subset(torch.arange(0, len(test), 10))
    from nadbench.train import accuracy, attack_success_rate

    asr = [attack_success_rate(m, triggered, 5) for m in (before, after)]
    acc = [accuracy(m, test) for m in (before, after)]
    print(f"ASR {asr}, ACC {acc}")
    assert asr[0] >= 0.9 and asr[1] <= asr[0] / 2, asr      # most of the backdoor is gone
    assert acc[1] >= acc[0] - 0.10, acc                    # within 10 points of ACC
    assert (tmp_path / "repaired.report.json").exists() and (tmp_path / "repaired.attention.png").exists()
