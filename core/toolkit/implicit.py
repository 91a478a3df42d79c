"""Hypergradients by implicit differentiation: the gradient of an outer objective through the
solution of an inner problem, without unrolling the inner solver (I-BAU's unlearning).

The inner solution w*(theta) is a fixed point of a map, w* = Phi(w*, theta) (e.g. a gradient step
on the inner loss). By the implicit function theorem the gradient of f(w*(theta), theta) is
``df/dtheta + (dPhi/dtheta)^T v`` with ``v = (I - dPhi/dw)^-T df/dw``, and ``v`` is approximated by
``K`` fixed-point iterations ``v <- (dPhi/dw)^T v + df/dw`` (Grazzi et al., ICML 2020, "On the
Iteration Complexity of Hypergradient Computation"; the I-BAU authors use the same method).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def _grads(output: Tensor, inputs: Sequence[Tensor], **kw) -> list[Tensor]:
    grads = torch.autograd.grad(output, inputs, allow_unused=True, **kw)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def fixed_point_hypergradient(inner: Sequence[Tensor], outer: Sequence[Tensor], steps: int,
                              fp_map: Callable[[list[Tensor], Sequence[Tensor]], list[Tensor]],
                              outer_loss: Callable[[list[Tensor], Sequence[Tensor]], Tensor]) -> list[Tensor]:
    """The gradient of ``outer_loss(w, theta)`` with respect to ``outer`` (theta, tensors that require
    grad) at the inner solution ``inner`` (w, taken as a fixed point of ``fp_map(w, theta)``), with
    ``steps`` fixed-point iterations for the inverse. Returns one tensor per element of ``outer``;
    nothing is written to ``.grad``."""
    w = [x.detach().requires_grad_(True) for x in inner]
    loss = outer_loss(w, outer)
    d_w = _grads(loss, w, retain_graph=True)
    d_theta = _grads(loss, outer)
    mapped = fp_map(w, outer)
    v = [torch.zeros_like(x) for x in w]
    for _ in range(steps):
        v = [a + b for a, b in zip(_grads(mapped, w, grad_outputs=v, retain_graph=True), d_w)]
    return [a + b for a, b in zip(_grads(mapped, outer, grad_outputs=v), d_theta)]
