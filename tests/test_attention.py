"""Attention maps and the NAD loss against the paper's formulas."""
import pytest
import torch

from nadbench.training.attention import attention_map, check_spatial, nad_loss, normalized_attention, tap
from nadbench.engine.registry import get_registry


def test_attention_functions_match_the_paper():
    f = torch.randn(2, 5, 4, 3)
    assert torch.allclose(attention_map(f, "mean_p", 2), (f.abs() ** 2).sum(1) / 5)
    assert torch.allclose(attention_map(f, "sum_p", 3), (f.abs() ** 3).sum(1))
    assert torch.allclose(attention_map(f, "sum"), f.abs().sum(1))
    assert attention_map(f).shape == (2, 4, 3)
    with pytest.raises(ValueError, match="valid: mean_p, sum_p, sum"):
        attention_map(f, "max")


def test_normalisation_and_loss_forms():
    ft, fs = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4)
    a_t = (ft ** 2).mean(1).flatten(1)
    a_s = (fs ** 2).mean(1).flatten(1)
    q_t = a_t / a_t.norm(dim=1, keepdim=True)
    q_s = a_s / a_s.norm(dim=1, keepdim=True)
    assert torch.allclose(normalized_attention(ft).norm(dim=1), torch.ones(3), atol=1e-5)
    # paper: || Q_T - Q_S ||_2, averaged over the batch
    assert torch.allclose(nad_loss(ft, fs, reduction="l2"), (q_t - q_s).norm(dim=1).mean(), atol=1e-5)
    # official code: mean squared difference
    assert torch.allclose(nad_loss(ft, fs, reduction="mse"), ((q_t - q_s) ** 2).mean(), atol=1e-6)
    assert nad_loss(ft, ft).item() == pytest.approx(0.0, abs=1e-10)
    # mean_p and sum_p coincide after normalisation; sum (p = 1) does not
    assert torch.allclose(nad_loss(ft, fs, "mean_p"), nad_loss(ft, fs, "sum_p"), atol=1e-6)
    assert not torch.allclose(nad_loss(ft, fs, "mean_p"), nad_loss(ft, fs, "sum"))


def test_loss_has_a_gradient_for_the_student_only():
    """An early official release detached the loss (no distillation at all): guard against that."""
    ft = torch.randn(2, 4, 4, 4, requires_grad=True)
    fs = torch.randn(2, 4, 4, 4, requires_grad=True)
    nad_loss(ft, fs).backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert ft.grad is None


def test_nad_loss_moves_a_student_network():
    spec = get_registry().model("wrn-16-1")
    torch.manual_seed(0)
    teacher, student = spec.build(num_classes=10), spec.build(num_classes=10)
    x = torch.rand(4, 3, 32, 32)
    with tap(teacher, spec.attention_layers) as t_feats, torch.no_grad():
        teacher(x)
    with tap(student, spec.attention_layers) as s_feats:
        student(x)
    assert [f.shape[-1] for f in s_feats] == [32, 16, 8]
    sum(nad_loss(t, s) for t, s in zip(t_feats, s_feats)).backward()
    assert student.block1.layer[0].conv1.weight.grad.abs().sum() > 0


def test_one_by_one_maps_are_refused():
    check_spatial([torch.zeros(2, 3, 2, 2)], ["ok"])
    with pytest.raises(ValueError, match="pool have 1x1 feature maps"):
        check_spatial([torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 1, 1)], ["ok", "pool"])
