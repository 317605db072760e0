"""Edge tensors that once crashed an optimizer (issue 21): a non-contiguous attention weight under Adam-mini, a
zero-size ``Linear(64, 0)`` under MeZO, and Fira's projection refresh on an fp16 gradient that overflowed."""

import pytest
import torch

from lowmem.example import tiny_llama
from lowmem.optim.registry import create_optimizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")


def batch():
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, labels=ids)


def test_adam_mini_on_a_non_contiguous_attention_weight_matches_the_contiguous_one():
    """A transposed-storage q_proj (Adam-mini blocks it by heads: a view by rows of its gradient) takes the same
    steps as the same values stored contiguously."""
    models = []
    for contiguous in (True, False):
        torch.manual_seed(0)
        model = tiny_llama(hidden=64, layers=1)
        q = model.model.layers[0].self_attn.q_proj
        if not contiguous:
            q.weight = torch.nn.Parameter(q.weight.detach().t().contiguous().t())
        assert q.weight.is_contiguous() == contiguous
        optimizer = create_optimizer("adam_mini", model, lr=1e-2)
        for _ in range(3):
            model(**batch()).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        models.append(model)
    moved = models[0].model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(moved, tiny_llama(hidden=64, layers=1).model.layers[0].self_attn.q_proj.weight)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_mezo_steps_a_model_with_a_zero_size_linear():
    """``Linear(64, 0)`` has nothing to perturb; the model around it still trains (once ``UnboundLocalError``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Linear(64, 0), torch.nn.Flatten(0))
    first = model[0].weight.detach().clone()
    optimizer = create_optimizer("mezo", model, lr=1e-2, zo_eps=1e-3)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    target = torch.randn(4, 64, generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        loss = optimizer.estimate(lambda: (model[0](x) - target).pow(2).mean() + model(x).sum())
        optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(model[0].weight, first)
    assert model[1].weight.shape == (0, 64)


def fp16_model_with_a_non_finite_gradient(value=float("inf"), **options):
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, layers=1).half()
    optimizer = create_optimizer("fira_adamw", model, lr=1e-3, rank=8, update_proj_gap=1, **options)
    model(**batch()).loss.float().backward()
    q = model.model.layers[0].self_attn.q_proj.weight
    finite = q.grad.clone()
    q.grad[0, 0] = value  # an fp16 gradient past 65504 (inf), or inf - inf (NaN)
    return finite, optimizer, q


def test_fira_refuses_to_project_a_nan_gradient_naming_it():
    """With ``skip_nonfinite=False`` the refresh SVDs a NaN gradient (``_LinAlgError``): one clear error instead."""
    _, optimizer, q = fp16_model_with_a_non_finite_gradient(float("nan"), skip_nonfinite=False)
    before = q.detach().clone()
    with pytest.raises(FloatingPointError, match="the gradient of 'model.layers.0.self_attn.q_proj.weight' has NaN "
                                                 "or inf values at update 1.*Keep skip_nonfinite=True"):
        optimizer.step()
    assert torch.equal(q, before)


def test_fira_skips_a_non_finite_fp16_gradient_by_default():
    finite, optimizer, q = fp16_model_with_a_non_finite_gradient()
    before = q.detach().clone()
    optimizer.step()
    assert torch.equal(q, before) and optimizer.nonfinite_skips == 1
    optimizer.zero_grad()
    q.grad = finite
    optimizer.step()  # the next, finite gradient projects and updates
    assert not torch.equal(q, before) and torch.isfinite(q).all()


@pytest.mark.parametrize("name", ["adamw", "fira_adamw", "apollo_mini", "galore_adamw", "muon", "adam_mini"])
def test_fp16_weights_step_in_fp32_rounded_once(name):
    """In fp16, Adam's eps (1e-8) is 0 and Fira's ratios overflow, so a step computed there gives inf weights (as
    torch.optim.AdamW's does). lowmem steps fp16 weights in fp32, with fp32 states: three steps equal the same steps
    on an fp32 copy given the same gradients, rounded to fp16 after each."""
    torch.manual_seed(0)
    half = tiny_llama(hidden=64, layers=1).half()
    full = tiny_llama(hidden=64, layers=1)
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    options = {"rank": 8} if name not in ("adamw", "muon", "adam_mini") else {}
    optimizers = [create_optimizer(name, m, lr=1e-3, **options) for m in (half, full)]
    for _ in range(3):
        half(**batch()).loss.float().backward()
        for p, q in zip(half.parameters(), full.parameters(), strict=True):
            q.grad = p.grad.float()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        for q in full.parameters():  # what the fp16 weights hold after each step
            q.data.copy_(q.data.half().float())
    for (n, p), q in zip(half.named_parameters(), full.parameters(), strict=True):
        assert torch.isfinite(p).all(), n
        assert torch.equal(p, q.half()), n
    states = [t for s in optimizers[0].state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    assert states and all(t.dtype == torch.float32 for t in states if t.is_floating_point())


@pytest.mark.parametrize("name", ["adamw", "galore_adamw", "frugal", "muon"])
def test_a_large_fp16_embedding_updated_in_chunks_keeps_fp32_states(name):
    """A tensor over the chunk size (every real embedding and head) is updated a range at a time: its states are
    fp32 and its steps equal the fp32 copy's, rounded, as for small tensors."""
    from lowmem.optim.compose import CHUNK

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(2 * CHUNK // 64, 64)
            self.proj = torch.nn.Linear(64, 64)

        def forward(self, ids):
            return self.proj(self.emb(ids)).float().pow(2).mean()

    torch.manual_seed(0)
    half = Model().half()
    full = Model()
    full.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    optimizers = [create_optimizer(name, m, lr=1e-3, **({"rank": 8} if name == "galore_adamw" else {}),
                                   **({"target_modules": ["proj"]} if name != "adamw" else {}))
                  for m in (half, full)]
    ids = torch.randint(0, 2 * CHUNK // 64, (64,), generator=torch.Generator().manual_seed(4))
    for _ in range(3):
        half(ids).backward()
        for p, q in zip(half.parameters(), full.parameters(), strict=True):
            q.grad = p.grad.float()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        for q in full.parameters():
            q.data.copy_(q.data.half().float())
    assert torch.equal(half.emb.weight, full.emb.weight.half()) and torch.isfinite(half.emb.weight).all()
    state = optimizers[0].state[half.emb.weight]
    assert all(t.dtype == torch.float32 for t in state.values() if torch.is_tensor(t) and t.is_floating_point())
