"""Parity of the factored rules: Adafactor vs transformers, CAME vs came-pytorch, GaLoreAdafactor vs galore-torch.

60 steps, tall and wide weights plus a 1-D bias (the unfactored path), gradients whose scale changes every
step; GaLore refreshes every 20 steps. fp32 must agree to 1e-5 relative (max |ours - ref| / max |ref| per
tensor); in practice Adafactor and GaLoreAdafactor are bit-identical and CAME is within 1e-7 (it adds
``lr * update`` in one fused op where the reference multiplies first).
"""

import warnings

import pytest
import torch
from came_pytorch import CAME as RefCAME
from transformers.optimization import Adafactor as RefAdafactor

from lowmem.optim import CAME, Adafactor, GaLoreAdafactor

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from galore_torch import GaLoreAdafactor as RefGaLoreAdafactor

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

STEPS = 60
GALORE = dict(rank=6, update_proj_gap=20, scale=0.25, proj_type="std")

CASES = {
    "adafactor_relative_step": (Adafactor, RefAdafactor, None, {}),
    "adafactor_warmup_init": (Adafactor, RefAdafactor, None, dict(warmup_init=True)),
    "adafactor_external_lr": (Adafactor, RefAdafactor, None, dict(lr=1e-2, relative_step=False, scale_parameter=False)),
    "adafactor_beta1_weight_decay": (Adafactor, RefAdafactor, None,
                                     dict(lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.1, clip_threshold=0.5,
                                          scale_parameter=False)),
    "came": (CAME, RefCAME, None, dict(lr=1e-3)),
    "came_weight_decay": (CAME, RefCAME, None, dict(lr=1e-3, weight_decay=0.1, betas=(0.8, 0.99, 0.999))),
    "galore_adafactor": (GaLoreAdafactor, RefGaLoreAdafactor, GALORE,
                         dict(lr=1e-2, relative_step=False, scale_parameter=False)),
    "galore_adafactor_relative_beta1": (GaLoreAdafactor, RefGaLoreAdafactor, GALORE, dict(beta1=0.9)),
}


def trajectory(cls, group_keys, ctor, shape):
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(0.1 * torch.randn(*shape, generator=gen))
    b = torch.nn.Parameter(0.1 * torch.randn(shape[0], generator=gen))
    opt = cls([{"params": [b]}, {"params": [w], **(group_keys or {})}], **ctor)
    history = []
    for step in range(STEPS):
        w.grad = (1 + step % 5) * torch.randn(*shape, generator=gen)
        b.grad = torch.randn(shape[0], generator=gen)
        opt.step()
        history.append((w.detach().clone(), b.detach().clone()))
    return history


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)], ids=["tall", "wide"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(case, shape):
    ours_cls, ref_cls, group_keys, ctor = CASES[case]
    ours = trajectory(ours_cls, group_keys, ctor, shape)
    ref = trajectory(ref_cls, group_keys, ctor, shape)
    start = trajectory(ours_cls, group_keys, ctor, shape)[0]
    assert not torch.equal(ours[-1][0], start[0])  # the weights really moved
    for step, (mine, theirs) in enumerate(zip(ours, ref, strict=True), start=1):
        for a, b in zip(mine, theirs, strict=True):
            diff = ((a - b).abs().max() / b.abs().max()).item()
            assert diff <= 1e-5, f"{case} step {step}: {diff:.2e}"


def test_adafactor_lr_and_relative_step_conflict_is_a_clear_error():
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="both lr and relative_step=True.*lr=None.*relative_step=False"):
        Adafactor([w], lr=1e-3)
    with pytest.raises(ValueError, match="needs an lr"):
        Adafactor([w], relative_step=False)
    with pytest.raises(ValueError, match="positive lr"):
        CAME([w])


def test_factored_state_bytes():
    w = torch.nn.Parameter(torch.randn(48, 32))
    for cls, ctor, expected in [(Adafactor, {}, 4 * (48 + 32)), (Adafactor, dict(beta1=0.9), 4 * (48 + 32 + 48 * 32)),
                                (CAME, dict(lr=1e-3), 4 * 48 * 32 + 8 * (48 + 32))]:
        opt = cls([w], **ctor)
        w.grad = torch.randn(48, 32)
        opt.step()
        assert opt.state_bytes() == expected, cls.__name__
