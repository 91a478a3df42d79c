"""Built-in model plugins: each registered model builds, runs at 32x32 and has usable attention layers."""
import subprocess
import sys

import pluggy
import pytest
import torch

from nadbench import ModelSpec, hookspecs
from nadbench.plugins.models import preact_resnet, timm_bridge, wideresnet
from nadbench.plugins.models.wideresnet import WideResNet

MODULES = (wideresnet, preact_resnet, timm_bridge)


def collect_specs() -> dict[str, ModelSpec]:
    specs: list[ModelSpec] = []
    for module in MODULES:
        module.register_models(specs.append)
    return {spec.name: spec for spec in specs}


SPECS = collect_specs()
WRNS = [name for name in SPECS if name.startswith("wrn-")]


def attention_layers(spec: ModelSpec, model) -> tuple[str, ...]:
    """As the engine reads them: the built module's attribute wins over the spec."""
    return tuple(getattr(model, "attention_layers", spec.attention_layers))


def forward_with_features(model, layers, x):
    """Logits and the outputs of ``layers`` (captured with forward hooks, as NAD does)."""
    features = {}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, args, output, name=name: features.__setitem__(name, output)) for name in layers]
    try:
        with torch.no_grad():
            logits = model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits, features


def test_registered_names():
    assert set(SPECS) == {"wrn-16-1", "wrn-16-2", "wrn-40-1", "wrn-40-2", "wrn-10-2", "wrn-28-10",
                          "preact-resnet18", "timm/resnet18", "timm/mobilenetv3_small_100",
                          "timm/efficientnet_b0", "timm/convnext_atto"}


def test_hooks_register_through_pluggy():
    """The modules are valid plugins: their hook implementations match the specs."""
    pm = pluggy.PluginManager("nadbench")
    pm.add_hookspecs(hookspecs)
    for module in MODULES:
        pm.register(module)
    pm.check_pending()
    specs = []
    pm.hook.register_models(register=specs.append)
    assert sorted(spec.name for spec in specs) == sorted(SPECS)


def test_registration_does_not_import_timm():
    code = ("import sys; from nadbench.plugins.models import timm_bridge as t; "
            "t.register_models(lambda spec: None); assert 'timm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_builds_runs_and_attention_layers_have_extent(name):
    spec = SPECS[name]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for num_classes, model in ((10, spec.build(10)), (43, spec.build(num_classes=43))):
        layers = attention_layers(spec, model)
        assert layers and all(isinstance(layer, str) for layer in layers)
        logits, features = forward_with_features(model, layers, x)
        assert logits.shape == (2, num_classes)
        for layer in layers:
            feature = features[layer]
            assert feature.dim() == 4 and feature.shape[0] == 2, (layer, feature.shape)
            assert min(feature.shape[-2:]) >= 2, f"{name}: {layer} gives a {tuple(feature.shape)} map"


def test_wrn_16_1_parameter_count_matches_official():
    assert sum(p.numel() for p in SPECS["wrn-16-1"].build(10).parameters()) == 175_066


@pytest.mark.parametrize("name", WRNS)
def test_wrn_group_shapes(name):
    k = int(name.rsplit("-", 1)[1])
    spec = SPECS[name]
    assert spec.attention_layers == ("block1", "block2", "block3")
    model = spec.build(10)
    _, features = forward_with_features(model, spec.attention_layers, torch.randn(2, 3, 32, 32))
    assert [tuple(features[layer].shape) for layer in spec.attention_layers] == [
        (2, 16 * k, 32, 32), (2, 32 * k, 16, 16), (2, 64 * k, 8, 8)]


@pytest.mark.parametrize("depth", [4, 15, 17])
def test_wrn_invalid_depth(depth):
    with pytest.raises(ValueError, match=r"10, 16, 22, 28"):
        WideResNet(num_classes=10, depth=depth)


def test_timm_spec_helper():
    spec = timm_bridge.timm_spec("timm/mobilenetv3_small_100")
    assert spec.name == "timm/mobilenetv3_small_100" and spec.attention_layers == ()
    model = spec.build(5)
    # MobileNetV3's feature_info stages reduce by 2, 4, 8, 16, 32: at 32x32 the last one is 1x1.
    assert model.attention_layers == ("blocks.0", "blocks.1", "blocks.3")
    # At 16x16 only the stages reducing by <= 8 are left (bn1, blocks.0, blocks.1).
    assert timm_bridge.timm_spec("mobilenetv3_small_100", image_size=16).build(5).attention_layers == (
        "bn1", "blocks.0", "blocks.1")
    with pytest.raises(ValueError, match="smaller than 2x2"):
        timm_bridge.timm_spec("mobilenetv3_small_100", image_size=2).build(5)
