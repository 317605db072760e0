"""BAdam (``create_optimizer("badam", model)``) against the ``badam`` package's ``BlockOptimizer`` wrapping
``torch.optim.AdamW``: the same layer trains at every step (``requires_grad``), for every switch mode, and the weights
follow step for step on the same gradients (fp32, and bf16 through the fp32 master copies); a checkpoint resumes the
block and its schedule."""

import contextlib
import copy
import io

import pytest
import torch

import lowmem
from lowmem.example import tiny_llama

badam = pytest.importorskip("badam")  # a test dependency (pyproject [test]); skipped only outside that install

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _quiet(call, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):  # the reference prints every switch
        return call(*args, **kwargs)


def _pair(mode, start, dtype, interval, weight_decay=0.0):
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, layers=3).to(dtype)
    reference = copy.deepcopy(model)
    torch.manual_seed(7)  # random mode: both draw the block order from the global generator
    ours = lowmem.create_optimizer("badam", model, lr=1e-2, weight_decay=weight_decay, switch_interval=interval,
                                   switch_mode=mode, start_block=start)
    torch.manual_seed(7)
    theirs = _quiet(badam.BlockOptimizer, torch.optim.AdamW(reference.parameters(), lr=1e-2,
                                                            weight_decay=weight_decay),
                    list(reference.named_parameters()), switch_block_every=interval, switch_mode=mode,
                    start_block=start, verbose=0)
    return model, ours, reference, theirs


def _own_rng(owner, call, *args):
    """``call(*args)`` with the global generator where ``owner`` left it (as if it ran alone from the same seed)."""
    outside = torch.get_rng_state()
    torch.set_rng_state(getattr(owner, "_test_rng", outside))
    try:
        call(*args)
    finally:
        owner._test_rng = torch.get_rng_state()
        torch.set_rng_state(outside)


def _step(step, model, optimizer, reference, reference_optimizer):
    """The same random gradient on every trainable tensor of both models, then one step of each."""
    gen = torch.Generator().manual_seed(step)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.requires_grad == q.requires_grad
        if p.requires_grad:
            grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.grad, q.grad = grad.clone(), grad.clone()
    _own_rng(optimizer, optimizer.step)  # random mode: each draws its next round from its own generator state
    _own_rng(reference_optimizer, _quiet, reference_optimizer.step)
    optimizer.zero_grad()
    reference_optimizer.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode,start", [("ascending", None), ("descending", None), ("random", None), ("fixed", 1),
                                        ("ascending", 2)])
def test_badam_follows_the_reference_step_for_step(mode, start, dtype):
    model, ours, reference, theirs = _pair(mode, start, dtype, interval=3, weight_decay=0.1)
    trained = set()
    for step in range(11):
        _step(step, model, ours, reference, theirs)
        trained |= {n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad}
        for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            if dtype == torch.float32:
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
            else:  # the fp32 masters agree to fp32 rounding; a bf16 copy then rounds one ulp apart, rarely, and a
                # block trained again starts from those copies
                a, b = p.float(), q.float()
                assert (a - b).abs().max() <= 2 ** -7 * max(a.abs().max(), b.abs().max()), name
                assert (a != b).float().mean() < 0.01, name
    assert trained == ({"1"} if mode == "fixed" else {"0", "1", "2"})
    embedding = model.get_input_embeddings().weight
    assert not embedding.requires_grad and not model.lm_head.weight.requires_grad


def test_only_one_layer_holds_gradients_and_states():
    model, ours, _, _ = _pair("descending", None, torch.bfloat16, interval=3)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(n.startswith("model.layers.2.") for n in with_grad)  # descending: the last layer first
    ours.step()
    held = [p for p in model.parameters() if ours.state.get(p)]
    assert len(held) == len(with_grad)
    assert all(ours.state[p]["master"].dtype == torch.float32 for p in held)  # bf16 weights: fp32 masters
    from lowmem.memory import meta_model, optimizer_state_bytes

    planned = optimizer_state_bytes("badam", meta_model(model.config, torch.bfloat16))
    assert sum(planned.values()) == ours.state_bytes()  # the planner prices one layer's masters and moments


def test_a_checkpoint_resumes_the_block_and_its_schedule():
    model, ours, _, _ = _pair("random", None, torch.float32, interval=3)
    for step in range(4):
        _step(step, model, ours, copy.deepcopy(model), _Nothing())
    saved, weights = copy.deepcopy(ours.state_dict()), copy.deepcopy(model.state_dict())
    rng = ours._test_rng.clone()  # the Trainer saves the generator's state with a checkpoint and restores it
    expected = _run_on(model, ours, range(4, 10))
    torch.manual_seed(123)  # a fresh process: another random draw at construction
    fresh = tiny_llama(hidden=64, layers=3)
    fresh.load_state_dict(weights)
    resumed = lowmem.create_optimizer("badam", fresh, lr=1e-2, switch_interval=3, switch_mode="random")
    resumed.load_state_dict(saved)
    resumed._test_rng = rng
    assert _run_on(fresh, resumed, range(4, 10)) == expected


class _Nothing:
    def step(self):
        pass

    def zero_grad(self):
        pass


def _run_on(model, optimizer, steps) -> list:
    """The trained layer and a weight checksum after each of ``steps``."""
    seen = []
    for step in steps:
        _step(step, model, optimizer, copy.deepcopy(model), _Nothing())
        layers = sorted({n.split(".")[2] for n, p in model.named_parameters() if p.requires_grad})
        seen.append((layers, sum(p.double().sum().item() for p in model.parameters())))
    return seen


def test_through_the_trainer_with_checkpointing_the_first_block_trains(tmp_path):
    """Through lowmem's Trainer, with reentrant gradient checkpointing behind the frozen embedding: the first layer
    (ascending) gets its gradient and trains; nothing else moves."""
    from trainer_helpers import StdlibText, args

    from lowmem.trainers import Trainer

    torch.manual_seed(0)
    model = tiny_llama(hidden=64, layers=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=2, gradient_checkpointing=True, optim="badam",
                                             gradient_checkpointing_kwargs={"use_reentrant": True},
                                             optim_args="switch_mode='ascending', switch_interval=50"),
                      train_dataset=StdlibText(16))
    trainer.train()
    moved = {n.split(".")[2] if ".layers." in n else n for n, p in model.named_parameters()
             if not torch.equal(p, before[n])}
    assert moved == {"0"}


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="switch_mode='fixed' trains one block: give start_block"):
        lowmem.create_optimizer("badam", tiny_llama(), switch_mode="fixed")
    with pytest.raises(ValueError, match="switch_interval=0"):
        lowmem.create_optimizer("badam", tiny_llama(), switch_interval=0)
    with pytest.raises(ValueError, match="start_block=9: the model has blocks 0 to 3"):
        lowmem.create_optimizer("badam", tiny_llama(), start_block=9)
    with pytest.raises(ValueError, match="layerwise=True"):
        lowmem.create_optimizer("badam", tiny_llama(), layerwise=True)


def test_several_processes_and_sharded_parameters_are_refused(monkeypatch):
    from lowmem.optim import registry

    monkeypatch.setattr(registry, "is_sharded", lambda p: True)
    with pytest.raises(ValueError, match="'badam' on several processes: not supported"):
        lowmem.create_optimizer("badam", tiny_llama())


def test_a_nonfinite_gradient_skips_that_tensor_and_a_tensor_lr_steps_as_the_float():
    """The contract every name keeps (test_optim_contract), on a model with layers: a NaN gradient skips that
    tensor's update only, counted; a one-element tensor lr steps as the float."""
    runs = {}
    for label, lr, poison in (("clean", 2.0 ** -7, False), ("nan", 2.0 ** -7, True),
                              ("tensor", torch.tensor(2.0 ** -7), False)):
        torch.manual_seed(0)
        model = tiny_llama(hidden=64, layers=2)
        optimizer = lowmem.create_optimizer("badam", model, lr=lr, switch_interval=50)
        target = model.model.layers[1].mlp.up_proj.weight  # descending: layer 1 trains
        for step in range(3):
            ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(step))
            model(input_ids=ids, labels=ids).loss.backward()
            if poison and step == 1:
                target.grad.fill_(float("nan"))
            with pytest.warns(RuntimeWarning) if poison and step == 1 else contextlib.nullcontext():
                optimizer.step()
            optimizer.zero_grad()
        runs[label] = ([p.detach().clone() for p in model.parameters()], optimizer.nonfinite_skips, target)
    clean, nan, tensor = runs["clean"], runs["nan"], runs["tensor"]
    assert nan[1] == 1 and clean[1] == 0
    assert all(torch.isfinite(p).all() for p in nan[0])
    assert all(torch.equal(a, b) for a, b in zip(clean[0], tensor[0], strict=True))
