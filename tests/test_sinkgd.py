"""SinkGD: the stateless rule (SR-Sinkhorn normalization of each matrix's gradient), alone and composed."""

import math

import pytest
import torch

import lowmem
from lowmem.example import tiny_llama
from lowmem.optim.rules import SinkGD


def test_sr_sinkhorn_balances_rows_and_columns():
    g = torch.randn(48, 20, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 20)
    x, step, decay = SinkGD(iterations=5).direction(g, {}, None, 0.1, g)
    assert (step, decay) == (0.1, 0.1)
    columns, rows = x.norm(dim=0), x.norm(dim=1)
    torch.testing.assert_close(columns, torch.full_like(columns, math.sqrt(48)))  # the last normalization
    torch.testing.assert_close(rows, torch.full_like(rows, math.sqrt(20)), rtol=0.05, atol=0)  # converging
    assert x.norm() == pytest.approx(math.sqrt(48 * 20), rel=1e-5)  # RMS 1, as Adam's update
    one = SinkGD(iterations=1).direction(g, {}, None, 0.1, g)[0]
    assert (one.norm(dim=1) - math.sqrt(20)).abs().max() > (rows - math.sqrt(20)).abs().max()  # more is closer


def test_a_rank_one_gradient_becomes_its_sign():
    """``u v^T``: rows scaled to sqrt(n) then columns to sqrt(m) leave sign(u_i) sign(v_j), at the first pass."""
    gen = torch.Generator().manual_seed(1)
    u, v = torch.randn(12, generator=gen), torch.randn(7, generator=gen)
    x = SinkGD(iterations=1).direction(torch.outer(u, v), {}, None, 1.0, None)[0]
    torch.testing.assert_close(x, torch.outer(u.sign(), v.sign()))


@pytest.mark.parametrize("name,options", [("sinkgd", {}), ("galore+sinkgd", {"rank": 8}), ("sinkgd_layerwise", {})])
def test_no_state_on_the_matrices_and_it_trains(name, options):
    model = tiny_llama(hidden=64, layers=2)
    opt = lowmem.create_optimizer(name, model, lr=3e-3, **options)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    matrices = opt.param_groups[0]
    assert matrices["rule"] == "sinkgd"
    for p in matrices["params"]:  # GaLore's projector is the only thing kept, the rule keeps nothing
        assert set(k for k, v in opt.state[p].items() if torch.is_tensor(v)) <= {"proj_u", "proj_v"}
    embedding = model.get_input_embeddings().weight
    assert {"exp_avg", "exp_avg_sq"} <= set(opt.state[embedding])  # AdamW off the matrices


def test_refuses_what_it_cannot_normalize():
    with pytest.raises(ValueError, match="sinkgd_iterations=0"):
        lowmem.create_optimizer("sinkgd", tiny_llama(hidden=64, layers=1), sinkgd_iterations=0).step()
    with pytest.raises(ValueError, match="SinkGD normalizes matrices only"):
        SinkGD().direction(torch.ones(3), {}, None, 1.0, None)
