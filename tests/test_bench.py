"""lowmem.bench: every reference is built with lowmem's settings (it steps like lowmem's optimizer), state bytes are
counted from the real tensors (subclasses, projector objects, shared tables once), the quality loop trains and
refuses NaN, and ``lowmem bench`` prints its tables."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowmem
from lowmem import cli
from lowmem.bench import options_for, quality, state, timing
from lowmem.bench.references import REFERENCES, reference

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")

CONFIG = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=300, tie_word_embeddings=False)
#: torchao is in the bench extra (not a test dependency); galore-torch's 8-bit GaLore calls CUDA.
CPU_REFERENCES = [key for key in REFERENCES if key not in ("adamw_8bit:torchao", "galore_adamw_8bit")]


def _pair():
    torch.manual_seed(0)
    ours, ref = LlamaForCausalLM(CONFIG), LlamaForCausalLM(CONFIG)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("key", CPU_REFERENCES)
def test_reference_steps_like_lowmem(key):
    """Built from lowmem's resolved param groups, the reference makes the same updates (to float rounding; the 8-bit
    quantizers round near-ties differently (tests/test_parity_8bit.py), so there the mean difference is within 5%
    of the mean change). Muon's Newton-Schulz runs in bf16: AdamW's last-bit differences from torch's reach the
    matrices' gradients through the model and flip bf16 roundings, so it takes the same check (alone, on fixed
    gradients, it is bit-identical: tests/test_parity_muon.py)."""
    name = key.split(":")[0]
    model, ref_model = _pair()
    start = [p.detach().clone() for p in model.parameters()]
    options = options_for(name, rank=8)
    ours, ref = lowmem.create_optimizer(name, model, **options), reference(key, ref_model, **options)
    tokens = torch.randint(CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for m, opt in ((model, ours), (ref_model, ref)):
            m(tokens, labels=tokens).loss.backward()
            opt.step()
            opt.zero_grad()
    for p0, p, q in zip(start, model.parameters(), ref_model.parameters(), strict=True):
        if "8bit" in name or name == "muon":
            assert (p - q).abs().mean() <= 0.05 * (p - p0).abs().mean(), key
        else:
            assert (p - q).abs().max() <= 1e-5 * p0.abs().max() + 1e-7, key


def test_reference_needs_its_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "came_pytorch", None)
    with pytest.raises(ImportError, match=r"pip install 'lowmem\[bench\]'"):
        reference("came", LlamaForCausalLM(CONFIG))


def test_tensor_bytes_counts_storages_objects_and_subclasses():
    base = torch.zeros(100)

    class Projector:  # galore-torch keeps its matrix on an object in the state
        def __init__(self):
            self.ortho_matrix = torch.zeros(10, 4)[:, :2]  # a slice: the whole storage stays alive

    states = {"a": {"exp_avg": base, "view": base[:10], "projector": Projector(), "step": 3}}
    assert state.tensor_bytes(states) == 400 + 160


def test_state_rows_match_the_formula_and_the_references():
    config = dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                  num_attention_heads=4, vocab_size=300, tie_word_embeddings=False)
    names = ["adamw", "adam_mini", "came", "apollo_mini", "galore_came_8bit", "frugal"]
    rows = state.state_rows(config, names, lambda n: options_for(n, rank=8))
    for row in rows:
        assert row.ours == row.formula > 0, row
    refs = {row.name: row.references for row in rows}
    assert refs["adamw"][0][0] == "torch.optim.AdamW" and abs(refs["adamw"][0][1] / rows[0].ours - 1) < 1e-3  # + step
    assert refs["adam_mini"][0][1] == rows[1].ours and refs["frugal"] == []
    assert "per projected weight" in state.formula_text("galore_came_8bit")
    assert state.split_name("galore_came_8bit") == ("galore", "came", "8bit")
    assert state.split_name("adam_mini") == ("none", "adam_mini", "fp32")


def test_interleaved_timing_reports_ratio_and_range():
    calls = []
    result = timing.interleaved(lambda: calls.append("a"), lambda: calls.append("b"), repeats=3, min_block_s=0.001)
    assert result.blocks == 3 and result.low <= result.ratio <= result.high and calls.count("a") == calls.count("b")


def test_quality_training_records_losses_and_refuses_nan():
    blocks = torch.randint(300, (40, 16), generator=torch.Generator().manual_seed(0))
    corpus = quality.Corpus(blocks[:32], blocks[32:], 300, (1, 1))
    make = lambda model, lr: lowmem.create_optimizer("adamw", model, lr=lr)  # noqa: E731
    run = quality.train("adamw", make, corpus, steps=4, batch=2, lr=1e-2, eval_points=2)
    assert [s for s, _ in run.eval_loss] == [2, 4] and len(run.train_loss) == 4 and run.state_bytes > 0
    def diverging(model, lr):  # a NaN rate is refused when the optimizer is built, so set it afterwards
        optimizer = lowmem.create_optimizer("adamw", model, lr=lr)
        for group in optimizer.param_groups:
            group["lr"] = float("nan")
        return optimizer

    with pytest.raises(FloatingPointError, match="the loss is nan"):
        quality.train("bad", diverging, corpus, steps=3, batch=2, lr=1e-2)


def test_suite_report_has_both_tables():
    from lowmem.bench import report, suite

    result = suite(layers=1, vocab=512, rank=16, names=["adamw", "galore_adamw", "frugal"],
                   timed=("adamw", "galore_adamw"), repeats=1, min_block_s=0.01, progress=lambda line: None)
    text = report(result)
    assert "| galore_adamw | " in text and "galore_torch.GaLoreAdamW" in text and "ours / ref" in text
    assert [(name, label) for name, label, _ in result.timings] == [("adamw", "torch.optim.AdamW"),
                                                                    ("galore_adamw", "galore_torch.GaLoreAdamW")]
    assert all(t.ratio > 0 for _, _, t in result.timings)


def test_lowmem_bench_command_without_references(capsys):
    assert cli.main(["bench", "--layers", "1", "--vocab", "512", "--no-references"]) == 0
    out = capsys.readouterr().out
    assert "| came_8bit | " in out and "| adamw | 8.000 | 8.000 |" in out
