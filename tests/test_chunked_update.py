"""Large unprojected tensors under an elementwise rule update a chunk at a time, bit-identical to the whole tensor
(the direction then never exists at full size: the peak of a layer-wise step over a large embedding or head)."""

import pytest
import torch
from torch import nn

import lowmem
from lowmem.kernels.codes_8bit import CHUNK
from lowmem.optim import compose


class Net(nn.Module):
    """A large embedding and head (three chunks each, the last one partial: the embedding's off the 256-element
    block grid; 8-bit optimizers keep embedding states in fp32, and the head's in 8 bits on whole blocks, where
    whole tensor and chunks both take the compiled kernel) and an attention-named linear that GaLore projects."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(2 * CHUNK // 64 + 5, 64)
        self.attn = nn.Linear(64, 64)
        self.head = nn.Linear(64, 2 * CHUNK // 64 + 8, bias=False)


def model(dtype):
    torch.manual_seed(0)
    return Net().to(dtype)


def run(name, dtype, chunked: bool, monkeypatch, steps=3, **options):
    net = model(dtype)
    with monkeypatch.context() as patch:
        if not chunked:
            patch.setattr(compose, "_in_chunks", lambda *a: False)
        opt = lowmem.create_optimizer(name, net, lr=1e-2, weight_decay=0.1, **options)
        for step in range(steps):
            gen = torch.Generator().manual_seed(step)
            for p in net.parameters():
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
    return net, opt


@pytest.mark.parametrize("name,dtype,options", [
    ("adamw", torch.float32, {}),
    ("adamw", torch.bfloat16, {}),
    ("adamw", torch.bfloat16, {"state_dtype": "float32"}),
    ("galore_adamw", torch.float32, {"rank": 4}),  # its dense groups use the hf core (decay after the update)
    ("adamw_8bit", torch.float32, {"min_8bit_size": 0}),
])
def test_chunked_update_is_bit_identical(name, dtype, options, monkeypatch):
    chunked, opt = run(name, dtype, True, monkeypatch, **options)
    whole, _ = run(name, dtype, False, monkeypatch, **options)
    index = next(i for i, g in enumerate(opt.param_groups) if any(p is chunked.embed.weight for p in g["params"]))
    assert compose._in_chunks(chunked.embed.weight, chunked.embed.weight.detach(),
                              opt.parts_for_step(index, choose_blocks=False))
    for (n, p), q in zip(chunked.named_parameters(), whole.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_projected_and_whole_tensor_rules_are_not_chunked():
    net = model(torch.float32)
    embedding = net.embed.weight
    embedding.grad = torch.zeros_like(embedding)
    for name in ("adafactor", "came"):
        opt = lowmem.create_optimizer(name, net)
        assert not compose._in_chunks(embedding, embedding.grad, opt.parts_for_step(0, choose_blocks=False)), name
    opt = lowmem.create_optimizer("adam_mini", net)  # one second moment per token: whole rows at a time (below)
    assert [g["mini_block"] for g in opt.param_groups if any(p is embedding for p in g["params"])] == ["rows"]
    assert compose._in_chunks(embedding, embedding.grad, opt.parts_for_step(0, choose_blocks=False))


class Vocabulary(nn.Module):
    """An embedding and a head Adam-mini gives one second moment per row (by their names), 96 wide: a range of whole
    rows is not ``CHUNK`` elements, and on 8-bit blocks of 256 rows it is a different count again."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(2 * CHUNK // 96 + 5, 96)
        self.attn = nn.Linear(96, 96)
        self.lm_head = nn.Linear(96, 2 * CHUNK // 96 + 8, bias=False)


@pytest.mark.parametrize("name,options", [
    ("apollo_mini", {}),
    ("galore_adamw_8bit", {"rank": 4, "min_8bit_size": 0}),  # the head's m and per-row v in 8 bits
])
def test_a_row_local_rule_updates_whole_rows_at_a_time_bit_identically(name, options, monkeypatch):
    """``dense_rule="adam_mini"``: the embedding's and head's per-token second moments, updated a range of whole rows
    at a time (``compose.chunk_ranges``), equal the whole tensor's update."""
    nets = []
    for chunked in (True, False):
        torch.manual_seed(0)
        net = Vocabulary()
        with monkeypatch.context() as patch:
            if not chunked:
                patch.setattr(compose, "_in_chunks", lambda *a: False)
            opt = lowmem.create_optimizer(name, net, lr=1e-2, weight_decay=0.1, dense_rule="adam_mini", **options)
            for step in range(3):
                gen = torch.Generator().manual_seed(step)
                for p in net.parameters():
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
        nets.append((net, opt))
    (chunked, opt), (whole, _) = nets
    index = next(i for i, g in enumerate(opt.param_groups) if any(p is chunked.lm_head.weight for p in g["params"]))
    head, parts = opt.param_groups[index], opt.parts_for_step(index, choose_blocks=False)
    ranges = compose.chunk_ranges(parts, chunked.lm_head.weight.shape)
    assert head["rule"] == "adam_mini" and len(ranges) == 3 and ranges[0][1] % 96 == 0
    assert compose._in_chunks(chunked.lm_head.weight, chunked.lm_head.weight.detach(), parts)
    state = opt.state[chunked.lm_head.weight]
    assert state["exp_avg_sq"].shape[0] == chunked.lm_head.weight.shape[0]
    assert ("exp_avg_sq_absmax" in state) == ("8bit" in name)
    for (n, p), q in zip(chunked.named_parameters(), whole.parameters(), strict=True):
        assert torch.equal(p, q), n
