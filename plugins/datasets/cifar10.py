"""CIFAR-10 as a dataset plugin: a template for your own (copy it, change the name and numbers).

``load(root)`` reads a local copy under ``root`` (ImageFolder tree or .tar.xz) or, without one,
downloads through torchvision; see :func:`nadbench.training.data.load_dataset`.
"""
from nadbench import DatasetSpec, hookimpl


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        name="cifar10",
        load=_load,
        num_classes=10,
        # The usual per-channel statistics of the CIFAR-10 training set.
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        description="CIFAR-10: 50,000 train / 10,000 test 32x32 colour images, 10 classes",
        # By label: torchvision's order, which is also the sorted order of the class folders.
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ))


def _load(root):
    from nadbench.training.data import load_dataset  # lazy import: keeps `bench --help` free of torch

    return load_dataset("cifar10", root)
