"""Step-for-step parity of the drop-in optimizers with their reference packages.

``lowmem.optim.{GaLoreAdamW, APOLLOAdamW, FiraAdamW}`` against ``galore_torch.GaLoreAdamW``,
``apollo_torch.APOLLOAdamW`` and ``fira.FiraAdamW``, run side by side on identical parameters and gradients:

* 60 steps with ``update_proj_gap=20`` (three projector refreshes: before steps 1, 21 and 41);
* a tall (96 x 64) and a wide (64 x 96) weight in the projected group, and a 1-D bias in a plain group
  (no ``rank``) of the same optimizer, so the non-projected path is compared too;
* weight decay 0.1;
* gradients from a seeded ``torch.Generator`` whose scale changes every step (x (1 + step % 7)) plus
  two large spikes (x25 up, x0.02 down), so APOLLO's and Fira's norm-growth limiter really engages: it caps
  the update on more than half of the steps in the APOLLO check below, and removing it changes Fira's run.

fp32 must agree to 1e-5 relative (GaLore and Fira are bit-identical; APOLLO's fp32 path applies the
update in one fused addcmul_ and lands ~2e-7 away); bf16 (parameters and gradients in bf16,
as the references keep states in the gradient's dtype) within bf16 rounding, element-wise.
"""

import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the references import transformers / bitsandbytes
    import apollo_torch
    import fira
    import galore_torch

from lowmem.optim import APOLLOAdamW, FiraAdamW, GaLoreAdamW

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

STEPS, GAP, RANK = 60, 20, 8
SHAPES = {"tall": (96, 64), "wide": (64, 96)}
SPIKES = {33: 25.0, 47: 0.02}  # one large jump up, one large jump down
LR, WD = 1e-2, 0.1
FP32_TOL = 1e-5  # max|ours - ref| / max|ref|, per tensor
BF16_RTOL = 2.0**-7  # one bf16 rounding step, relative to |ref|

GALORE_CASES = {
    "galore_std": dict(proj_type="std"),
    "galore_reverse_std": dict(proj_type="reverse_std"),
    "galore_left": dict(proj_type="left"),
    "galore_right": dict(proj_type="right"),
    "galore_full": dict(proj_type="full"),
}
APOLLO_CASES = {
    "apollo_random_channel": (dict(proj="random", scale_type="channel", scale=2.0), {}),
    "apollo_mini": (dict(proj="random", scale_type="tensor", scale=128, rank=1), dict(scale_front=True)),
    "apollo_svd_channel": (dict(proj="svd", scale_type="channel", scale=1.0), {}),
    "apollo_random_no_limiter": (dict(proj="random", scale_type="channel", scale=1.0), dict(disable_nl=True)),
}


def case(name):
    """(our class, reference class, projected-group keys, constructor kwargs) for a case name."""
    if name in GALORE_CASES:
        keys = dict(rank=RANK, update_proj_gap=GAP, scale=0.25, **GALORE_CASES[name])
        return GaLoreAdamW, galore_torch.GaLoreAdamW, keys, {}
    if name in APOLLO_CASES:
        group, ctor = APOLLO_CASES[name]
        keys = dict(rank=RANK, update_proj_gap=GAP, proj_type="std")
        keys.update(group)
        return APOLLOAdamW, apollo_torch.APOLLOAdamW, keys, ctor
    if name == "fira_std":
        keys = dict(rank=RANK, update_proj_gap=GAP, alpha=0.25, proj_type="std")
        return FiraAdamW, fira.FiraAdamW, keys, {}
    raise KeyError(name)


CASES = [*GALORE_CASES, *APOLLO_CASES, "fira_std"]


def initial_params(dtype):
    gen = torch.Generator().manual_seed(0)
    params = {name: torch.randn(*shape, generator=gen) for name, shape in SHAPES.items()}
    params["bias"] = torch.randn(64, generator=gen)
    return {k: (0.1 * v).to(dtype) for k, v in params.items()}  # small weights: bf16 updates do not round away


def gradient_scale(step: int) -> float:
    return (1 + step % 7) * SPIKES.get(step, 1.0)


def gradients(dtype, steps=STEPS, seed=1):
    """Per step, a gradient per parameter: Gaussian noise around a fixed low-rank signal, rescaled per step."""
    gen = torch.Generator().manual_seed(seed)
    signal = {
        name: torch.randn(shape[0], 4, generator=gen) @ torch.randn(4, shape[1], generator=gen)
        for name, shape in SHAPES.items()
    }
    out = []
    for step in range(1, steps + 1):
        grads = {name: signal[name] + 0.5 * torch.randn(*shape, generator=gen) for name, shape in SHAPES.items()}
        grads["bias"] = torch.randn(64, generator=gen)
        out.append({k: (v * gradient_scale(step)).to(dtype) for k, v in grads.items()})
    return out


def run(opt_cls, group_keys, ctor, dtype, grads, lr=LR, weight_decay=WD, correct_bias=True, each_step=None):
    """Train the bias (plain group, first) and both weights (projected group); parameters after every step."""
    params = {k: torch.nn.Parameter(v.clone()) for k, v in initial_params(dtype).items()}
    groups = [
        {"params": [params["bias"]]},
        {"params": [params["tall"], params["wide"]], **group_keys},
    ]
    opt = opt_cls(groups, lr=lr, weight_decay=weight_decay, correct_bias=correct_bias, **ctor)
    history = []
    for step, g in enumerate(grads, start=1):
        if each_step is not None:
            each_step(step, params)
        for name, p in params.items():
            p.grad = g[name].clone()
        opt.step()
        history.append({k: p.detach().clone() for k, p in params.items()})
    return history, opt


def assert_fp32_parity(ours_hist, ref_hist):
    for step, (ours, ref) in enumerate(zip(ours_hist, ref_hist, strict=True), start=1):
        for name in ref:
            assert torch.isfinite(ref[name]).all(), (step, name)
            rel = ((ours[name] - ref[name]).abs().max() / ref[name].abs().max()).item()
            assert rel <= FP32_TOL, f"step {step}, '{name}': max relative difference {rel:.3e} > {FP32_TOL:g}"


def assert_bf16_parity(ours_hist, ref_hist):
    for step, (ours, ref) in enumerate(zip(ours_hist, ref_hist, strict=True), start=1):
        for name in ref:
            assert ours[name].dtype == ref[name].dtype == torch.bfloat16
            torch.testing.assert_close(
                ours[name].float(), ref[name].float(), rtol=BF16_RTOL, atol=0,
                msg=lambda m, step=step, name=name: f"step {step}, '{name}': {m}",
            )


def assert_trajectory_moves(hist, dtype):
    """Guard against a vacuous comparison: every parameter moves well beyond the tolerance.

    (In bf16 ``w - lr * wd * w`` rounds back to ``w``, in the reference as well, and some small updates
    round away: so "moved" means most elements changed, not all.)
    """
    init = initial_params(dtype)
    for name, value in hist[-1].items():
        change = (value.float() - init[name].float()).abs()
        moved = (change.max() / init[name].float().abs().max()).item()
        changed = (change > 0).float().mean().item()
        assert moved > 1e-3 and changed > 0.5, (name, moved, changed)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(name, dtype):
    ours_cls, ref_cls, keys, ctor = case(name)
    grads = gradients(dtype)
    ref_hist, _ = run(ref_cls, dict(keys), ctor, dtype, grads)
    ours_hist, _ = run(ours_cls, dict(keys), ctor, dtype, grads)
    assert_trajectory_moves(ref_hist, dtype)
    if dtype == torch.float32:
        assert_fp32_parity(ours_hist, ref_hist)
    else:
        assert_bf16_parity(ours_hist, ref_hist)


def test_cases_use_different_update_rules():
    """The cases are not all the same computation: no two give the same weights (tall and wide together;
    e.g. GaLore std equals right on the tall weight but left on the wide one)."""
    grads = gradients(torch.float32, steps=25)
    finals = {}
    for name in CASES:
        ours_cls, _, keys, ctor = case(name)
        last = run(ours_cls, dict(keys), ctor, torch.float32, grads)[0][-1]
        finals[name] = torch.cat([last["tall"].flatten(), last["wide"].flatten()])
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(finals[a], finals[b], rtol=1e-4, atol=0), (a, b)


def update_norm_ratios(opt_cls, keys, ctor, grads, name):
    """||dW_t|| / ||dW_{t-1}|| for steps t without a projector refresh.

    lr constant, weight_decay=0 and correct_bias=False make the step factor exactly ``lr``, so the weight
    change is ``-lr * sqrt(scale) * limited(S_t)``. APOLLO's update does not depend on W, so W is set to zero
    before every step: the change is then read off exactly (one rounding of ``lr * U``) instead of as a
    difference of two nearby fp32 weights.
    """
    def zero_weights(step, params):
        with torch.no_grad():
            for p in params.values():
                p.zero_()

    hist, _ = run(opt_cls, dict(keys), ctor, torch.float32, grads, lr=1e-2, weight_decay=0.0,
                  correct_bias=False, each_step=zero_weights)
    norms = [h[name].double().norm().item() for h in hist]
    ratios = {}
    for t in range(2, len(norms) + 1):  # 1-based step t; refreshes happen before steps 1, GAP + 1, ...
        if (t - 1) % GAP != 0:
            ratios[t] = norms[t - 1] / norms[t - 2]
    return ratios, hist


@pytest.mark.parametrize("apollo_case", ["apollo_random_channel", "apollo_mini"])
@pytest.mark.parametrize("name", ["tall", "wide"])
def test_apollo_norm_growth_limiter_engages(apollo_case, name):
    _, _, keys, ctor = case(apollo_case)
    grads = gradients(torch.float32)
    limited, ours_hist = update_norm_ratios(APOLLOAdamW, keys, ctor, grads, name)
    # The same measurement on the reference must give the same trajectory (limiter included).
    _, ref_hist = update_norm_ratios(apollo_torch.APOLLOAdamW, keys, ctor, grads, name)
    assert_fp32_parity(ours_hist, ref_hist)

    worst = max(limited, key=limited.get)
    assert limited[worst] <= 1.01 + 1e-6, f"update norm grew x{limited[worst]:.6f} at step {worst}"
    # ... and it is the limiter that holds it there: it is at its cap on some steps, and without it
    # (disable_nl=True, same run otherwise) the update norm grows faster than the cap on some steps.
    assert limited[worst] > 1.01 - 1e-4, limited[worst]
    unlimited, _ = update_norm_ratios(APOLLOAdamW, keys, {**ctor, "disable_nl": True}, grads, name)
    assert max(unlimited.values()) > 1.1, max(unlimited.values())


def test_fira_limiter_engages_in_the_parity_run(monkeypatch):
    """Fira's residual is limited too: with the limiter the trajectory differs from an unlimited replay."""
    grads = gradients(torch.float32)
    _, ref_cls, keys, ctor = case("fira_std")
    with_limiter, opt = run(FiraAdamW, dict(keys), ctor, torch.float32, grads)
    assert all("limiter_norm" in opt.state[p] for p in opt.param_groups[1]["params"])
    ref_hist, _ = run(ref_cls, dict(keys), ctor, torch.float32, grads)
    assert_fp32_parity(with_limiter, ref_hist)

    # Replay with the growth cap removed (gamma = inf): the limiter must have changed the trajectory.
    import lowmem.optim.lifts as lifts

    capped = lifts.limit_norm_growth
    monkeypatch.setattr(lifts, "limit_norm_growth", lambda update, state: capped(update, state, gamma=float("inf")))
    without, _ = run(FiraAdamW, dict(keys), ctor, torch.float32, grads)
    for name in SHAPES:
        a, b = without[-1][name], with_limiter[-1][name]
        diff = ((a - b).abs().max() / b.abs().max()).item()
        assert diff > 1e-3, (name, diff)


@pytest.mark.parametrize("rank", [64, 100], ids=["rank=min", "rank>min"])
@pytest.mark.parametrize("name", ["galore_std", "galore_full", "fira_std", "apollo_random_channel",
                                  "apollo_svd_channel"])
def test_rank_at_or_above_min_dim_matches_reference(name, rank):
    """galore-torch, fira and apollo-torch accept a rank >= min(m, n) (the transformers docs' rank=128 on a small
    model): the SVD then yields min(m, n) factors, APOLLO's random sketch keeps ``rank`` rows. lowmem runs the same
    numbers and warns once, naming the matrices."""
    ours_cls, ref_cls, keys, ctor = case(name)
    keys["rank"] = rank
    grads = gradients(torch.float32, steps=25)
    ref_hist, _ = run(ref_cls, dict(keys), ctor, torch.float32, grads)
    with pytest.warns(UserWarning, match=rf"rank={rank} is at least min\(m, n\) for 2 matrices \(#0 of param group 1 "
                                         r"\(96, 64\), #1 of param group 1 \(64, 96\)\)"):
        ours_hist, _ = run(ours_cls, dict(keys), ctor, torch.float32, grads)
    assert_fp32_parity(ours_hist, ref_hist)
