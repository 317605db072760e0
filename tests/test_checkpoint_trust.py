"""Resume you can trust (``lowmem.trainers.checkpoints``): atomic checkpoints, auto-resume after a kill mid-save,
a manifest that stops a resume at a missing or altered file, and an optimizer check that stops a resume with another
optimizer or other options (only the learning rate may change; ``resume_optimizer=reset`` starts fresh)."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from trainer_helpers import StdlibText, args

from lowmem import cli
from lowmem.example import tiny_llama
from lowmem.trainers import Trainer
from lowmem.trainers.checkpoints import MANIFEST, STAGING, CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

K = 2
TESTS = Path(__file__).parent


def run(out, optim="galore_adamw", options=None, resume=None, steps=2 * K, lr=1e-3, **kw):
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, layers=2)
    a = args(out, optim=optim, optim_args={"rank": 8, "update_proj_gap": 2, **(options or {})}
             if optim.startswith(("galore", "apollo")) else options, max_steps=steps, save_strategy="steps",
             save_steps=K, learning_rate=lr, logging_steps=1, **kw)
    trainer = Trainer(model=model, args=a, train_dataset=StdlibText(64),
                      eval_dataset=StdlibText(8) if kw.get("eval_strategy") else None)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def same(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A galore_adamw run of 2K steps, checkpoints at K and 2K, and its final weights."""
    out = tmp_path_factory.mktemp("saved")
    model, _ = run(out)
    return out, model


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, target)
    return target


def test_a_checkpoint_is_written_whole_with_its_manifest(saved):
    out, _ = saved
    assert not (out / STAGING).exists()  # renamed into place, the staging folder removed
    checkpoint = out / f"checkpoint-{K}"
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    files = sorted(p.name for p in checkpoint.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == files
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "model.safetensors", "trainer_state.json"} <= set(files)
    entry = manifest["files"]["optimizer.pt"]
    assert entry["bytes"] == (checkpoint / "optimizer.pt").stat().st_size and len(entry["sha256"]) == 64
    assert manifest["optimizer"]["optim"] == "galore_adamw"
    assert manifest["optimizer"]["options"]["rank"] == 8 and manifest["optimizer"]["options"]["lr"] == 1e-3


@pytest.mark.parametrize("name,damage", [
    ("optimizer.pt", "rewrite"), ("model.safetensors", "rewrite"), ("optimizer.pt", "delete"),
    ("scheduler.pt", "delete"), ("rng_state.pth", "delete"), ("trainer_state.json", "truncate")])
def test_a_missing_or_altered_file_stops_the_resume_naming_it(saved, tmp_path, name, damage):
    checkpoint = copy_of(saved[0] / f"checkpoint-{K}", tmp_path)
    path = checkpoint / name
    if damage == "delete":
        path.unlink()
        problem = f"{name} is missing"
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
        problem = f"{name} has"
    else:  # 64 bytes rewritten (inverted) in the middle: the size is unchanged
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
        path.write_bytes(bytes(data))
        problem = f"{name} was altered since it was saved"
    with pytest.raises(CheckpointError, match=problem) as caught:
        run(tmp_path / "out", resume=str(checkpoint))
    assert "ignore_checksums=True" in str(caught.value)
    assert not (tmp_path / "out" / f"checkpoint-{K + K}").exists()  # no step ran


def test_ignore_checksums_loads_an_edited_checkpoint(saved, tmp_path):
    checkpoint = copy_of(saved[0] / f"checkpoint-{K}", tmp_path)
    (checkpoint / "trainer_state.json").write_text((checkpoint / "trainer_state.json").read_text() + "\n")
    model, trainer = run(tmp_path / "out", resume=str(checkpoint), ignore_checksums=True)
    assert trainer.state.global_step == 2 * K and same(model, saved[1])


@pytest.mark.parametrize("optim,options,named", [
    ("apollo_mini", None, "saved by optim='galore_adamw', this run has optim='apollo_mini'"),
    ("galore+came", None, "saved by optim='galore_adamw', this run has optim='galore+came'"),
    ("galore_adamw", {"rank": 4}, "rank=8 (now 4)"),
    ("galore_adamw", {"scale": 0.5}, "scale=0.25 (now 0.5)"),
    ("adamw_torch", None, "this run has optim='adamw_torch'"),
])
def test_another_optimizer_or_options_stop_the_resume(saved, tmp_path, optim, options, named):
    checkpoint = saved[0] / f"checkpoint-{K}"
    with pytest.raises(CheckpointError, match=re.escape(named)) as caught:
        run(tmp_path, optim=optim, options=options, resume=str(checkpoint))
    assert "resume_optimizer=reset" in str(caught.value)
    assert not any(tmp_path.iterdir())  # nothing trained, nothing saved


def test_weight_decay_is_not_silently_kept(saved, tmp_path):
    with pytest.raises(CheckpointError, match=r"weight_decay=0.0 \(now 0.1\)"):
        run(tmp_path, resume=str(saved[0] / f"checkpoint-{K}"), weight_decay=0.1)


def test_a_changed_learning_rate_takes_effect_on_resume(saved, tmp_path, capsys):
    """The loaded schedule (linear decay from 1e-3) continues at the new peak: half the rates from step K on."""
    _, straight = run(tmp_path / "a")
    _, resumed = run(tmp_path / "b", resume=str(saved[0] / f"checkpoint-{K}"), lr=5e-4)
    assert "learning_rate 0.001 -> 0.0005 on resume" in capsys.readouterr().err
    rates = {e["step"]: e["learning_rate"] for e in straight.state.log_history if "learning_rate" in e}
    new = {e["step"]: e["learning_rate"] for e in resumed.state.log_history if "learning_rate" in e}
    for step in range(K + 1, 2 * K + 1):
        assert new[step] == pytest.approx(rates[step] / 2, rel=1e-6)


def test_reset_starts_fresh_optimizer_state_from_the_saved_weights(saved, tmp_path, capsys):
    """Another optimizer from the galore checkpoint: its weights, step and schedule, and its own fresh state."""
    checkpoint = saved[0] / f"checkpoint-{K}"
    model, trainer = run(tmp_path, optim="apollo_mini", resume=str(checkpoint), resume_optimizer="reset",
                         steps=K + 1)
    assert "resume_optimizer=reset: fresh optimizer state" in capsys.readouterr().err
    assert trainer.state.global_step == K + 1
    optimizer = trainer._unwrapped_optimizer()
    steps = {int(s["step"]) for s in optimizer.state.values() if "step" in s}
    assert steps == {1}  # one step since the resume, not K + 1
    rates = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    assert rates[K + 1] == pytest.approx(1e-3 * (1 - K / (K + 1)), rel=1e-6)  # the schedule at step K of K + 1


def test_a_checkpoint_without_a_record_needs_consent(saved, tmp_path, capsys):
    checkpoint = copy_of(saved[0] / f"checkpoint-{K}", tmp_path)
    (checkpoint / MANIFEST).unlink()  # as transformers' Trainer or an older lowmem wrote it
    with pytest.raises(CheckpointError, match="does not record which optimizer saved its state"):
        run(tmp_path / "a", resume=str(checkpoint))
    model, _ = run(tmp_path / "b", resume=str(checkpoint), resume_optimizer="keep")
    assert "its files cannot be checked" in capsys.readouterr().err
    assert same(model, saved[1])


KILLED = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)  # as the tests run (conftest): the same sums, bit for bit
    sys.path.insert(0, {tests!r})
    from test_checkpoint_trust import run

    save = torch.save
    def save_then_die(obj, path, *a, **kw):  # the second checkpoint's optimizer state written, then SIGKILL
        save(obj, path, *a, **kw)
        if str(path).endswith("checkpoint-{second}/optimizer.pt"):
            os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save_then_die
    run({out!r}, steps={steps})
""")


def test_auto_resume_after_a_kill_mid_save_needs_no_cleaning(saved, tmp_path, capsys):
    """SIGKILL while the second checkpoint is being written: ``resume_from_checkpoint=True`` takes the first, says
    it skipped the interrupted save, and the run ends where an uninterrupted one does."""
    out = tmp_path / "out"
    script = KILLED.format(tests=str(TESTS), second=2 * K, out=str(out), steps=3 * K)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not (out / f"checkpoint-{2 * K}").exists() and (out / STAGING / f"checkpoint-{2 * K}").is_dir()
    capsys.readouterr()
    model, trainer = run(out, resume=True, steps=3 * K)
    err = capsys.readouterr().err
    assert f"resuming from {out / f'checkpoint-{K}'}, the newest complete checkpoint (skipped {STAGING}/" \
           f"checkpoint-{2 * K}: a save interrupted before it completed)" in err
    straight, _ = run(tmp_path / "straight", steps=3 * K)
    assert trainer.state.global_step == 3 * K and same(model, straight)
    assert not (out / STAGING).exists()  # the next save cleared it


def test_rotation_and_the_best_checkpoint_name_the_renamed_folders(tmp_path):
    """``save_total_limit`` and ``load_best_model_at_end`` see the checkpoints where they end up."""
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, layers=2)
    a = args(tmp_path, optim="adamw", max_steps=3 * K, save_strategy="steps", save_steps=K, eval_strategy="steps",
             eval_steps=K, save_total_limit=1, metric_for_best_model="loss", load_best_model_at_end=True)
    trainer = Trainer(model=model, args=a, train_dataset=StdlibText(64), eval_dataset=StdlibText(8))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.parent == tmp_path and best.is_dir() and (best / MANIFEST).is_file()
    checkpoints = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert len(checkpoints) <= 2 and f"checkpoint-{3 * K}" in checkpoints  # the limit, keeping the best
    saved_best = json.loads((tmp_path / f"checkpoint-{3 * K}" / "trainer_state.json").read_text())
    assert saved_best["best_model_checkpoint"] == str(best)


def test_resume_options_are_checked_in_a_recipe(tmp_path, capsys):
    base = ["train", "cpu-tiny", "stand_in=tiny", "cutoff_len=32", "max_bytes=100000", f"output_dir={tmp_path}"]
    assert cli.main([*base, "resume_optimizer=fresh"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lowmem: error: resume_optimizer='fresh': use one of check, reset, keep"]


def rates(trainer) -> dict:
    return {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}


def test_a_checkpoint_without_optimizer_state_resumes_with_any_optimizer(tmp_path):
    """``save_only_model``: nothing of the optimizer is loaded, so nothing is checked, and the new learning rate is
    the fresh schedule's (not scaled a second time)."""
    run(tmp_path / "a", save_only_model=True)
    checkpoint = tmp_path / "a" / f"checkpoint-{K}"
    assert not (checkpoint / "optimizer.pt").exists()
    _, trainer = run(tmp_path / "b", options={"rank": 4}, resume=str(checkpoint), lr=5e-4)
    assert rates(trainer)[K + 1] == pytest.approx(5e-4)  # transformers restarts the schedule: lambda(0) = 1
    _, trainer = run(tmp_path / "c", optim="apollo_mini", resume=str(checkpoint), resume_optimizer="reset")
    assert trainer.state.global_step == 2 * K


def test_a_new_learning_rate_with_a_schedule_it_cannot_scale_is_refused(saved, tmp_path):
    with pytest.raises(CheckpointError, match="not reduce_lr_on_plateau; resume with learning_rate=0.001"):
        run(tmp_path, resume=str(saved[0] / f"checkpoint-{K}"), lr=5e-4, lr_scheduler_type="reduce_lr_on_plateau",
            eval_strategy="steps", eval_steps=K)


def test_keep_still_applies_a_new_learning_rate(saved, tmp_path):
    _, straight = run(tmp_path / "a")
    _, resumed = run(tmp_path / "b", resume=str(saved[0] / f"checkpoint-{K}"), lr=5e-4, resume_optimizer="keep")
    assert rates(resumed)[K + 1] == pytest.approx(rates(straight)[K + 1] / 2, rel=1e-6)


def test_one_optimizer_spelled_another_way_resumes(saved, tmp_path):
    """``galore_adamw`` with ``layerwise=True`` is ``galore_adamw_layerwise``; a dtype is its name; an option the
    checkpoint does not record (added by a later release) counts as its default."""
    from lowmem.trainers.checkpoints import check_optimizer, optimizer_record, option_defaults

    a = args(tmp_path, optim="galore_adamw_layerwise", optim_args={"state_dtype": torch.bfloat16})
    b = args(tmp_path, optim="galore_adamw", optim_args={"layerwise": True, "state_dtype": "bf16"})
    saved_record, current = optimizer_record(a), optimizer_record(b)
    assert saved_record == current
    del saved_record["options"]["svd_method"]  # as a manifest written before the option existed
    assert check_optimizer(tmp_path, saved_record, current, True, True, option_defaults(b)) == []
    current["options"]["svd_method"] = "randomized"  # not the default: the state was made another way
    with pytest.raises(CheckpointError, match="svd_method='exact' \\(now 'randomized'\\)"):
        check_optimizer(tmp_path, saved_record, current, True, True, option_defaults(b))
