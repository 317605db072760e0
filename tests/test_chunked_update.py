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
    for name in ("adafactor", "came", "adam_mini"):
        opt = lowmem.create_optimizer(name, net)
        assert not compose._in_chunks(embedding, embedding.grad, opt.parts_for_step(0, choose_blocks=False)), name
