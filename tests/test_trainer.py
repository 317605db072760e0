"""The real Hugging Face Trainer with lowmem optimizers by name: training, options reaching the optimizer,
transformers' names passing through, and users' mistakes failing when the arguments are built."""

import copy

import pytest
import torch
import transformers
from trainer_helpers import StdlibText, args, losses

from lowmem.example import tiny_llama
from lowmem.optim import AdamW8bit, GaLoreAdamW, LowMemOptimizer
from lowmem.trainers import Trainer, TrainingArguments, parse_optim_args

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.mark.parametrize("optim,optim_args", [
    ("galore_adamw", "rank=16, update_proj_gap=10, scale=0.25"),
    ("apollo_mini", None),
    ("frugal", None),
    ("adam_mini", None),
    ("came", "lr=1e-3"),
    ("adamw_8bit", None),
    ("galore+came+8bit", "rank=16, min_8bit_size=0"),
    ("fira_adamw", "rank=16"),
    ("apollo_adamw", "rank=16"),
    ("adafactor", None),
    ("galore_adafactor", "rank=16"),
    ("frugal_svd", None),
])
def test_trainer_trains_a_tiny_llama_with_each_family(tmp_path, optim, optim_args):
    torch.manual_seed(0)
    trainer = Trainer(model=tiny_llama(), args=args(tmp_path, optim=optim, optim_args=optim_args),
                      train_dataset=StdlibText())
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      LowMemOptimizer)
    logged = losses(trainer)
    assert len(logged) == 4 and logged[-1] < logged[0] - 0.5, logged


@pytest.mark.parametrize("optim", ["galore_adamw_layerwise", "apollo_mini_layerwise"])
def test_layerwise_trains_with_accumulation_and_gradient_checkpointing(tmp_path, optim):
    torch.manual_seed(0)
    options = "rank=16, update_proj_gap=10" if optim.startswith("galore") else "update_proj_gap=10"
    trainer = Trainer(model=tiny_llama(), args=args(tmp_path, optim=optim, optim_args=options,
                                                    per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                                    gradient_checkpointing=True), train_dataset=StdlibText())
    trainer.train()
    logged = losses(trainer)
    assert len(logged) == 4 and logged[-1] < logged[0] - 0.5, logged
    assert all(p.grad is None for p in trainer.model.parameters())


def test_training_arguments_reach_the_optimizer(tmp_path):
    model = tiny_llama()
    a = args(tmp_path, optim="galore_adamw", optim_args="rank=8, scale=0.5, proj_type=reverse_std",
             optim_target_modules=["q_proj", "v_proj"], weight_decay=0.1, adam_beta1=0.8, adam_epsilon=1e-7)
    opt = Trainer(model=model, args=a, train_dataset=StdlibText(8)).create_optimizer()
    assert isinstance(opt, GaLoreAdamW)
    target, *others = opt.param_groups
    assert len(target["params"]) == 2 * model.config.num_hidden_layers
    assert target["rank"] == 8 and target["scale"] == 0.5
    assert target["proj_type"] == "reverse_std"
    assert opt.defaults["betas"] == (0.8, 0.999) and opt.defaults["eps"] == 1e-7
    decays = {g["weight_decay"] for g in others}
    assert decays == {0.1, 0.0}  # unlike transformers' GaLore, decay and the no-decay group are kept


def test_optim_given_to_the_trainer_directly(tmp_path):
    trainer = Trainer(model=tiny_llama(), args=args(tmp_path), train_dataset=StdlibText(8), optim="adamw_8bit",
                      optim_args={"min_8bit_size": 4096})
    assert trainer.args.optim == "adamw_8bit" and trainer.args.max_steps == 20
    assert isinstance(trainer.create_optimizer(), AdamW8bit)


def test_transformers_names_pass_through(tmp_path):
    trainer = Trainer(model=tiny_llama(), args=args(tmp_path, optim="adamw_torch"), train_dataset=StdlibText(8))
    assert trainer.args.lowmem_optim is None
    assert type(trainer.create_optimizer()) is torch.optim.AdamW


def test_optim_args_strings_are_read_as_python_values():
    assert parse_optim_args("rank=64, update_proj_gap=100, scale=0.25, proj_type=std, betas=(0.9, 0.95)") == dict(
        rank=64, update_proj_gap=100, scale=0.25, proj_type="std", betas=(0.9, 0.95))
    assert parse_optim_args(None) == {} and parse_optim_args({"rank": 4}) == {"rank": 4}
    with pytest.raises(ValueError, match="'rank' is not key=value"):
        parse_optim_args("rank, scale=1")


def test_mistakes_fail_when_the_arguments_are_built(tmp_path):
    with pytest.raises(ValueError, match=r"unknown optimizer 'galor_adamw'.*Did you mean 'galore_adamw'"):
        args(tmp_path, optim="galor_adamw")
    with pytest.raises(ValueError, match=r"optim_args='rnk=8'.*no option 'rnk'.*Did you mean 'rank'"):
        args(tmp_path, optim="galore_adamw", optim_args="rnk=8")
    with pytest.raises(ValueError, match=r"unknown rule 'cam'"):
        args(tmp_path, optim="galore+cam")
    with pytest.raises(ValueError, match=r"projects nothing, so optim_target_modules does not apply"):
        args(tmp_path, optim="came", optim_target_modules=["q_proj"])


def test_targets_matching_nothing_fail_before_training(tmp_path):
    trainer = Trainer(model=tiny_llama(), args=args(tmp_path, optim="galore_adamw", optim_args="rank=8",
                                                    optim_target_modules=["conv"]), train_dataset=StdlibText(8))
    with pytest.raises(ValueError, match="matched no trainable nn.Linear"):
        trainer.train()


def train_copy(tmp_path, model, optim, **kw):
    model = copy.deepcopy(model)
    a = args(tmp_path, optim=optim, max_steps=6, logging_steps=1, gradient_accumulation_steps=2, **kw)
    trainer = Trainer(model=model, args=a, train_dataset=StdlibText(64))
    trainer.train()
    return model, trainer


@pytest.mark.parametrize("optim,optim_args", [("galore_adamw", "rank=8, update_proj_gap=2"), ("adam_mini", None)])
def test_layerwise_trainer_with_accumulation_equals_the_plain_update(tmp_path, optim, optim_args):
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, layers=2)
    # max_grad_norm=inf clips nothing but makes every transformers version log the plain run's grad_norm
    # (4.57 logs it only when max_grad_norm > 0, 5.x always).
    plain, t_plain = train_copy(tmp_path / "a", model, optim, optim_args=optim_args, max_grad_norm=float("inf"))
    layerwise, t_layer = train_copy(tmp_path / "b", model, optim + "_layerwise", optim_args=optim_args)
    assert t_layer.args.max_grad_norm == 0  # layer-wise cannot clip: its default is 0
    for p, q in zip(plain.parameters(), layerwise.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    # One schedule drives every group (no per-parameter schedulers), and it logs like the plain run.
    optimizer = t_layer.layerwise_updates().optimizer
    assert t_layer.lr_scheduler.optimizer.param_groups is optimizer.param_groups
    assert {g["lr"] for g in optimizer.param_groups} == {t_layer.lr_scheduler.get_last_lr()[0]}
    logged = [{k: e[k] for k in ("learning_rate", "grad_norm")} for e in t_layer.state.log_history if "loss" in e]
    plain_logged = [{k: e[k] for k in ("learning_rate", "grad_norm")} for e in t_plain.state.log_history
                    if "loss" in e]
    assert len(logged) == 6 and all(e["grad_norm"] > 0 for e in logged)
    assert [e["learning_rate"] for e in logged] == [e["learning_rate"] for e in plain_logged]
    if optim == "adam_mini":  # no projection: the logged norm is the full summed gradient's
        assert [e["grad_norm"] for e in logged] == pytest.approx([e["grad_norm"] for e in plain_logged], rel=1e-5)


def test_transformers_layerwise_names_get_lowmem(tmp_path):
    a = args(tmp_path, optim="galore_adamw_layerwise", optim_args="rank=8")
    assert a.lowmem_optim == "galore_adamw_layerwise"
    opt = Trainer(model=tiny_llama(hidden=64, layers=1), args=a, train_dataset=StdlibText(8)).create_optimizer()
    assert isinstance(opt, GaLoreAdamW) and opt.layerwise is not None


def test_layerwise_mistakes_fail_when_the_arguments_are_built(tmp_path):
    with pytest.raises(ValueError, match=r"max_grad_norm=1.0 cannot clip by the global norm.*max_grad_norm=0"):
        args(tmp_path, optim="galore_adamw_layerwise", max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"cannot clip"):
        args(tmp_path, optim="came", optim_args="layerwise=True", max_grad_norm=0.5)
    with pytest.raises(ValueError, match=r"fp16.*Use bf16=True"):
        args(tmp_path, optim="adamw_layerwise", fp16=True)
    with pytest.raises(ValueError, match=r"layerwise_accumulation='sum'"):
        args(tmp_path, optim="galore_adamw_layerwise", optim_args="layerwise_accumulation=sum")
    # A plain transformers TrainingArguments with its default max_grad_norm still works with a layer-wise name.
    plain = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = Trainer(model=tiny_llama(hidden=64, layers=1), args=plain, optim="apollo_mini_layerwise")
    assert trainer.args.max_grad_norm == 0


def test_command_line_takes_every_lowmem_name(tmp_path):
    """HfArgumentParser would restrict --optim to transformers' enum; lowmem's field takes any name."""
    parser = transformers.HfArgumentParser(TrainingArguments)
    common = ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none"]
    for name, layerwise in [("galore+came+8bit", False), ("apollo_mini_layerwise", True), ("adamw_torch", False)]:
        (parsed,) = parser.parse_args_into_dataclasses([*common, "--optim", name])
        assert parsed.max_grad_norm == (0.0 if layerwise else 1.0)
        assert parsed.lowmem_optim == (None if name == "adamw_torch" else name)
    (parsed,) = parser.parse_args_into_dataclasses([*common, "--optim", "galore_adamw", "--optim_args",
                                                    "rank=8, scale=0.5"])
    assert parsed.lowmem_options()["rank"] == 8
