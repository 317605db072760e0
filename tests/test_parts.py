"""Unit tests of the separate parts: projectors, rules, lifts."""

import pytest
import torch

from lowmem.optim import LowMemOptimizer
from lowmem.optim.compose import build_parts
from lowmem.optim.lifts import limit_norm_growth
from lowmem.optim.projectors import (
    BlockProjector,
    CoordinateProjector,
    GaussianProjector,
    SVDProjector,
    next_seed,
    resolve_side,
)
from lowmem.optim.rules import AdamW
from lowmem.optim.states import StateStore


def low_rank_plus_noise(m, n, r, noise=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) + noise * torch.randn(m, n, generator=g)


@pytest.mark.parametrize("proj_type,shape,expected", [
    ("std", (8, 4), "right"), ("std", (4, 8), "left"), ("reverse_std", (8, 4), "left"),
    ("reverse_std", (4, 8), "right"), ("left", (8, 4), "left"), ("full", (4, 8), "full"),
])
def test_resolve_side(proj_type, shape, expected):
    assert resolve_side(proj_type, shape) == expected


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_svd_projector_is_lossless_on_a_rank_r_gradient(proj_type):
    grad = low_rank_plus_noise(48, 32, 4, noise=0.0)
    proj, state = SVDProjector(4, proj_type, 10), {}
    proj.refresh(state, grad)
    rebuilt = proj.up(state, proj.down(state, grad), grad)
    torch.testing.assert_close(rebuilt, grad, rtol=1e-4, atol=1e-4)
    assert proj.residual(state, grad, proj.down(state, grad)).norm() < 1e-3 * grad.norm()


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "full"])
@pytest.mark.parametrize("shape", [(600, 1024), (1024, 600)])
def test_back_projection_is_added_a_range_of_rows_at_a_time(proj_type, shape):
    """GaLore's lift adds its back-projected update to the weight ``CHUNK`` elements at a time: no product the size of
    the weight is formed, and each row is the whole update's, with the same roundings (bit-identical in bf16)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lowmem.kernels.codes_8bit import CHUNK

    class Products(TorchDispatchMode):
        sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.mm.default:
                self.sizes.append(out.numel())
            return out

    grad = low_rank_plus_noise(*shape, 8).to(torch.bfloat16)
    proj, state = SVDProjector(8, proj_type, 10), {}
    proj.refresh(state, grad)
    low = proj.down(state, grad)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    whole = weight.clone().add_(proj.up(state, low, grad).mul_(0.25), alpha=-1e-2)
    with Products():
        assert proj.add_up_(weight, state, low, 0.25, -1e-2)
    assert torch.equal(weight, whole)
    assert len(Products.sizes) >= 2 and max(Products.sizes) <= CHUNK + shape[1]


def test_randomized_svd_finds_the_same_subspace():
    grad = low_rank_plus_noise(300, 200, 16)
    exact, fast = SVDProjector(16, "std", 10), SVDProjector(16, "std", 10, svd_method="randomized")
    s1, s2 = {}, {}
    exact.refresh(s1, grad)
    fast.refresh(s2, grad)
    p1, p2 = s1["proj_v"].t() @ s1["proj_v"], s2["proj_v"].t() @ s2["proj_v"]
    assert (p1 - p2).norm() / p1.norm() < 1e-3  # same subspace up to rotation/sign


def test_refresh_schedule_every_T_steps():
    proj, state = SVDProjector(2, "std", 3), {}
    refreshed = []
    for k in range(8):
        state["step"] = k
        refreshed.append(proj.needs_refresh(state))
        if refreshed[-1]:
            proj.refresh(state, torch.randn(6, 4))
    assert refreshed == [True, False, False, True, False, False, True, False]


def test_gaussian_projector_regenerates_the_same_matrix_from_its_seed():
    grad = torch.randn(40, 24)
    proj, state = GaussianProjector(6, "std", 5), {"seed": 7}
    proj.refresh(state, grad)
    assert state["proj_seed"] == 7 and state["seed"] == next_seed(7) != 7
    a, b = proj.matrix(state, grad), proj.matrix(state, grad)
    assert torch.equal(a, b) and a.shape == (6, 24)
    assert abs(a.var().item() - 1 / 6) < 0.05  # N(0, 1/r)


@pytest.mark.parametrize("choice", ["columns", "rows", "randk"])
def test_coordinate_projector_gathers_scatters_and_zeroes_the_residual(choice):
    grad = torch.randn(10, 8)
    proj, state = CoordinateProjector(choice, 0.25, 5), {}
    torch.manual_seed(0)
    proj.refresh(state, grad)
    low = proj.down(state, grad)
    expected_count = {"columns": 10 * 2, "rows": 2 * 8, "randk": 20}[choice]
    assert low.numel() == expected_count
    up, res = proj.up(state, low, grad), proj.residual(state, grad, low)
    torch.testing.assert_close(up + res, grad, rtol=0, atol=0)
    assert ((up != 0) & (res != 0)).sum() == 0


@pytest.mark.parametrize("order,expected", [
    ("descending", [[5], [4], [3], [2], [1], [0], [5]]),
    ("ascending", [[0], [1], [2], [3], [4], [5], [0]]),
    ("mirror", [[0, 5], [1, 4], [2, 3], [0, 5]]),
])
def test_block_orders(order, expected):
    density = 2 / 6 if order == "mirror" else 1 / 6
    proj, group = BlockProjector(density, 10, order), {}
    chosen = [sorted(proj.choose(group, 6)) for _ in expected]
    assert chosen == [sorted(e) for e in expected]


def test_adamw_cores_differ_only_in_eps_placement_and_bias_correction():
    g, w = torch.randn(5, 3), torch.zeros(5, 3)
    hf, tc = AdamW(eps=1e-8, core="hf"), AdamW(eps=1e-8, core="torch")
    s1, s2 = {"step": 1}, {"step": 1}
    n1, step1, decay1 = hf.direction(g, s1, StateStore(), 0.1, w)
    n2, step2, decay2 = tc.direction(g, s2, StateStore(), 0.1, w)
    # first step: m = 0.1 g, v = 0.001 g^2 -> both updates are ~ lr * sign(g)
    torch.testing.assert_close(n1 * step1, 0.1 * g.sign(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(n2 * step2, 0.1 * g.sign(), rtol=1e-4, atol=1e-5)
    assert decay1 == decay2 == 0.1
    assert hf.decay == "after" and tc.decay == "mul_before"


def test_plain_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    w1 = torch.nn.Parameter(torch.randn(7, 5))
    w2 = torch.nn.Parameter(w1.detach().clone())
    ours = LowMemOptimizer([w1], lr=1e-2, weight_decay=0.1, rule="adamw_torch")
    ref = torch.optim.AdamW([w2], lr=1e-2, weight_decay=0.1, foreach=False)
    for _ in range(20):
        g = torch.randn(7, 5)
        w1.grad, w2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-7)


def test_limiter_caps_growth_and_keeps_small_steps():
    state = {}
    first = limit_norm_growth(torch.ones(4), state)
    assert torch.equal(first, torch.ones(4))
    capped = limit_norm_growth(torch.full((4,), 10.0), state)
    assert capped.norm() == pytest.approx(1.01 * 2.0, rel=1e-6)
    smaller = limit_norm_growth(torch.full((4,), 0.5), state)
    assert torch.equal(smaller, torch.full((4,), 0.5))


@pytest.mark.parametrize("rule", ["sign_sgd", "sgd"])
def test_state_free_rules_through_the_compose_optimizer(rule):
    w = torch.nn.Parameter(torch.randn(6, 4))
    start, g = w.detach().clone(), torch.randn(6, 4)
    opt = LowMemOptimizer([w], lr=0.1, weight_decay=0.5, rule=rule)
    w.grad = g
    opt.step()
    step = g.sign() if rule == "sign_sgd" else g
    torch.testing.assert_close(w.detach(), start * (1 - 0.1 * 0.5) - 0.1 * step)  # torch-style decay first
    assert opt.state_bytes() == 0


def test_parts_compose_beyond_the_papers():
    """An APOLLO lift over GaLore's SVD subspace with bf16 moments: any projector x rule x precision."""
    w = torch.nn.Parameter(torch.randn(32, 16))
    opt = LowMemOptimizer([{"params": [w], "projector": "svd", "rank": 4, "update_proj_gap": 3, "lift": "apollo",
                            "rule": "adamw_hf", "state_dtype": "bfloat16"}], lr=1e-2)
    before = w.detach().clone()
    for _ in range(5):
        w.grad = torch.randn(32, 16)
        opt.step()
    state = opt.state[w]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["exp_avg"].shape == (32, 4)
    assert not torch.equal(w.detach(), before) and torch.isfinite(w).all()


@pytest.mark.parametrize("rule,extra", [("adamw_hf", {}), ("adamw_torch", {}), ("adam_mini", {"mini_block": "rows"}),
                                        ("adafactor", {"beta1": 0.9, "relative_step": False}), ("came", {})])
@pytest.mark.parametrize("state_dtype", [None, "8bit"])
def test_reset_zeroes_every_statistic_of_every_rule(rule, extra, state_dtype):
    """FRUGAL's reset_statistics calls rule.reset: it must clear all the rule keeps (and restart the step)."""
    w = torch.nn.Parameter(torch.randn(128, 64))
    betas = (0.9, 0.999, 0.9999) if rule == "came" else (0.9, 0.999)
    eps = (1e-30, 1e-3) if rule in ("adafactor", "came") else 1e-8
    opt = LowMemOptimizer([w], lr=1e-3, rule=rule, betas=betas, eps=eps, state_dtype=state_dtype,
                          min_8bit_size=0, **extra)
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    state, parts = opt.state[w], build_parts(opt.param_groups[0])
    stats = {k for k, v in state.items() if torch.is_tensor(v) and not k.endswith("_absmax")}
    assert stats and stats <= set(parts.rule.moments)  # every tensor the rule keeps is one reset knows
    parts.rule.reset(state, parts.store)
    assert state["step"] == 0
    for key in stats:
        assert not parts.store.load(state, key).any(), key


@pytest.mark.parametrize("rule,options,message", [
    ("came", dict(betas=(0.9, 0.99)), r"rule 'came' takes 3 betas, e.g. betas=\(0.9, 0.999, 0.9999\)"),
    ("came", dict(eps=1e-6), r"rule 'came' takes an eps pair \(eps1, eps2\), e.g. eps=\(1e-30, 1e-16\)"),
    ("adafactor", dict(eps=(1e-30,)), r"rule 'adafactor' takes an eps pair"),
    ("adamw_torch", dict(betas=(0.9, 0.999, 0.9999)), r"rule 'adamw_torch' takes 2 betas"),
    ("adam_mini", dict(eps=(1e-30, 1e-3)), r"rule 'adam_mini' takes one eps"),
])
def test_rule_options_of_the_wrong_form_are_clear_errors_at_construction(rule, options, message):
    w = torch.nn.Parameter(torch.randn(8, 6))
    with pytest.raises(ValueError, match=message):
        LowMemOptimizer([w], rule=rule, **options)


def test_factored_rules_take_their_own_defaults_in_place_of_the_adamw_ones():
    w = torch.nn.Parameter(torch.randn(8, 6))
    came = build_parts(LowMemOptimizer([w], rule="came").param_groups[0]).rule
    assert (came.beta1, came.beta2, came.beta3, came.eps1, came.eps2) == (0.9, 0.999, 0.9999, 1e-30, 1e-16)
    adafactor = build_parts(LowMemOptimizer([w], rule="adafactor", lr=None).param_groups[0]).rule
    assert (adafactor.eps1, adafactor.eps2) == (1e-30, 1e-3)
