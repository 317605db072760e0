"""Resume through the Trainer's own ``weights_only=True`` loader, for every registered optimizer (and layer-wise
ones with gradient accumulation): save at step k, resume, and step 2k equals an uninterrupted run bit for bit."""

import pytest
import torch
from trainer_helpers import StdlibText, args, small_options

from lowmem.example import tiny_llama
from lowmem.optim import available_optimizers
from lowmem.trainers import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

K = 3


def run(tmp_path, name, resume=None, **kw):
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, layers=2)
    options = {**small_options(name), **kw.pop("options", {})}
    a = args(tmp_path, optim=name, optim_args=options, max_steps=2 * K, save_strategy="steps",
             save_steps=K, learning_rate=1e-3, logging_steps=1, **kw)
    trainer = Trainer(model=model, args=a, train_dataset=StdlibText(64))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def assert_same_parameters(a, b):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


CASES = [(name, {}) for name in available_optimizers()] + [
    ("galore+adam_mini", {}),
    ("apollo+came+bf16", {}),
    ("galore_adamw_layerwise", dict(gradient_accumulation_steps=2)),
    ("apollo_mini_layerwise", dict(gradient_accumulation_steps=2)),
    ("frugal_layerwise", {}),
    ("adam_mini_8bit_layerwise", {}),
    ("muon_layerwise", dict(gradient_accumulation_steps=2)),  # one matrix's Newton-Schulz inside backward
    ("galore+muon", {}),  # Newton-Schulz on the projected r x n momentum
    # the int8 1.1B configuration: per-row second moments of the embedding and head (head's m in 8 bits)
    ("apollo_mini_layerwise",
     dict(options=dict(dense_rule="adam_mini", dense_state_dtype="8bit", weight_dtype="int8"))),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] + ("-dense_rule" if "options" in c[1] else "") for c in CASES])
def test_resume_matches_an_uninterrupted_run(tmp_path, name, kw):
    straight, _ = run(tmp_path / "a", name, **kw)
    resumed, trainer = run(tmp_path / "b", name, resume=str(tmp_path / "a" / f"checkpoint-{K}"), **kw)
    assert trainer.state.global_step == 2 * K
    assert_same_parameters(straight, resumed)


def test_resume_without_the_optimizer_state_differs(tmp_path):
    """The check above can fail: drop optimizer.pt (past the manifest's check) and the resumed run goes elsewhere."""
    straight, _ = run(tmp_path / "a", "galore_adamw_layerwise")
    (tmp_path / "a" / f"checkpoint-{K}" / "optimizer.pt").unlink()
    resumed, _ = run(tmp_path / "b", "galore_adamw_layerwise", resume=str(tmp_path / "a" / f"checkpoint-{K}"),
                     ignore_checksums=True)
    assert any(not torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters(), strict=True))


def test_layerwise_checkpoint_holds_every_moment_and_the_schedule(tmp_path):
    _, trainer = run(tmp_path, "galore_adamw_layerwise")
    checkpoint = tmp_path / f"checkpoint-{K}"
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    trainable = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    assert len(optimizer["state"]) == trainable
    assert all("exp_avg" in s for s in optimizer["state"].values())
    scheduler = torch.load(checkpoint / "scheduler.pt", weights_only=True)
    assert scheduler["last_epoch"] == K and len(scheduler["base_lrs"]) == len(optimizer["param_groups"])
