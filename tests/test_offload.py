"""ZO2-style offloading: streamed blocks give the same training as plain MeZO with the same seeds (disk store on
the CPU), for every supported architecture, with a bounded number of blocks on the device; finding the blocks,
and errors that name the attribute to point at."""

import pytest
import torch
import transformers
from torch import nn

from lowmem.offload import find_decoder_layers
from lowmem.optim.zo import MeZO, pair_loss

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

TINY = dict(vocab_size=128, hidden_size=32, num_attention_heads=4, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**TINY, intermediate_size=64, num_hidden_layers=3,
                                              num_key_value_heads=2),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, intermediate_size=64, num_hidden_layers=3,
                                              num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**TINY, intermediate_size=64, num_hidden_layers=3,
                                                  num_key_value_heads=2),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=128, n_embd=32, n_head=4, n_layer=3, n_positions=64),
    "opt": lambda: transformers.OPTConfig(vocab_size=128, hidden_size=32, num_attention_heads=4, num_hidden_layers=3,
                                          ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=32),
}


def build(arch):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]())


def batch(seed):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def loss_of(model, inputs):
    return model(**inputs).loss


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_offloaded_mezo_equals_plain_mezo(arch, tmp_path):
    plain, offloaded = build(arch), build(arch)
    opt_plain = MeZO(plain, lr=1e-3, zo_eps=1e-2, weight_decay=0.1, seed=4)
    opt_off = MeZO(offloaded, lr=1e-3, zo_eps=1e-2, weight_decay=0.1, seed=4, offload="disk",
                   offload_dir=str(tmp_path / "blocks"))
    streamer = opt_off.streamer
    assert len(list((tmp_path / "blocks").glob("*.safetensors"))) == 3
    for step in range(3):
        inputs = batch(step)
        loss_plain = opt_plain.step(lambda inputs=inputs: loss_of(plain, inputs))
        loss_off = opt_off.step(lambda inputs=inputs: pair_loss(offloaded, inputs))
        assert float(loss_off) == pytest.approx(float(loss_plain), rel=1e-5)
        assert opt_off.last_projected_grad == pytest.approx(opt_plain.last_projected_grad, rel=1e-3, abs=1e-3)
    block_param = next(streamer.layers[0].parameters())
    assert block_param.numel() == 0  # offloaded between steps
    assert streamer.pending  # the last step's block updates wait for the next forward...
    with streamer.gathered():  # ... and are applied before anyone reads the weights
        for (name, p), q in zip(offloaded.named_parameters(), plain.parameters(), strict=True):
            assert torch.allclose(p, q, atol=1e-6), name
    assert not streamer.pending
    assert streamer.peak_resident_bytes <= 3 * max(streamer.block_bytes)


def test_ram_store_and_evaluation_see_the_updated_weights():
    plain, offloaded = build("llama"), build("llama")
    opt_plain = MeZO(plain, lr=1e-3, zo_eps=1e-2, seed=1)
    opt_off = MeZO(offloaded, lr=1e-3, zo_eps=1e-2, seed=1, offload="ram")
    inputs = batch(0)
    opt_plain.step(lambda: loss_of(plain, inputs))
    opt_off.step(lambda: pair_loss(offloaded, inputs))
    with torch.no_grad():  # an evaluation forward applies the deferred updates on the way
        assert torch.allclose(loss_of(offloaded, batch(5)), loss_of(plain, batch(5)), rtol=1e-5)
    opt_off.streamer.close()
    for p, q in zip(offloaded.parameters(), plain.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_the_closure_must_return_both_losses_when_offloaded():
    model = build("llama")
    opt = MeZO(model, offload="ram")
    with pytest.raises(TypeError, match="pair_loss"):
        opt.step(lambda: loss_of(model, batch(0)))


def test_decoder_layers_are_found_or_the_error_names_the_attribute():
    assert find_decoder_layers(build("llama"))[0] == "model.layers"
    assert find_decoder_layers(build("gpt2"))[0] == "transformer.h"
    assert find_decoder_layers(build("opt"))[0] == "model.decoder.layers"

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    with pytest.raises(ValueError, match=r"layers='<dotted attribute>'.*'stack'"):
        find_decoder_layers(Custom())
    assert find_decoder_layers(Custom(), "stack")[0] == "stack"
    with pytest.raises(ValueError, match=r"layers='model.blocks' does not exist.*'model.layers'"):
        find_decoder_layers(build("llama"), "model.blocks")
    with pytest.raises(ValueError, match="no nn.ModuleList"):
        MeZO(nn.Sequential(nn.Linear(4, 4)), offload="ram")
    with pytest.raises(ValueError, match="offload_dir"):
        MeZO(build("llama"), offload="disk")
    with pytest.raises(ValueError, match="only apply with offload"):
        MeZO(build("llama"), offload_dir="somewhere")


def test_trainer_with_offloaded_blocks_saves_the_real_weights(tmp_path):
    from safetensors.torch import load_file
    from trainer_helpers import StdlibText, args

    from lowmem.example import tiny_llama
    from lowmem.trainers import Trainer

    torch.manual_seed(0)
    model = tiny_llama(hidden=32, layers=2)
    a = args(tmp_path, optim="mezo", optim_args=f"zo_eps=1e-2, offload=disk, offload_dir={tmp_path / 'blocks'}",
             learning_rate=1e-3, max_steps=2)
    assert a.place_model_on_device is False  # the model stays where it was loaded; the optimizer streams it
    trainer = Trainer(model=model, args=a, train_dataset=StdlibText(16))
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    saved = load_file(str(tmp_path / "saved" / "model.safetensors"))
    streamer = trainer.zeroth_order().streamer
    with streamer.gathered():
        current = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert next(streamer.layers[0].parameters()).numel() == 0
    for name, value in current.items():
        assert value.numel() > 0 and torch.equal(saved[name], value), name
