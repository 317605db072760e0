"""Muon against ``torch.optim.Muon`` (torch's own implementation is the reference): the drop-in class on matrices,
every ``adjust_lr_fn`` and Nesterov on and off, and the ``muon`` name (Muon on the hidden matrices, AdamW on the
rest) against torch's Muon and AdamW on the same split, 30 fp32 steps each, bit for bit."""

import pytest
import torch

import lowmem
from lowmem.example import tiny_llama
from lowmem.kernels import newton_schulz
from lowmem.optim import Muon

STEPS = 30


def matrices():
    torch.manual_seed(0)
    return [torch.randn(48, 16), torch.randn(16, 40), torch.randn(24, 24)]  # tall, wide (transposed inside), square


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "original", "match_rms_adamw"])
def test_the_class_equals_torch_muon(adjust_lr_fn, nesterov):
    ours = [w.clone().requires_grad_() for w in matrices()]
    theirs = [w.clone().requires_grad_() for w in matrices()]
    options = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    a, b = Muon(ours, **options), torch.optim.Muon(theirs, **options)
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        for p, q in zip(ours, theirs, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q, w in zip(ours, theirs, matrices(), strict=True):
        assert torch.equal(p, q)
        assert not torch.equal(p, w)
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"])


def test_the_muon_name_equals_torch_muon_and_adamw_on_the_same_split():
    """Hidden matrices (the attention and MLP weights) under Muon with Moonshot's lr adjustment (the name's default,
    so one lr fits both), embeddings, head and norms under AdamW, as Muon's users split them. Fixed random gradients:
    through a model, AdamW's last-bit differences from torch's (its other operation order, within 1e-5) would reach
    the matrices' gradients, where bf16 Newton-Schulz amplifies them; alone, the matrices are bit-identical."""
    ours, theirs = tiny_llama(hidden=64, layers=2), tiny_llama(hidden=64, layers=2)
    theirs.load_state_dict(ours.state_dict())
    optimizer = lowmem.create_optimizer("muon", ours, lr=3e-3, weight_decay=0.1)
    hidden = [n for n, _ in theirs.named_parameters() if "self_attn" in n or "mlp" in n]
    assert optimizer.param_groups[0]["rule"] == "muon" and optimizer.param_groups[0]["param_names"] == hidden
    named = dict(theirs.named_parameters())
    rest = [n for n in named if n not in hidden]
    muon = torch.optim.Muon([named[n] for n in hidden], lr=3e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": [named[n] for n in rest if named[n].dim() >= 2]},
                               {"params": [named[n] for n in rest if named[n].dim() < 2], "weight_decay": 0.0}],
                              lr=3e-3, weight_decay=0.1, eps=1e-8)
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            q.grad = p.grad.clone()
        optimizer.step()
        muon.step()
        adamw.step()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        if name in hidden:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)


def test_the_iteration_is_torchs_and_leaves_its_input_alone():
    g = torch.randn(40, 16, dtype=torch.bfloat16)
    before = g.clone()
    from torch.optim._muon import _zeropower_via_newtonschulz

    ours = newton_schulz.orthogonalize(g)
    assert torch.equal(ours, _zeropower_via_newtonschulz(g.clone(), newton_schulz.COEFFICIENTS, 5, 1e-7))
    assert torch.equal(g, before)  # torch's normalizes a bf16 input in place; a Nesterov-free momentum would change
    singular = torch.linalg.svdvals(ours.float())
    assert 0.5 < singular.min() and singular.max() < 1.5  # about orthogonal, as Muon intends


def test_muon_8bit_is_spelled_either_way():
    """``muon+8bit`` (the precision after the rule, as the issue and users write it) is ``none+muon+8bit``, the
    registered ``muon_8bit``: one byte of momentum per matrix weight plus a scale per 256."""
    from lowmem.optim.registry import get_spec

    short, registered = get_spec("muon+8bit"), get_spec("muon_8bit")
    assert short.target_rule == registered.target_rule == "muon" and short.ctor["state_dtype"] == "8bit"
    model = tiny_llama(hidden=64, layers=1)
    optimizer = lowmem.create_optimizer("muon+8bit", model, lr=1e-3)
    ids = torch.zeros(1, 8, dtype=torch.long)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    matrix = model.model.layers[0].mlp.up_proj.weight
    assert optimizer.state[matrix]["momentum_buffer"].dtype == torch.uint8


@pytest.mark.parametrize("name", ["galore+muon+8bit", "apollo+muon+8bit"])
def test_projected_muon_keeps_an_8bit_projected_momentum(name):
    model = tiny_llama(hidden=64, layers=1)
    optimizer = lowmem.create_optimizer(name, model, lr=1e-3, rank=8, min_8bit_size=0)
    ids = torch.zeros(1, 8, dtype=torch.long)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    momentum = optimizer.state[model.model.layers[0].mlp.up_proj.weight]["momentum_buffer"]
    assert momentum.dtype == torch.uint8 and 8 in momentum.shape  # r x n (or m x r) codes


def test_mistakes_are_refused_before_a_step():
    with pytest.raises(ValueError, match="Muon updates matrices only"):
        Muon([torch.zeros(4, requires_grad=True)])
    with pytest.raises(ValueError, match="adjust_lr_fn='rms'"):
        Muon([torch.zeros(4, 4, requires_grad=True)], adjust_lr_fn="rms")
    with pytest.raises(ValueError, match="ns_coefficients"):
        Muon([torch.zeros(4, 4, requires_grad=True)], ns_coefficients=(1.0, 2.0))
