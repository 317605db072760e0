"""Offloaded optimizer states (``offload_states=True``): the host side of streaming a parameter's states through
the device (tested on CPU tensors), the option's plumbing, and the planner. The device path itself runs only where a
GPU is (``tests/test_kernels_cuda.py``)."""

import pytest
import torch

import lowmem
from lowmem.example import tiny_llama
from lowmem.optim.offload_states import back_to_host, offloads, to_device


def test_back_to_host_writes_into_the_existing_buffers_and_adds_new_ones():
    host = {"step": 3, "exp_avg": torch.zeros(4), "gone": torch.ones(2)}
    buffer = host["exp_avg"]
    working = to_device(host, torch.device("cpu"))
    working.pop("gone")
    working["exp_avg"] = working["exp_avg"] + 1
    working["exp_avg_sq"] = torch.full((2, 2), 5.0)
    working["step"] = 4
    back_to_host(host, working)
    assert host["exp_avg"] is buffer and torch.equal(buffer, torch.ones(4))
    assert torch.equal(host["exp_avg_sq"], torch.full((2, 2), 5.0)) and host["exp_avg_sq"].device.type == "cpu"
    assert host["step"] == 4 and "gone" not in host


def test_cpu_parameters_are_updated_in_place_as_without_offloading():
    results = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = tiny_llama(hidden=64, layers=1)
        optimizer = lowmem.create_optimizer("galore_adamw_8bit", model, rank=8, offload_states=offload)
        assert all(g.get("state_device") == ("cpu" if offload else None) for g in optimizer.param_groups)
        assert not any(offloads(g, p) for g in optimizer.param_groups for p in g["params"])  # CPU: nothing to move
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_offloaded_gpu_parameters_are_recognized():
    group = {"state_device": "cpu"}
    assert offloads(group, torch.empty(1, device="meta"))
    assert not offloads({}, torch.empty(1, device="meta"))


def test_planner_keeps_one_parameters_states_on_the_device():
    from lowmem.memory import meta_model, optimizer_state_bytes, peak_bytes

    model = tiny_llama(hidden=64, layers=2)
    meta = meta_model(model.config)
    whole = peak_bytes(meta, "adamw_layerwise", 1, 32)
    offloaded = peak_bytes(meta, "adamw_layerwise", 1, 32, offload_states=True)
    per_param = optimizer_state_bytes("adamw", meta)
    assert whole.states == sum(per_param.values())
    assert offloaded.states == max(per_param.values())  # every tensor under CHUNK elements: whole states
    from transformers import LlamaConfig

    from lowmem.kernels.codes_8bit import CHUNK

    big = meta_model(LlamaConfig(vocab_size=CHUNK // 16, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4))
    chunked = peak_bytes(big, "adamw_layerwise", 1, 32, offload_states=True)
    embedding = optimizer_state_bytes("adamw", big)["model.embed_tokens.weight"]
    assert chunked.states == embedding // 4  # 4 chunks' worth: one chunk's states on the device at a time


def test_offloading_sharded_states_is_refused(monkeypatch):
    from lowmem.optim import registry

    monkeypatch.setattr(registry, "is_sharded", lambda p: True)
    with pytest.raises(ValueError, match="CPUOffloadPolicy"):
        lowmem.create_optimizer("adamw", tiny_llama(hidden=64, layers=1), offload_states=True)


@pytest.mark.parametrize("name", ["galore_adamw_8bit", "adamw_layerwise", "adamw_8bit_layerwise", "apollo_mini"])
def test_streaming_through_a_working_copy_trains_the_same(monkeypatch, name):
    """The device path with copies: each update works on copies of the states (as a GPU's would be) and stores them
    back, whole or a chunk at a time (the embedding and head here exceed a chunk). Same weights and states as
    updating the states in place."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowmem.kernels.codes_8bit import CHUNK
    from lowmem.optim import compose

    def run(offload: bool):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=CHUNK // 32 + 3, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4))
        opts = {"rank": 8} if "galore" in name else {}
        optimizer = lowmem.create_optimizer(name, model, lr=1e-3, offload_states=offload, **opts)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return model, optimizer

    plain_model, plain = run(False)
    copies = []

    def to_copies(state, device):
        copies.append(1)
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}

    monkeypatch.setattr(compose, "offloads", lambda group, p: group.get("state_device") == "cpu")
    monkeypatch.setattr(compose, "to_device", to_copies)
    model, optimizer = run(True)
    assert copies  # the streaming path ran
    for a, b in zip(model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), plain_model.parameters(), strict=True):
        for key, value in plain.state[q].items():
            other = optimizer.state[p][key]
            assert torch.equal(other, value) if torch.is_tensor(value) else other == value, key
