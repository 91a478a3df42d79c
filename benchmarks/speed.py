"""Training-throughput benchmark, reported as ratios measured in one run (machines are noisy).

    python benchmarks/speed.py --device cpu

Measures images/s of one WRN-16-1 training step (batch 64, crop + flip + cutout) fed by
  1. nadbench's path: uint8 data resident on the device, batched augmentation on the device;
  2. the usual research-code path: a torchvision Dataset of PIL images with per-image transforms
     and a DataLoader (the counter-example in STYLE.md);
and the cost of a NAD step (teacher forward + three attention losses) relative to a plain step.
Writes benchmarks/results/speed-<device>.json and .md.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nadbench import DatasetSpec, Split
from nadbench.attention import layer_names, nad_loss, tap
from nadbench.augment import augment, to_float
from nadbench.models import build
from nadbench.registry import get_registry

HERE = Path(__file__).resolve().parent
SPEC = DatasetSpec("cifar-shaped", None, 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def _step_fn(model, device, nad_teacher=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    layers = layer_names(model, get_registry().model("wrn-16-1").attention_layers)

    def step(x, y):
        if nad_teacher is None:
            loss = F.cross_entropy(model(x), y)
        else:
            with torch.no_grad(), tap(nad_teacher, layers) as tf:
                nad_teacher(x)
            with tap(model, layers) as sf:
                logits = model(x)
            loss = F.cross_entropy(logits, y) + sum(b * nad_loss(t, s) for b, t, s in zip((500, 1000, 1000), tf, sf))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _time(fn, batches: int, batch_size: int, device) -> float:
    fn(0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(1, batches + 1):
        fn(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    device, bs, n = torch.device(args.device), args.batch_size, args.batches
    torch.set_flush_denormal(True)
    g = torch.Generator().manual_seed(0)
    data = Split(torch.randint(0, 256, ((n + 1) * bs, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, ((n + 1) * bs,), generator=g))
    spec = get_registry().model("wrn-16-1")

    # 1. nadbench: device-resident uint8, batched augmentation
    on_dev = data.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    step = _step_fn(build(spec, SPEC, device), device)
    ours = _time(lambda i: step(augment(to_float(on_dev.images[i * bs:(i + 1) * bs]), gen, 4, True, 3),
                                on_dev.labels[i * bs:(i + 1) * bs]), n, bs, device)

    # 2. per-image PIL transforms through a DataLoader
    import torchvision.transforms as T
    from PIL import Image

    class PILDataset(torch.utils.data.Dataset):
        tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(SPEC.mean, SPEC.std)])

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return self.tf(Image.fromarray(data.images[i].permute(1, 2, 0).numpy())), data.labels[i]

    loader = iter(torch.utils.data.DataLoader(PILDataset(), batch_size=bs, shuffle=True, num_workers=2,
                                              persistent_workers=True))
    model_b = build(spec, SPEC, device)
    step_b = _step_fn(model_b.net, device)  # the loader normalises already

    def baseline(i):
        x, y = next(loader)
        step_b(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
    base = _time(baseline, n - 1, bs, device)

    # 3. NAD step vs plain step, same data path
    teacher = build(spec, SPEC, device).eval().requires_grad_(False)
    step_nad = _step_fn(build(spec, SPEC, device), device, nad_teacher=teacher)
    nad = _time(lambda i: step_nad(augment(to_float(on_dev.images[i * bs:(i + 1) * bs]), gen, 4, True, 3),
                                   on_dev.labels[i * bs:(i + 1) * bs]), n, bs, device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    result = {"command": f"python benchmarks/speed.py --device {args.device} --batches {n} --batch-size {bs}",
              "device": name, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "img_per_s": {"nadbench": round(ours), "pil_dataloader": round(base), "nad_step": round(nad)},
              "ratio_nadbench_over_pil_dataloader": round(ours / base, 2),
              "ratio_nad_step_over_plain_step": round(nad / ours, 2)}
    out = HERE / "results" / f"speed-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
