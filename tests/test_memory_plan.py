"""The memory planner (lowmem.memory): exact optimizer-state bytes for every registered name, predicted peak within
10% of MemTracker's measurement on small LLaMAs, clear errors for a missing config."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowmem
from lowmem import memory
from lowmem.kernels import adam_8bit

TINY = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, tie_word_embeddings=False)


def _options(name):
    return {"rank": 8} if "rank" in lowmem.optim.registry.get_spec(name).options() else {}


@pytest.fixture
def eager_8bit():
    """The compiled 8-bit kernels keep the same state layout; skipping their compilation keeps the test fast."""
    adam_8bit.set_enabled(False)
    yield
    adam_8bit.set_enabled(True)


@pytest.mark.parametrize("name", lowmem.available_optimizers())
def test_state_bytes_exact(name, eager_8bit):
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY)
    optimizer = lowmem.create_optimizer(name, model, **_options(name))
    tokens = torch.randint(TINY.vocab_size, (2, 16))
    model(tokens, labels=tokens).loss.backward()
    optimizer.step()
    predicted = memory.optimizer_state_bytes(name, memory.meta_model(TINY), **_options(name))
    assert sum(predicted.values()) == optimizer.state_bytes()


def _llama(hidden, layers, vocab):
    return LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=vocab, tie_word_embeddings=False)


@pytest.mark.parametrize("config, name, batch, seq, ckpt", [
    (_llama(256, 4, 8000), "adamw", 2, 128, True),  # 7.3M params; peak in optimizer.step()
    (_llama(192, 3, 4000), "apollo_mini_layerwise", 1, 256, False),  # peak in backward
    (_llama(128, 2, 4000), "galore_adamw", 2, 128, False),
    (_llama(192, 3, 4000), "adamw_8bit", 1, 64, False),  # a chunked 8-bit update (lm_head > CHUNK_8BIT)
    (_llama(256, 4, 8000), "came_8bit", 2, 128, False),  # a whole 8-bit first moment dequantized to fp32
])
def test_peak_within_10_percent(config, name, batch, seq, ckpt, eager_8bit):
    measured = memory.measure_peak(config, name, batch, seq, ckpt, **_options(name))
    estimate = memory.peak_bytes(memory.meta_model(config), name, batch, seq, ckpt, **_options(name))
    assert sum(memory.optimizer_state_bytes(name, memory.meta_model(config), **_options(name)).values()) \
        == measured["state_bytes"]
    assert abs(estimate.total / measured["Total"] - 1) < 0.10, (estimate, measured)


def test_plan_table_and_recommendation():
    rows = memory.plan(dict(TINY.to_dict()), seq_len=64, batch_size=1, card_gib=1)
    assert all(r.fits for r in rows if not r.notes)
    text = memory.format_plan(rows, 1)
    assert "Recommended" in text and "adamw" in text


def test_missing_config_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        memory.load_config(tmp_path / "nope" / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        memory.load_config(tmp_path)


def test_config_from_dir(tmp_path):
    TINY.save_pretrained(tmp_path)
    assert memory.load_config(tmp_path).hidden_size == 64


def test_lowmem_plan_command(tmp_path, capsys):
    from lowmem import cli

    TINY.save_pretrained(tmp_path)
    assert cli.main(["plan", str(tmp_path / "config.json"), "--seq", "64", "--card-gib", "1"]) == 0
    out = capsys.readouterr().out
    assert "galore_adamw_8bit_layerwise" in out and "Recommended on a 1 GiB card" in out
    assert cli.main(["plan", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().err.startswith("lowmem: error: config file")
