"""Through the Trainer: a NaN gradient is dropped before clipping and logged, and the GaLore / APOLLO snippets of the
transformers documentation run unchanged with lowmem's ``TrainingArguments`` on a small model."""

import pytest
import torch
import transformers
from trainer_helpers import StdlibText, args, losses

from lowmem.example import tiny_llama
from lowmem.trainers import Trainer, TrainingArguments

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

BAD_STEP = 2  # 0-based global step whose gradient of one weight is poisoned


class Poison(transformers.TrainerCallback):
    """During step ``BAD_STEP`` the weight's gradient is all NaN (``mode="nan"``) or absent (``mode="none"``)."""

    def __init__(self, weight, mode):
        self.weight, self.mode, self.handle = weight, mode, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == BAD_STEP:
            if self.mode == "nan":
                self.handle = self.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
            else:
                self.weight.requires_grad_(False)

    def on_step_end(self, args, state, control, **kwargs):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.weight.requires_grad_(True)


@pytest.mark.parametrize("optim", ["galore_adamw", "came_8bit", "apollo_mini_layerwise"])
def test_a_nan_gradient_is_dropped_before_clipping_and_logged(tmp_path, optim):
    """With clipping on (max_grad_norm=1) and two micro-batches per step, the run with one NaN gradient equals the run
    where that weight had no gradient in that step: the NaN reached neither the global norm nor the other weights."""
    def run(mode):
        torch.manual_seed(0)
        model = tiny_llama()
        weight = model.model.layers[0].mlp.up_proj.weight
        layerwise = optim.endswith("_layerwise")
        trainer = Trainer(model=model, args=args(tmp_path / mode, optim=optim, optim_args="rank=8, update_proj_gap=2"
                                                 if optim == "galore_adamw" else None, max_steps=5, logging_steps=1,
                                                 per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                                 max_grad_norm=0.0 if layerwise else 1.0),
                          train_dataset=StdlibText(32), callbacks=[Poison(weight, mode)])
        trainer.train()
        return model, trainer

    poisoned, trainer = run("nan")
    clean, _ = run("none")
    for (name, p), q in zip(poisoned.named_parameters(), clean.parameters(), strict=True):
        assert torch.equal(p, q), name
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry.get("skipped_nonfinite", 0) for entry in logs] == [0, 0, 1, 1, 1]
    assert all(entry["grad_norm"] < float("inf") for entry in logs)


#: (optim, optim_args) as the transformers documentation writes them (Trainer and optimizers pages), all with
#: ``optim_target_modules=[r".*.attn.*", r".*.mlp.*"]``; the default ranks (128) exceed this model's 64 columns.
DOCS_SNIPPETS = [
    ("galore_adamw", None),
    ("galore_adamw", "rank=64, update_proj_gap=100, scale=0.10"),
    ("galore_adamw_8bit", None),
    ("galore_adafactor", None),
    ("galore_adamw_layerwise", None),
    ("apollo_adamw", None),
    ("apollo_adamw", "proj=random,rank=1,scale=128.0,scale_type=tensor,update_proj_gap=200"),
    ("apollo_adamw_layerwise", None),
]


@pytest.mark.parametrize("optim,optim_args", DOCS_SNIPPETS)
def test_the_transformers_docs_snippets_run(tmp_path, optim, optim_args):
    torch.manual_seed(0)
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    training_args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                                      optim=optim, optim_args=optim_args,
                                      optim_target_modules=[r".*.attn.*", r".*.mlp.*"], logging_steps=2,
                                      save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=StdlibText(16))
    trainer.train()
    assert all(loss < float("inf") for loss in losses(trainer))
    moved = [name for (name, p), q in zip(model.named_parameters(), before, strict=True) if not torch.equal(p, q)]
    assert any("self_attn" in n for n in moved) and any("mlp" in n for n in moved), moved
