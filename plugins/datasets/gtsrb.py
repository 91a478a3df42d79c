"""GTSRB (German Traffic Sign Recognition Benchmark) as a dataset plugin; the NAD paper uses it for
the Refool attack. Images come in many sizes; every whole frame is resized to 32x32."""
from nadbench import DatasetSpec, hookimpl


@hookimpl
def register_datasets(register):
    register(DatasetSpec(
        name="gtsrb",
        load=_load,
        num_classes=43,
        # Computed once from the 39,209 training images of the project's 32x32 offline copy
        # (shared/data/gtsrb-32px-jpeg.tar.xz); no widely quoted figures exist for GTSRB.
        mean=(0.3386, 0.3115, 0.3202),
        std=(0.2729, 0.2628, 0.2658),
        description="GTSRB: 39,209 train / 12,630 test traffic signs resized to 32x32, 43 classes",
    ))


def _load(root):
    from nadbench.training.data import load_dataset  # lazy import: keeps `bench --help` free of torch

    return load_dataset("gtsrb", root)
