"""Attacks that control training, end to end on real CIFAR-10 images.

A third-party attack that learns its trigger with the model (tests/packages/nadbench-learnedpatch,
pip-installed as a user would) runs in a `bench run` grid under ``--workers 2``, and its trigger works
again from the cache: `bench attack` on the same settings reuses the stored model together with
what the attack learnt, and writes triggered images that carry the learnt patch. Before the engine
stored an attack's learnt state with its model, the cached model came back with no trigger at all.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import own_stage_cache

from nadbench.commands.userfiles import load_image_folder

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = os.environ.get("NADBENCH_DATA_ROOT")
# 1,000 images x 4 epochs of WRN-16-1 without augmentation: a 5 x 5 learnt patch on 20 % of them
# implants (seeds 0/1/2 in float32 on a Xeon with AMX: ASR 0.97 / 0.72 / 0.97; a trigger the model
# does not learn stays near chance).
SETS = ["--set", "profile.train_limit=1000", "--set", "profile.test_limit=300", "--set", "profile.epochs=4",
        "--set", "profile.lr=0.1", "--set", "profile.crop=0", "--set", "profile.flip=false",
        "--set", "learned-patch.poison_rate=0.2"]


def _bench(*args, cwd, site):
    env = {**os.environ, "MLFLOW_TRACKING_URI": "", "NADBENCH_CACHE": str(own_stage_cache(cwd / "cache")), "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-m", "nadbench.commands.cli", *args, "--no-progress"], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.skipif(not DATA_ROOT or not Path(DATA_ROOT).is_dir(), reason="NADBENCH_DATA_ROOT is not set")
def test_a_learnt_trigger_runs_with_workers_and_comes_back_from_the_cache(tmp_path, fresh_store, effect_seed, record):
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--target",
                          str(site), str(ROOT / "tests" / "packages" / "nadbench-learnedpatch")],
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    fresh_store(tmp_path)
    _bench("run", "--attacks", "learned-patch", "--defenses", "finetune,fine-pruning", "--workers", "2",
           "--set", "finetune.epochs=1", "--set", "fine-pruning.epochs=1", "--set", "profile.clean_share=0.05",
           "--seeds", str(effect_seed), *SETS, "--output", "results.json", cwd=tmp_path, site=site)
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert len(results) == 2 and results[0]["before"] == results[1]["before"]  # one model, trained once
    # with workers the model is a stage of its own, trained before the cells, which both reuse it
    assert all(r["backdoor_cache_hit"] for r in results)
    before = results[0]["before"]
    record(asr=before["asr"])
    assert before["asr"] >= 0.5, before

    out = _bench("attack", "--attack", "learned-patch", "--seed", str(effect_seed), *SETS, "--output", "model.safetensors",
                 "--triggered-output", "triggered", cwd=tmp_path, site=site)
    print(out)
    assert "(from the cache)" in out and f"ASR {100 * before['asr']:.2f}" in out, out
    triggered, _, _ = load_image_folder(tmp_path / "triggered")
    images, labels = triggered.images, triggered.labels
    corner = images[:, :, -5:, -5:]
    assert len(images) == int((labels != 0).sum()) and (corner == corner[:1]).all()  # one patch on every image
    assert (corner.float() - 128).abs().max() > 8  # the learnt colours, not the grey it started from
