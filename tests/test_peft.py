"""A peft LoRA model trains through the lowmem Trainer with the dense rules; low-rank optimizers refuse it with a
message that says what they project and what to use instead."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from trainer_helpers import StdlibText, args, losses

from lowmem.example import tiny_llama
from lowmem.trainers import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def lora_llama():
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    return get_peft_model(tiny_llama(hidden=64, layers=2), config)


@pytest.mark.parametrize("optim,lr", [("adam_mini", 1e-2), ("came", 1e-3), ("adamw_8bit", 1e-2),
                                      ("adam_mini_layerwise", 1e-2)])
def test_lora_model_trains_with_dense_rules(tmp_path, optim, lr):
    model = lora_llama()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = Trainer(model=model, args=args(tmp_path, optim=optim, learning_rate=lr), train_dataset=StdlibText())
    trainer.train()
    logged = losses(trainer)
    assert logged[-1] < logged[0] - 0.2, logged
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    optimizer = trainer.layerwise_updates().optimizer if optim.endswith("_layerwise") else trainer.optimizer
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("optim", ["galore_adamw", "apollo_mini", "frugal", "galore+came+8bit"])
def test_low_rank_optimizers_explain_why_not_with_lora(tmp_path, optim):
    trainer = Trainer(model=lora_llama(), args=args(tmp_path, optim=optim), train_dataset=StdlibText(8))
    with pytest.raises(ValueError, match=r"LoRA-wrapped.*'base_model\.model\..*lora_A.*already low-rank.*dense rule"):
        trainer.train()
