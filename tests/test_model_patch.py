"""The linear-cross-entropy model patch: a patched LLaMA / Qwen2 / Mistral gives the unpatched model's loss and every
gradient (ignored labels, ``num_items_in_batch``, tied or untied head, peft LoRA) without logits, behaves as before
without labels, refuses what it cannot reproduce, and is switched on by ``TrainingArguments`` / recipes."""

import copy

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn
from trainer_helpers import StdlibText, args, losses

from lowmem.kernels import dispatch, linear_ce
from lowmem.kernels.model_patch import is_patched, patch_linear_cross_entropy, unpatch_linear_cross_entropy
from lowmem.recipe import parse_recipe
from lowmem.trainers import Trainer, TrainingArguments

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

ARCHITECTURES = ["llama", "qwen2", "mistral"]
CONFIGS = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}
CLASSES = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "mistral": transformers.MistralForCausalLM}
VOCAB = 300


def tiny(arch="llama", tied=False, **config):
    torch.manual_seed(0)
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, **config)
    return CLASSES[arch](CONFIGS[arch](**values))


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 16), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[1, -3:] = -100  # padding
    return {"input_ids": ids, "labels": labels}


@pytest.fixture
def several_blocks(monkeypatch):
    """32 tokens: blocks of 128 words, so the 300-word vocabulary takes three (the last of 44)."""
    monkeypatch.setattr(linear_ce, "BLOCK_BYTES", 1)
    assert len(linear_ce._blocks(VOCAB, 32, 64)) == 3


def loss_and_grads(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(model, patched, inputs, tol=1e-5):
    ref, ref_grads = loss_and_grads(model, inputs)
    out, grads = loss_and_grads(patched, inputs)
    assert out.logits is None and ref.logits is not None and out.loss.dtype == ref.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=tol, atol=tol)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("num_items", [None, 17])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_and_every_gradient_equal_the_unpatched_model(arch, tied, num_items, several_blocks):
    model = tiny(arch, tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    patched = patch_linear_cross_entropy(copy.deepcopy(model))
    inputs = batch()
    if num_items is not None:  # the Trainer's count over all micro-batches of a step: sum / num_items
        inputs["num_items_in_batch"] = torch.tensor(num_items)
    assert_same(model, patched, inputs)


def test_num_items_in_batch_divides_the_sum(several_blocks):
    patched = patch_linear_cross_entropy(tiny())
    inputs = batch()
    mean = patched(**inputs).loss
    summed = patched(**inputs, num_items_in_batch=torch.tensor(10)).loss
    valid = (inputs["labels"][:, 1:] != -100).sum()  # the shifted labels
    torch.testing.assert_close(summed * 10 / valid, mean, rtol=1e-6, atol=1e-6)


def test_triton_kernels_in_the_patched_model(several_blocks, monkeypatch):
    pytest.importorskip("triton")
    from lowmem.kernels import linear_ce_triton

    calls = []
    original = linear_ce_triton.forward_block
    monkeypatch.setattr(linear_ce_triton, "forward_block", lambda *a: calls.append(1) or original(*a))
    model = tiny("qwen2")
    patched = patch_linear_cross_entropy(copy.deepcopy(model))
    with dispatch.backend("triton"):
        assert_same(model, patched, {**batch(), "num_items_in_batch": torch.tensor(20)})
    assert len(calls) == 3


def test_bf16_model_loss_equal_gradients_within_bf16(several_blocks):
    """The same bf16 logits, so the same fp32 loss; the gradients differ by bf16 rounding (the unpatched backward
    rounds the logits' gradient to bf16, the patch keeps it in fp32)."""
    model = tiny().to(torch.bfloat16)
    patched = patch_linear_cross_entropy(copy.deepcopy(model))
    ref, ref_grads = loss_and_grads(model, batch())
    out, grads = loss_and_grads(patched, batch())
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        scale = ref_grads[name].float().abs().max()
        assert (grad.float() - ref_grads[name].float()).abs().max() <= 0.05 * scale, name


def test_without_labels_as_before():
    model = tiny()
    patched = patch_linear_cross_entropy(copy.deepcopy(model))
    ids = batch()["input_ids"]
    torch.testing.assert_close(patched(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    last = patched(input_ids=ids, logits_to_keep=1)
    assert last.logits.shape == (2, 1, VOCAB)
    torch.testing.assert_close(patched.generate(ids[:1, :4], max_new_tokens=3, do_sample=False),
                               model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False))


def test_return_dict_false_gives_the_tuple():
    patched = patch_linear_cross_entropy(tiny())
    out = patched(**batch(), return_dict=False, use_cache=False)
    assert isinstance(out, tuple) and out[0].dim() == 0
    torch.testing.assert_close(out[0], patched(**batch()).loss)


def test_patch_is_per_instance_idempotent_and_undone():
    model, other = tiny(), tiny()
    assert patch_linear_cross_entropy(model) is model and patch_linear_cross_entropy(model) is model
    assert is_patched(model) and not is_patched(other)
    assert model(**batch()).logits is None and other(**batch()).logits is not None
    unpatch_linear_cross_entropy(model)
    assert not is_patched(model) and model(**batch()).logits is not None


def test_peft_lora_model(several_blocks):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    model = get_peft_model(tiny("mistral"), config)
    with torch.no_grad():  # LoRA's B starts at 0: give the adapters an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    patched = patch_linear_cross_entropy(copy.deepcopy(model))
    assert is_patched(patched) and is_patched(patched.get_base_model())
    assert_same(model, patched, batch())


def test_refusals_name_the_problem_and_the_fix():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM.*GPT2LMHeadModel.*"
                                         "linear_cross_entropy=False"):
        patch_linear_cross_entropy(gpt2)
    biased = tiny()
    biased.lm_head = nn.Linear(64, VOCAB, bias=True)
    with pytest.raises(ValueError, match="lm_head has a bias"):
        patch_linear_cross_entropy(biased)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        patch_linear_cross_entropy(tiny(final_logit_softcapping=30.0))
    lora_head = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="not a plain torch.nn.Linear.*target_modules"):
        patch_linear_cross_entropy(lora_head)
    custom = tiny()
    custom.loss_function = lambda **kw: torch.tensor(0.0)
    with pytest.raises(ValueError, match="custom loss_function"):
        patch_linear_cross_entropy(custom)
    assert not any(is_patched(m) for m in (gpt2, biased, lora_head, custom))


def test_eval_mode_keeps_the_logits():
    """Evaluation and prediction run the model's own forward (compute_metrics needs the logits)."""
    model = patch_linear_cross_entropy(tiny()).eval()
    out = model(**batch())
    assert out.logits is not None and out.logits.shape[-1] == VOCAB
    assert model.train()(**batch()).logits is None


def test_a_hooked_head_computes_the_logits_and_warns():
    """Something around the head's forward (here a hook that scales its output) must run: the patched model falls
    back to the logits rather than skip it."""
    model = tiny()
    model.lm_head.register_forward_hook(lambda module, inputs, out: out * 2)
    reference = model(**batch()).loss
    patch_linear_cross_entropy(model)
    with pytest.warns(RuntimeWarning, match="hooked"):
        out = model(**batch())
    assert out.logits is not None
    torch.testing.assert_close(out.loss, reference, rtol=0, atol=0)


def train(tmp_path, **kw):
    """Three steps of two micro-batches (so the Trainer passes ``num_items_in_batch``) on text with a masked
    prompt, the losses logged every step."""
    rows = StdlibText(12)
    for row in rows.rows:
        row["labels"] = row["labels"].clone()
        row["labels"][:40] = -100
    trainer = Trainer(model=tiny(), args=args(tmp_path, max_steps=3, logging_steps=1, per_device_train_batch_size=2,
                                              gradient_accumulation_steps=2, **kw), train_dataset=rows)
    trainer.train()
    return trainer


def test_trainer_with_linear_cross_entropy_gives_the_same_losses(tmp_path):
    plain = train(tmp_path / "plain", linear_cross_entropy=False)
    fused = train(tmp_path / "fused", linear_cross_entropy=True)
    assert is_patched(fused.model) and not is_patched(plain.model)
    assert len(losses(fused)) == 3
    torch.testing.assert_close(torch.tensor(losses(fused)), torch.tensor(losses(plain)), rtol=1e-5, atol=1e-5)
    for p, q in zip(fused.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    evaluated = [t.evaluate(eval_dataset=StdlibText(4))["eval_loss"] for t in (fused, plain)]
    assert abs(evaluated[0] - evaluated[1]) < 1e-5
    predicted = [t.predict(StdlibText(2)).predictions for t in (fused, plain)]  # eval mode keeps the logits
    assert predicted[0].shape == predicted[1].shape and predicted[0].shape[-1] == VOCAB
    assert is_patched(fused.model)  # still patched: training mode (the Trainer sets it each step) uses it


def test_trainer_keeps_the_switch_when_the_optimizer_is_given_to_it(tmp_path):
    trainer = Trainer(model=tiny(), args=args(tmp_path, linear_cross_entropy=True), optim="adamw_8bit",
                      train_dataset=StdlibText(8))
    assert trainer.args.linear_cross_entropy and trainer.args.optim == "adamw_8bit" and is_patched(trainer.model)


def test_trainer_turns_it_on_by_default_where_nothing_needs_the_training_logits(tmp_path):
    assert is_patched(Trainer(model=tiny(), args=args(tmp_path), train_dataset=StdlibText(8)).model)
    assert is_patched(Trainer(model_init=lambda: tiny(), args=args(tmp_path), train_dataset=StdlibText(8)).model)
    assert not is_patched(Trainer(model=tiny(), args=args(tmp_path, linear_cross_entropy=False),
                                  train_dataset=StdlibText(8)).model)

    class OwnLoss(Trainer):
        def compute_loss(self, model, inputs, **kwargs):
            return super().compute_loss(model, inputs, **kwargs)

    assert not is_patched(OwnLoss(model=tiny(), args=args(tmp_path), train_dataset=StdlibText(8)).model)
    assert not is_patched(Trainer(model=tiny(), args=args(tmp_path), train_dataset=StdlibText(8),
                                  compute_loss_func=lambda outputs, labels, num_items_in_batch=None: 0).model)
    mezo = Trainer(model=tiny(), args=args(tmp_path, optim="mezo"), train_dataset=StdlibText(8))
    assert not is_patched(mezo.model)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert not is_patched(Trainer(model=gpt2, args=args(tmp_path), train_dataset=StdlibText(8)).model)


def test_trainer_patches_a_model_from_model_init(tmp_path):
    trainer = Trainer(model_init=lambda: tiny(), args=args(tmp_path, linear_cross_entropy=True),
                      train_dataset=StdlibText(8))
    assert is_patched(trainer.model)


def test_arguments_refuse_mezo_and_the_trainer_refuses_gpt2(tmp_path):
    with pytest.raises(ValueError, match="MeZO perturbs lm_head through its forward"):
        args(tmp_path, optim="mezo", linear_cross_entropy=True)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not one of them"):
        Trainer(model=gpt2, args=args(tmp_path, linear_cross_entropy=True), train_dataset=StdlibText(8))


def test_recipe_key():
    values = {"dataset": "python-stdlib", "stand_in": "tiny", "output_dir": "unused"}
    assert parse_recipe({**values, "linear_cross_entropy": True}).train.linear_cross_entropy is True
    assert parse_recipe(values).train.linear_cross_entropy is None  # the Trainer decides (on for this LLaMA)
    assert parse_recipe({**values, "linear_cross_entropy": False}).train.linear_cross_entropy is False
    assert TrainingArguments.__dataclass_fields__["linear_cross_entropy"].metadata["help"]


def test_trainer_in_bf16_mixed_precision(tmp_path):
    """Under autocast the patched loss takes the head's product in bf16, as the unpatched lm_head does."""
    plain = losses(train(tmp_path / "plain", bf16=True))
    fused = losses(train(tmp_path / "fused", bf16=True, linear_cross_entropy=True))
    assert len(fused) == 3
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-4, atol=1e-4)


def test_under_mezo_perturbation_the_head_still_runs():
    """MeZO perturbs lm_head by replacing its forward: a patched model must run it (so compute the logits, warned),
    or the head's perturbation would be skipped and its gradient estimate lost."""
    from lowmem.optim.perturb import ZOParameters

    model = tiny()
    zo = ZOParameters(model)
    with torch.no_grad(), zo.perturbed(5, 1e-2):
        reference = model(**batch()).loss
        patch_linear_cross_entropy(model)
        with pytest.warns(RuntimeWarning, match="replaced or hooked"):
            patched = model(**batch()).loss
    torch.testing.assert_close(patched, reference, rtol=0, atol=0)
    with torch.no_grad():
        unperturbed = model(**batch())
    assert unperturbed.logits is None and (unperturbed.loss - reference).abs() > 1e-4  # the shortcut again
