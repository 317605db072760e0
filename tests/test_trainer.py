"""The real Hugging Face Trainer with lowmem optimizers by name: training, options reaching the optimizer,
transformers' names passing through, and users' mistakes failing when the arguments are built."""

import pytest
import torch

from lowmem.example import batches, stdlib_bytes, tiny_llama
from lowmem.optim import AdamW8bit, GaLoreAdamW, LowMemOptimizer
from lowmem.trainers import Trainer, TrainingArguments, parse_optim_args

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


class StdlibText(torch.utils.data.Dataset):
    """Byte-level 128-token windows of the standard library's source (the corpus of ``lowmem.example``)."""

    def __init__(self, n: int = 96):
        gen = torch.Generator().manual_seed(0)
        chunks = next(batches(stdlib_bytes(), batch=n, seq=128, generator=gen))
        self.rows = [{"input_ids": row, "labels": row} for row in chunks]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=20, learning_rate=3e-3,
                logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    return TrainingArguments(**{**base, **kw})


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("optim,optim_args", [
    ("galore_adamw", "rank=16, update_proj_gap=10, scale=0.25"),
    ("apollo_mini", None),
    ("frugal", None),
    ("adam_mini", None),
    ("came", "lr=1e-3"),
    ("adamw_8bit", None),
    ("galore+came+8bit", "rank=16, min_8bit_size=0"),
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
