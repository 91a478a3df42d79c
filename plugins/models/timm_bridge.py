"""timm models as nadbench models, with attention layers chosen from timm's ``feature_info``.

The built-ins are a few small ImageNet architectures that build and run at 32x32 from random
initialisation (nadbench never downloads weights): ``timm/resnet18``,
``timm/mobilenetv3_small_100``, ``timm/efficientnet_b0`` and ``timm/convnext_atto``.

To expose any other timm model, register ``timm_spec`` from your own plugin::

    from nadbench import hookimpl
    from nadbench.plugins.models.timm_bridge import timm_spec

    @hookimpl
    def register_models(register):
        register(timm_spec("regnetx_002"))           # registered as "timm/regnetx_002"

Why the layers are not hard-coded: ImageNet networks shrink the image 32 times, so at 32x32 their
last stage is a 1x1 map, whose normalised attention map is 1 for every input (the NAD term is zero;
BackdoorBench's NAD on these models distils only that and becomes plain finetuning). timm
describes each stage in ``model.feature_info`` (module name, channels, reduction); the builder
keeps the stages whose maps are still at least 2x2 at the input size (reduction <= 16 at 32x32),
at most the last three, and stores them on the built module as ``attention_layers``, which
overrides the spec's (empty) list. For ``timm/resnet18`` that is ``layer1``, ``layer2``,
``layer3`` (8x8, 4x4, 2x2 maps at 32x32). The classifier layer (fine-pruning's) is the module
``get_classifier()`` returns.

This suits convolutional models whose stages output (B, C, H, W) maps (ResNets, RegNets,
EfficientNets, MobileNets, ConvNeXts, ...). Vision transformers and models with channels-last
stage outputs do not fit. A misspelled timm name fails when the model is built, not when it is
registered: registration stays cheap and does not import timm.
"""
from __future__ import annotations

from functools import partial

from nadbench import ModelSpec, hookimpl

CURATED = ("resnet18", "mobilenetv3_small_100", "efficientnet_b0", "convnext_atto")
MAX_LAYERS = 3  # as many as the WideResNet's groups
MIN_SIDE = 2  # a 1x1 map carries no spatial attention


def attention_layers_from_feature_info(model, image_size: int = 32) -> tuple[str, ...]:
    """The last (at most three) stages of a timm model whose output is at least 2x2 at ``image_size``."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"{type(model).__name__} has no feature_info: name its attention layers "
                         "in a ModelSpec of your own")
    usable = [stage["module"] for stage in info if image_size // stage["reduction"] >= MIN_SIDE]
    if not usable:
        raise ValueError(f"every stage of {type(model).__name__} is smaller than {MIN_SIDE}x{MIN_SIDE} "
                         f"at {image_size}x{image_size} inputs: no spatial attention to distil")
    layers = tuple(usable[-MAX_LAYERS:])
    for name in layers:
        model.get_submodule(name)  # fails loudly if feature_info names a module that is not there
    return layers


def classifier_from_timm(model) -> str:
    """The module name of a timm model's final linear layer (``get_classifier()``): ``fc`` for
    ResNets, ``classifier`` for EfficientNets and MobileNets, ``head.fc`` for ConvNeXts."""
    head = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is head)


def build_timm(num_classes: int, *, timm_name: str, image_size: int = 32):
    """Create a randomly initialised timm model and attach its ``attention_layers`` and ``classifier_layer``."""
    import timm  # imported here so that registering the specs does not load timm

    model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes)
    model.attention_layers = attention_layers_from_feature_info(model, image_size)
    model.classifier_layer = classifier_from_timm(model)
    return model


def timm_spec(name: str, image_size: int = 32, description: str = "") -> ModelSpec:
    """A ModelSpec named ``timm/<name>`` for the timm model ``name`` (a ``timm/`` prefix is accepted).

    ``image_size`` is the input side the attention layers are chosen for (32 for CIFAR-10/GTSRB).
    """
    timm_name = name.removeprefix("timm/")
    return ModelSpec(
        name=f"timm/{timm_name}",
        build=partial(build_timm, timm_name=timm_name, image_size=image_size),
        attention_layers=(),  # chosen per built model from feature_info, see the module docstring
        description=description or f"timm {timm_name}, random init; attention layers from feature_info",
    )


@hookimpl
def register_models(register):
    for name in CURATED:
        register(timm_spec(name))
