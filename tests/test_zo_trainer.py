"""MeZO through the real Hugging Face Trainer (``optim="mezo"``): it trains, gradient accumulation averages the
micro-batches, a resumed run equals an uninterrupted one, and what ZO cannot honour fails when the arguments are
built."""

import pytest
import torch
from trainer_helpers import StdlibText, args, losses

from lowmem.example import tiny_llama
from lowmem.optim import MeZO
from lowmem.trainers import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def mezo_run(tmp_path, steps=4, resume=None, **kw):
    torch.manual_seed(0)
    model = tiny_llama(hidden=32, layers=1)
    start = [p.detach().clone() for p in model.parameters()]
    a = args(tmp_path, optim="mezo", optim_args="zo_eps=1e-2, seed=3", learning_rate=1e-3, max_steps=steps,
             logging_steps=1, lr_scheduler_type="linear", **kw)
    trainer = Trainer(model=model, args=a, train_dataset=StdlibText(32))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, start


def test_trainer_runs_mezo_and_logs_the_projected_gradient(tmp_path):
    model, trainer, start = mezo_run(tmp_path)
    assert isinstance(trainer.zeroth_order(), MeZO)
    assert trainer.args.max_grad_norm == 0
    logged = losses(trainer)
    assert len(logged) == 4 and all(3.0 < loss < 7.0 for loss in logged)
    assert all("projected_grad" in e for e in trainer.state.log_history if "loss" in e)
    assert not any("grad_norm" in e for e in trainer.state.log_history)  # MeZO forms no gradient to take a norm of
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True))
    # the scheduler drives MeZO's learning rate (linear decay to 0 over 4 steps)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_accumulated_micro_batches_equal_one_batch_of_their_size(tmp_path):
    one, _, _ = mezo_run(tmp_path / "a", steps=2, per_device_train_batch_size=4)
    two, _, _ = mezo_run(tmp_path / "b", steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight, _, _ = mezo_run(tmp_path / "a", steps=4, save_strategy="steps", save_steps=2)
    resumed, trainer, _ = mezo_run(tmp_path / "b", steps=4, resume=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_what_zeroth_order_cannot_honour_fails_when_the_arguments_are_built(tmp_path):
    with pytest.raises(ValueError, match=r"computes no gradients.*max_grad_norm=0"):
        args(tmp_path, optim="mezo", max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"fp16.*bf16=True"):
        args(tmp_path, optim="mezo", fp16=True)
    with pytest.raises(ValueError, match=r"no option 'rank'"):
        args(tmp_path, optim="mezo", optim_args="rank=8")
    with pytest.raises(ValueError, match=r"projects nothing"):
        args(tmp_path, optim="mezo", optim_target_modules=["attn"])
    with pytest.raises(ValueError, match=r"no layer-wise form"):
        args(tmp_path, optim="mezo_layerwise")
