"""The output head's and embedding's streamed layer-wise updates (``streamed_rows``): their gradients a range of rows
at a time inside their backward, never whole; the same training as the whole-gradient update, up to rounding."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowmem
from lowmem.kernels.codes_8bit import CHUNK

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _model(vocab=4 * CHUNK // 64 + 37, tie=False, pad=None, hidden=64):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=tie, pad_token_id=pad)
    return LlamaForCausalLM(config)


def _ids(model, gen, pad=None):
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
    if pad is not None:
        ids[:, ::4] = pad
    return ids


def _train(model, name, steps=3, accumulation=1, **options):
    optimizer = lowmem.create_optimizer(name, model, lr=1e-3, **options)
    _train_with(model, optimizer, accumulation, steps)
    return optimizer


@pytest.mark.parametrize("name,options", [
    ("apollo_mini_layerwise", {}), ("adamw_layerwise", {}), ("adamw_8bit_layerwise", {}),
    ("apollo_mini_layerwise", {"dense_rule": "adam_mini"}),  # one v per row: whole rows at a time
    ("galore_adamw_8bit_layerwise", {"dense_rule": "adam_mini", "rank": 4}),
])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_streamed_head_matches_the_whole_gradient_update(name, options, accumulation):
    streamed, whole = _model(), _model()
    optimizer = _train(streamed, name, accumulation=accumulation, **options)
    assert optimizer.layerwise.streamed == [streamed.lm_head, streamed.model.embed_tokens]
    reference = lowmem.create_optimizer(name, whole, lr=1e-3, **options)
    reference.layerwise.remove()  # the head's forward back to nn.Linear's: its whole gradient, updated in step()
    reference.enable_layerwise()
    assert reference.layerwise.streamed == []
    _train_with(whole, reference, accumulation)
    for (n, a), b in zip(streamed.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert optimizer.layerwise.last_grad_norm == pytest.approx(reference.layerwise.last_grad_norm, rel=1e-5)


def test_padding_row_gets_no_gradient_when_streamed():
    streamed, whole = _model(pad=3), _model(pad=3)
    assert streamed.model.embed_tokens.padding_idx == 3
    _train(streamed, "adamw_layerwise", weight_decay=0.0)
    reference = lowmem.create_optimizer("adamw_layerwise", whole, lr=1e-3)
    reference.layerwise.remove()
    reference.enable_layerwise()
    _train_with(whole, reference, 1)
    for (n, a), b in zip(streamed.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def _train_with(model, optimizer, accumulation, steps=3):
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for micro in range(accumulation):
            ids = _ids(model, gen, model.config.pad_token_id)
            context = optimizer.layerwise.accumulating() if micro < accumulation - 1 else torch.enable_grad()
            with context:
                model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_the_head_and_embedding_gradients_never_exist_whole():
    model = _model()
    seen = []
    for weight in (model.lm_head.weight, model.model.embed_tokens.weight):
        weight.register_hook(lambda g: seen.append(g))
    _train(model, "apollo_mini_layerwise", steps=2)
    assert len(seen) == 4 and all(g is None for g in seen)  # autograd never produced their weight gradients
    assert model.lm_head.weight.grad is None and model.model.embed_tokens.weight.grad is None


def test_a_nonfinite_head_gradient_skips_the_head_update():
    model = _model()
    optimizer = lowmem.create_optimizer("adamw_layerwise", model, lr=1e-3)
    head = model.lm_head.weight.detach().clone()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    (model(input_ids=ids, labels=ids).loss * float("nan")).backward()
    optimizer.step()
    assert torch.equal(model.lm_head.weight, head)
    assert optimizer.nonfinite_skips == sum(1 for p in model.parameters())  # the head's skip counted like the others
    assert "step" not in optimizer.state[model.lm_head.weight]


def test_no_streaming_where_it_cannot_apply():
    tied = _model(tie=True)
    assert lowmem.create_optimizer("adamw_layerwise", tied).layerwise.streamed == []
    small = _model(vocab=256)  # under CHUNK elements: its update is not chunked
    assert lowmem.create_optimizer("adamw_layerwise", small).layerwise.streamed == []
    factored = _model()
    assert lowmem.create_optimizer("adafactor_layerwise", factored).layerwise.streamed == []
    patched = _model()
    from lowmem.kernels.model_patch import patch_linear_cross_entropy

    patch_linear_cross_entropy(patched)  # its loss hands over the head's rows; the head's forward stays
    assert lowmem.create_optimizer("adamw_layerwise", patched).layerwise.streamed == [patched.lm_head,
                                                                                       patched.model.embed_tokens]
    assert "forward" not in patched.lm_head.__dict__
    plain = _model()
    assert lowmem.create_optimizer("adamw", plain).layerwise is None
    assert "forward" not in plain.lm_head.__dict__


def test_planner_prices_the_streamed_head_without_its_gradient():
    """The head dominates this model's step: streamed (by its own backward, or by the loss without logits), no phase
    holds its whole gradient; without layer-wise updates the step holds it."""
    from lowmem.memory import meta_model, peak_bytes

    model = _model()
    head_bytes = model.lm_head.weight.numel() * 4
    streamed = peak_bytes(meta_model(model.config), "adamw_layerwise", 2, 16)
    without_logits = peak_bytes(meta_model(model.config), "adamw_layerwise", 2, 16, linear_ce=True)
    whole = peak_bytes(meta_model(model.config), "adamw", 2, 16, linear_ce=True)
    assert whole.gradients >= head_bytes
    assert streamed.gradients < head_bytes // 4 and without_logits.gradients < head_bytes // 4


@pytest.mark.parametrize("name,options", [("adamw_layerwise", {}), ("adamw_8bit_layerwise", {}),
                                          ("apollo_mini_layerwise", {"dense_rule": "adam_mini"})])
def test_the_loss_without_logits_hands_over_the_head_rows(name, options):
    """With ``linear_cross_entropy`` the loss's backward gives the head's rows to the update, recomputing each range's
    logits from the weight; hidden 96 does not divide the update's chunk, so rows straddle two ranges (each computed
    once, before either range updates it)."""
    from lowmem.kernels.linear_ce import STREAM_ATTR
    from lowmem.kernels.model_patch import patch_linear_cross_entropy

    streamed, whole = _model(vocab=3 * CHUNK // 96 + 5, hidden=96), _model(vocab=3 * CHUNK // 96 + 5, hidden=96)
    assert CHUNK % 96
    for model in (streamed, whole):
        patch_linear_cross_entropy(model)
    optimizer = _train(streamed, name, **options)
    assert hasattr(streamed.lm_head.weight, STREAM_ATTR)
    reference = lowmem.create_optimizer(name, whole, lr=1e-3, **options)
    reference.layerwise.remove()
    assert not hasattr(whole.lm_head.weight, STREAM_ATTR)
    reference.enable_layerwise()
    _train_with(whole, reference, 1)
    for (n, a), b in zip(streamed.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert optimizer.layerwise.last_grad_norm == pytest.approx(reference.layerwise.last_grad_norm, rel=1e-5)
