"""Training throughput of nadbench's real loop against a research-code loop, as ratios measured in
one run (machines are noisy: compare figures only within one results file).

    python benchmarks/speed.py                      # CPU, or the GPU when there is one
    python benchmarks/speed.py --e2e                # also the quick BadNets x {finetune, NAD} grid

Two phases, each on the same real CIFAR-10 images (``--images``, default the defender's 2,500):
  - backdoor: ``nadbench.training.train.train`` with plain cross-entropy, the quick profile's batch 128,
    crop + flip, one-cycle SGD;
  - nad: the NAD defense's student phase as ``bench run`` runs it (``NAD.defend``: its own
    ``loss_fn``, teacher forward and three attention terms, batch 64, crop + flip + cutout),
    with its real teacher;
against a reference loop written the way published research code is (the NAD authors' code
among it): a torchvision ``Dataset`` of PIL images with per-image transforms, ``DataLoader`` with
``num_workers=0``, ``loss.item()`` every step; the same network, optimiser, batch size and threads.
Our loop runs one epoch more than it is timed over: the first (kernel choices, and compilation
for the ``compile`` variant) is left out. Ours and the reference alternate, ``--reps`` times; medians and ratios go to
benchmarks/results/speed-<device>.json and .md. Variants of our loop (precision, memory format,
torch.compile) show what each setting buys on this device.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

import nadbench.training.train as trainmod
from nadbench import DefenseContext, settings
from nadbench.training.attention import layer_names, tap
from nadbench.training.data import limit
from nadbench.engine import PROFILES, attention_layers
from nadbench.training.models import build
from nadbench.engine.registry import get_registry
from nadbench.training.train import Optim, train

HERE = Path(__file__).resolve().parent
ARCH = "wrn-16-1"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def variant(precision: str, channels_last: bool | None = None, compiled: bool = False):
    """Our loop under one setting: precision and compile as the run settings the CLI makes; the memory
    format (for every phase, NAD's too) switched by patching the loop's own decision."""
    run = settings.RunSettings(precision=precision, compile=compiled)
    with settings.use(run), contextlib.ExitStack() as stack:
        if channels_last is not None:
            stack.enter_context(mock.patch.object(trainmod, "channels_last", lambda device, plain=True: channels_last))
        yield


# -- ours: the real loop ---------------------------------------------------------------------------
def backdoor_ours(spec, ds, data, device, epochs) -> float:
    prof = PROFILES["quick"]
    opt = Optim(epochs=epochs + 1, lr=prof.lr, batch_size=prof.batch_size, weight_decay=prof.weight_decay,
                schedule="onecycle", crop=prof.crop, flip=prof.flip)
    stamps = []

    def on_epoch(epoch, loss):
        _sync(device)
        stamps.append(time.perf_counter())

    train(build(spec, ds, device), data, opt, seed=0, progress=False, on_epoch=on_epoch)
    return epochs * len(data) / (stamps[-1] - stamps[0])


def nad_ours(spec, ds, data, device, epochs) -> float:
    nad = get_registry().defense("nad").from_overrides({"epochs": str(epochs + 1), "teacher_epochs": "1"})
    stamps = []

    def log(key, value, step=None):
        if key == "defense.loss":  # logged after each student epoch
            _sync(device)
            stamps.append(time.perf_counter())

    layers = attention_layers(get_registry(), ARCH, "cifar10")
    ctx = DefenseContext(device=device, num_classes=ds.num_classes, student=ARCH, teacher=ARCH, seed=0,
                         student_layers=layers, teacher_layers=layers,
                         build_model=lambda arch: build(spec, ds, device),
                         supplied_model=lambda arch: build(spec, ds, device), log_metric=log, progress=False)
    nad.defend(build(spec, ds, device), data, ctx)
    return epochs * len(data) / (stamps[-1] - stamps[0])


# -- the reference: how research code is usually written ---------------------------------------------
class Cutout:
    """The NAD authors' cutout: one square hole per image, on the normalised tensor."""

    def __init__(self, length):
        self.length = length

    def __call__(self, img):
        h, w = img.shape[1:]
        mask = np.ones((h, w), np.float32)
        y, x = np.random.randint(h), np.random.randint(w)
        lo = self.length // 2
        mask[max(0, y - lo):min(h, y - lo + self.length), max(0, x - lo):min(w, x - lo + self.length)] = 0
        return img * torch.from_numpy(mask)[None]


def _loader(ds, data, batch_size, cutout):
    import torchvision.transforms as T
    from PIL import Image

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(ds.mean, ds.std)]
    tf = T.Compose(steps + ([Cutout(cutout)] if cutout else []))
    images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in data.images.cpu()]
    labels = data.labels.cpu().tolist()

    class PILDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return tf(images[i]), labels[i]

    return torch.utils.data.DataLoader(PILDataset(), batch_size=batch_size, shuffle=True, num_workers=0)


def _at(fm, p=2.0, eps=1e-6):
    am = fm.abs().pow(p).mean(dim=1, keepdim=True)
    return am / (am.norm(dim=(2, 3), keepdim=True) + eps)


def reference(spec, ds, data, device, epochs, nad: bool) -> float:
    """One loop for both phases, as the published code has (the NAD phase adds the teacher)."""
    prof = PROFILES["quick"]
    net = build(spec, ds, device).net  # the loader normalises
    loader = _loader(ds, data, 64 if nad else prof.batch_size, 3 if nad else 0)
    opt = torch.optim.SGD(net.parameters(), lr=0.01 if nad else prof.lr, momentum=0.9, nesterov=True,
                          weight_decay=1e-4 if nad else prof.weight_decay)
    layers = layer_names(net, spec.attention_layers)
    teacher = build(spec, ds, device).net.eval() if nad else None
    net.train()
    _sync(device)
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if nad:
                with torch.no_grad(), tap(teacher, layers) as tf:
                    teacher(x)
                with tap(net, layers) as sf:
                    out = net(x)
                loss = F.cross_entropy(out, y) + sum(b * F.mse_loss(_at(s), _at(t))
                                                     for b, s, t in zip((500, 1000, 1000), sf, tf))
            else:
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()  # the per-step logging every such loop has
    _sync(device)
    return epochs * len(data) / (time.perf_counter() - start)


def e2e(device: torch.device, data_root: str | None) -> dict:
    """Wall time of the quick BadNets x {finetune, NAD} grid from an empty cache and store."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "nadbench.commands.cli", "run", "--attacks", "badnets", "--defenses", "finetune,nad",
               "--profile", "quick", "--device", device.type, "--tracking-uri", f"sqlite:///{tmp}/e2e.db",
               "--no-progress"]
        env = dict(os.environ, NADBENCH_CACHE=f"{tmp}/cache")
        if data_root:
            env["NADBENCH_DATA_ROOT"] = data_root
        start = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, cwd=tmp)
        return {"command": "bench run --attacks badnets --defenses finetune,nad --profile quick "
                           "(empty cache and store)", "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=2500)
    parser.add_argument("--epochs", type=int, default=None, help="epochs per timing (default: 1 CPU, 4 GPU)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--variants", default=None, help="comma-separated subset of our loop's variants")
    parser.add_argument("--e2e", action="store_true", help="also time the quick BadNets grid end to end")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    epochs = args.epochs or (4 if device.type == "cuda" else 1)
    registry = get_registry()
    ds, spec = registry.dataset("cifar10"), registry.model(ARCH)
    train_set, _ = ds.load(os.environ.get("NADBENCH_DATA_ROOT"))
    data = limit(train_set, args.images, seed=0).to(device)
    torch.set_flush_denormal(True)

    cpu_bf16 = trainmod.native_bf16_cpu()
    if device.type == "cuda":
        variants = {"default": {"precision": "auto"},
                    "bf16": {"precision": "bf16"},
                    "bf16-channels-last": {"precision": "bf16", "channels_last": True},
                    "compile": {"precision": "auto", "compiled": True}}
    else:
        variants = {"default": {"precision": "auto"},
                    "nchw": {"precision": "auto", "channels_last": False},
                    "channels-last-all": {"precision": "auto", "channels_last": True},
                    "bf16": {"precision": "bf16"}}
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    phases = {"backdoor": (backdoor_ours, False), "nad": (nad_ours, True)}
    runs: dict[str, dict[str, list[float]]] = {p: {} for p in phases}
    errors: dict[str, str] = {}
    with variant("auto"):  # warm-up: kernels, allocator, cudnn's choices
        backdoor_ours(spec, ds, data, device, 1)
    for rep in range(args.reps):
        for phase, (ours, nad) in phases.items():
            for name, v in variants.items():
                if f"{phase}/{name}" in errors or (name == "compile" and phase == "nad"):
                    continue  # compile applies to the cross-entropy phases only
                if name == "bf16" and not cpu_bf16 and rep > 0:
                    continue  # emulated bf16: one repetition shows it
                try:
                    with variant(**v):
                        runs[phase].setdefault(name, []).append(ours(spec, ds, data, device, epochs))
                except Exception as exc:  # e.g. torch.compile without a working compiler: say so, go on
                    errors[f"{phase}/{name}"] = f"{type(exc).__name__}: {exc}"[:500]
                    runs[phase].pop(name, None)
            runs[phase].setdefault("reference", []).append(reference(spec, ds, data, device, epochs, nad))
            print(phase, rep, {k: round(v[-1]) for k, v in runs[phase].items()}, flush=True)

    med = {p: {k: round(statistics.median(v)) for k, v in r.items()} for p, r in runs.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    result = {
        "command": "python benchmarks/speed.py " + shlex.join(sys.argv[1:]),
        "device": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu_native_bf16": cpu_bf16, "images": len(data), "epochs_per_timing": epochs, "reps": args.reps,
        "default_numerics": trainmod.numerics(settings.RunSettings(), device),
        "img_per_s_median": med, "img_per_s_all": {p: {k: [round(x) for x in v] for k, v in r.items()}
                                                  for p, r in runs.items()},
        "ratio_over_reference": {p: {k: round(v / m["reference"], 2) for k, v in m.items() if k != "reference"}
                                 for p, m in med.items()}, "errors": errors}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"speed-{device.type}"
    for final in (False, True):  # written before the end-to-end run too, which may fail or be cut short
        if final and args.e2e:
            try:
                result["e2e"] = e2e(device, os.environ.get("NADBENCH_DATA_ROOT"))
            except subprocess.CalledProcessError as exc:
                result["errors"]["e2e"] = str(exc)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        stem.with_suffix(".md").write_text(render(result))
    print(render(result))


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def render(r: dict) -> str:
    lines = [f"# Training speed on {r['device']}", "", f"Command: `{r['command']}`  ",
             f"torch {r['torch']}, {r['threads']} threads, CPU native bf16: {r['cpu_native_bf16']}; "
             f"{r['images']} real CIFAR-10 images, {r['epochs_per_timing']} epoch(s) per timing, "
             f"{r['reps']} alternating repetitions; default numerics here: `{r['default_numerics']}`.", "",
             "Images/s (median) and the ratio over the reference loop (PIL Dataset + DataLoader, "
             "num_workers=0):", "", "| phase | variant | img/s | × reference |", "| --- | --- | --- | --- |"]
    for phase, m in r["img_per_s_median"].items():
        for k, v in m.items():
            ratio = r["ratio_over_reference"][phase].get(k)
            lines.append(f"| {phase} | {k} | {v} | {'' if ratio is None else ratio} |")
    if r.get("note"):
        lines += ["", r["note"]]
    for k, e in r.get("errors", {}).items():
        lines.append(f"\n{k} failed: {e}")
    if "e2e" in r:
        lines += ["", f"End to end: `{r['e2e']['command']}`: {r['e2e']['wall_s']} s"]
    if "e2e_baseline" in r:  # the same grid under earlier code, run by hand back to back
        b = r["e2e_baseline"]
        lines += [f"The same grid under {b['code']}: {b['wall_s']} s ({b['wall_s'] / r['e2e']['wall_s']:.2f}x as long). {b['how']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
