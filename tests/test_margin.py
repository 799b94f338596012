"""Margin functions: values against the angle formulas, exact gradients, gradcheck near pi - m."""
import math

import pytest
import torch

from largefr.config import HeadConfig
from largefr.heads.margins import combined_form, margin_logits, target_logit

CONFIGS = {
    "arcface": HeadConfig(type="arcface", scale=64.0, margin=0.5),
    "cosface": HeadConfig(type="cosface", scale=64.0, margin=0.35),
    "combined": HeadConfig(type="combined", scale=32.0, combined_margins=(1.0, 0.3, 0.2)),
    "combined_m1": HeadConfig(type="combined", scale=30.0, combined_margins=(1.2, 0.4, 0.1)),
}


def reference_psi(cos: torch.Tensor, m1: float, m2: torch.Tensor, m3: torch.Tensor) -> torch.Tensor:
    """Plain angle form: cos(m1*theta + m2) - m3, tangent fallback past theta* = (pi - m2)/m1."""
    theta = torch.acos(cos)
    switch = torch.clamp((math.pi - m2) / m1, max=math.pi)
    inside = torch.cos(m1 * theta + m2) - m3
    fallback = cos - (math.pi - switch) * torch.sin(switch) - m3
    return torch.where(m1 * theta + m2 <= math.pi, inside, fallback)


def grid(n: int = 401) -> torch.Tensor:
    return torch.linspace(-0.999, 0.999, n, dtype=torch.float64)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_values_match_angle_formula_with_row_lambda(name):
    cfg = CONFIGS[name]
    cos = grid()
    row_lambda = torch.rand(cos.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m1, m2, m3 = combined_form(cfg)
    expected = cfg.scale * reference_psi(cos, m1, row_lambda * m2, row_lambda * m3)
    torch.testing.assert_close(target_logit(cos, cfg, row_lambda), expected, atol=1e-10, rtol=0)
    expected_plain = cfg.scale * reference_psi(cos, m1, torch.full_like(cos, m2), torch.full_like(cos, m3))
    torch.testing.assert_close(target_logit(cos, cfg), expected_plain, atol=1e-10, rtol=0)


def test_arcface_is_insightface_th_mm_form():
    cfg = CONFIGS["arcface"]
    m = cfg.margin
    cos = torch.tensor([0.3, -0.5, math.cos(math.pi - m) + 1e-4, math.cos(math.pi - m) - 1e-4, -0.99],
                       dtype=torch.float64)
    theta = torch.acos(cos)
    expected = torch.where(theta + m < math.pi, torch.cos(theta + m), cos - m * math.sin(m)) * cfg.scale
    torch.testing.assert_close(target_logit(cos, cfg), expected, atol=1e-12, rtol=0)
    assert bool((theta[3:] + m > math.pi).all()), "the last points must exercise the fallback"


def test_cosface_and_lambda_zero_are_plain():
    cos = grid()
    torch.testing.assert_close(target_logit(cos, CONFIGS["cosface"]), 64.0 * (cos - 0.35), atol=1e-12, rtol=0)
    for cfg in CONFIGS.values():
        if combined_form(cfg)[0] == 1.0:  # with m1 = 1, lambda = 0 removes the margin entirely
            torch.testing.assert_close(target_logit(cos, cfg, torch.zeros_like(cos)), cfg.scale * cos,
                                       atol=1e-12, rtol=0)


def test_gradient_is_exact_not_straight_through():
    cfg = CONFIGS["arcface"]
    cos = torch.tensor([0.9, 0.2, -0.4, -0.8], dtype=torch.float64, requires_grad=True)
    target_logit(cos, cfg).sum().backward()
    theta = torch.acos(cos.detach())
    expected = cfg.scale * torch.sin(theta + cfg.margin) / torch.sin(theta)  # d cos(theta+m) / d cos(theta)
    torch.testing.assert_close(cos.grad, expected, atol=1e-10, rtol=0)
    assert not torch.allclose(cos.grad, torch.full_like(cos.grad, cfg.scale))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradcheck_random_and_both_sides_of_switch(name):
    cfg = CONFIGS[name]
    gen = torch.Generator().manual_seed(3)
    row_lambda = 0.2 + 0.8 * torch.rand(6, generator=gen, dtype=torch.float64)
    m1, m2, _ = combined_form(cfg)
    switch = torch.clamp((math.pi - row_lambda * m2) / m1, max=math.pi - 1e-2)
    near_switch = torch.cat([torch.cos(switch - 1e-3), torch.cos(switch + 1e-3)])  # both sides of theta*
    random_cos = torch.rand(12, generator=gen, dtype=torch.float64) * 1.98 - 0.99
    cos = torch.cat([near_switch, random_cos]).requires_grad_(True)
    lam = torch.cat([row_lambda, row_lambda, torch.rand(12, generator=gen, dtype=torch.float64)])
    assert torch.autograd.gradcheck(lambda c: target_logit(c, cfg, lam), (cos,), eps=1e-7, atol=1e-6)
    assert torch.autograd.gradcheck(lambda c: target_logit(c, cfg), (cos,), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("name", ["arcface", "combined"])
def test_target_logit_monotone_in_angle_across_switch(name):
    cfg = CONFIGS[name]
    theta = torch.linspace(0.01, math.pi - 0.01, 4001, dtype=torch.float64)
    logits = target_logit(torch.cos(theta), cfg)
    assert bool((logits[1:] <= logits[:-1] + 1e-12).all()), "a worse angle must never get a larger target logit"


def test_easy_margin_leaves_negative_cosines():
    cfg = HeadConfig(type="arcface", scale=10.0, margin=0.5, easy_margin=True)
    cos = grid()
    out = target_logit(cos, cfg)
    negative = cos <= 0
    torch.testing.assert_close(out[negative], 10.0 * cos[negative], atol=1e-12, rtol=0)
    expected = 10.0 * torch.cos(torch.acos(cos[~negative]) + 0.5)
    torch.testing.assert_close(out[~negative], expected, atol=1e-10, rtol=0)


def test_margin_logits_replaces_only_targets_and_gradchecks():
    cfg = CONFIGS["combined"]
    gen = torch.Generator().manual_seed(5)
    cos = (torch.rand(5, 7, generator=gen, dtype=torch.float64) * 1.9 - 0.95).requires_grad_(True)
    local_target = torch.tensor([2, -1, 6, 2, 0])
    class_lambda = torch.rand(7, generator=gen, dtype=torch.float64)
    out = margin_logits(cos, local_target, class_lambda, cfg)
    expected = cos.detach() * cfg.scale
    for row, col in enumerate(local_target.tolist()):
        if col >= 0:
            expected[row, col] = target_logit(cos.detach()[row, col], cfg, class_lambda[col])
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda c: margin_logits(c, local_target, class_lambda, cfg), (cos,))


def test_margin_logits_rejects_bad_shapes():
    cos = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="local_target \\(rows,\\)"):
        margin_logits(cos, torch.zeros(2, dtype=torch.long), None, CONFIGS["arcface"])
    with pytest.raises(ValueError, match="class_lambda has shape \\(3,\\), expected \\(4,\\)"):
        margin_logits(cos, torch.zeros(3, dtype=torch.long), torch.ones(3), CONFIGS["arcface"])


def test_config_reports_every_problem():
    with pytest.raises(ValueError, match=r"(?s)type: must be one of .*, got 'sphereface'.*scale: must be > 0, got 0.0.*"
                                         r"combined_margins: needs m1 > 0.*got \[0.0, 0.5, 0.0\]"):
        HeadConfig(type="sphereface", scale=0.0, combined_margins=(0.0, 0.5, 0.0))
    assert combined_form(HeadConfig(type="cosface", margin=0.4)) == (1.0, 0.0, 0.4)
    assert combined_form(HeadConfig()) == (1.0, 0.5, 0.0)
