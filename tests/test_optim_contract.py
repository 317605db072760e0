"""The torch.optim contract for every registered name, and non-finite gradients that never poison the state.

What PyTorch's own ``TestOptimRenewed`` asks of an optimizer, written for lowmem's names: a 1-element tensor ``lr``
(any dimension) steps exactly as the float; a larger one, a negative weight decay or eps and a beta outside [0, 1)
are refused in torch's words; complex parameters are refused with the way out (``torch.view_as_real``).

Non-finite gradients: a NaN or inf in one tensor's gradient for one step skips that tensor's update and keeps its
state, so the run continues exactly (``torch.equal``) as a run in which that tensor had no gradient that step; the
injection step is a projector-refresh step, so a refresh on a bad gradient must keep the previous projector.
"""

import warnings

import pytest
import torch
from torch import nn

import lowmem
from lowmem.optim import AdamMini
from lowmem.optim.registry import get_spec

NAMES = lowmem.available_optimizers()
#: The names this file's model (no transformer layers) can run: BAdam's blocks are layers, and its contract tests
#: (non-finite gradients, tensor lr) run on a LLaMA in test_parity_badam.
LAYERLESS = [name for name in NAMES if name != "badam"]
STEPS, BAD_STEP = 5, 3  # with a projector gap of 2 the third update refreshes the subspace
VOCAB = 32


class Net(nn.Module):
    """Embedding, two projected linears (one over 4096 elements, so 8-bit states quantize it), a norm, a head."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, 64)
        self.attn = nn.Linear(64, 64, bias=False)
        self.mlp = nn.Linear(64, 96)
        self.norm = nn.LayerNorm(96)
        self.lm_head = nn.Linear(96, VOCAB, bias=False)

    def forward(self, ids):
        h = torch.tanh(self.attn(self.embed_tokens(ids)))
        return self.lm_head(self.norm(self.mlp(h)))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def options(name: str, **extra) -> dict:
    """Small ranks and a projector gap of 2, where the name takes them."""
    allowed = get_spec(name).options()
    opts = {"lr": 1e-2}
    if "rank" in allowed and allowed["rank"] > 1:
        opts["rank"] = 4
    for gap in ("update_proj_gap", "update_gap"):
        if gap in allowed:
            opts[gap] = 2
    return {**opts, **extra}


def batch(step: int):
    gen = torch.Generator().manual_seed(step)
    return torch.randint(0, VOCAB, (4, 16), generator=gen), torch.randint(0, VOCAB, (4, 16), generator=gen)


def loss_of(model, step):
    ids, targets = batch(step)
    return nn.functional.cross_entropy(model(ids).flatten(0, 1), targets.flatten())


def state_of(optimizer) -> list:
    """Every state tensor and number, in parameter order (for exact comparison)."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            out.append({k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()})
    return out


def assert_same(a: list, b: list):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if torch.is_tensor(x[key]):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def train(name: str, bad: str | None, layerwise: bool = False, target: str = "mlp", **extra):
    """``STEPS`` steps; at ``BAD_STEP`` the ``target`` linear's weight gradient is all ``bad`` (nan / inf), or with
    ``bad=None`` that weight gets no gradient at that step. Returns (model, optimizer, the states before and after
    BAD_STEP)."""
    model = net()
    optimizer = lowmem.create_optimizer(name, model, layerwise=layerwise, **options(name, **extra))
    target = getattr(model, target).weight
    around = []
    for step in range(1, STEPS + 1):
        injected = step == BAD_STEP
        if injected:
            around.append(state_of(optimizer))
        handle = None
        if injected and bad is None:
            target.requires_grad_(False)
        elif injected and layerwise:  # the gradient arrives inside backward, where the update runs
            handle = target.register_hook(lambda g: torch.full_like(g, float(bad)))
        loss_of(model, step).backward()
        if injected and bad is not None and not layerwise:
            target.grad.fill_(float(bad))
        optimizer.step()
        optimizer.zero_grad()
        target.requires_grad_(True)
        if handle is not None:
            handle.remove()
        if injected:
            around.append(state_of(optimizer))
    return model, optimizer, around


def index_of(optimizer, param) -> int:
    """``param``'s place in ``state_of``'s list."""
    return next(i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]) if p is param)


@pytest.mark.parametrize("layerwise", [False, True], ids=["step", "layerwise"])
@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("name", LAYERLESS)
def test_a_nonfinite_gradient_skips_that_tensor_and_the_run_goes_on_as_without_it(name, bad, layerwise):
    clean, clean_opt, _ = train(name, None, layerwise)
    with pytest.warns(RuntimeWarning, match=r"gradient of 'mlp.weight' has NaN or inf values .*update was skipped"):
        hit, hit_opt, (before, after) = train(name, bad, layerwise)
    assert hit_opt.nonfinite_skips == 1 and clean_opt.nonfinite_skips == 0
    if get_spec(name).ctor.get("projection") != "blocks":  # FRUGAL's block choice resets a whole group on schedule
        index = index_of(hit_opt, hit.mlp.weight)
        assert_same([before[index]], [after[index]])  # its projector, moments and step count
    for (n, p), q in zip(hit.named_parameters(), clean.parameters(), strict=True):
        assert torch.isfinite(p).all(), n
        assert torch.equal(p, q), n
    assert_same(state_of(hit_opt), state_of(clean_opt))
    moved = (hit.mlp.weight - net().mlp.weight).abs().max()
    assert moved > 1e-4  # the weight did train on the other steps


def test_a_skip_in_the_first_tensor_of_a_block_group_does_not_reschedule_the_group():
    """FRUGAL chooses its active blocks on the group's schedule: a skipped update of the group's first tensor (whose
    step count used to drive the schedule) must choose the same blocks at the same steps as an all-finite run."""
    def schedule(poisoned: bool) -> list:
        model = net()
        optimizer = lowmem.create_optimizer("frugal", model, **options("frugal", density=0.5))
        group = optimizer.param_groups[0]
        assert group["param_names"][0] == "attn.weight"
        chosen = []
        for step in range(1, 8):
            loss_of(model, step).backward()
            if poisoned and step == BAD_STEP:
                model.attn.weight.grad.fill_(float("nan"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                optimizer.step()
            optimizer.zero_grad()
            chosen.append([optimizer.state[p]["active"] for p in group["params"]])
        return chosen

    assert schedule(True) == schedule(False)


def test_a_skip_adds_no_state_and_empty_or_sparse_gradients_are_handled():
    model = net()
    optimizer = lowmem.create_optimizer("adamw", model, lr=1e-2)
    loss_of(model, 1).backward()
    model.attn.weight.grad.fill_(float("nan"))
    with pytest.warns(RuntimeWarning):
        optimizer.step()
    assert model.attn.weight not in optimizer.state  # its state is exactly as before: absent
    empty = nn.Parameter(torch.zeros(0, 4))
    empty.grad = torch.zeros(0, 4)
    lowmem.optim.LowMemOptimizer([empty], lr=1e-2).step()  # nothing to test, nothing to update
    sparse = nn.Parameter(torch.zeros(3, 4))
    sparse.grad = torch.zeros(3, 4).to_sparse()
    with pytest.raises(RuntimeError, match="do not support sparse gradients"):
        lowmem.optim.LowMemOptimizer([sparse], lr=1e-2).step()


@pytest.mark.parametrize("name", ["apollo_adamw", "came_8bit", "adamw"])
def test_skip_nonfinite_false_updates_with_the_nan_as_torch_does(name):
    model, optimizer, _ = train(name, "nan", skip_nonfinite=False)
    assert optimizer.nonfinite_skips == 0
    assert torch.isnan(model.mlp.weight).any()


def test_layerwise_accumulation_catches_a_nan_in_an_earlier_micro_batch():
    """The projected running sum carries a NaN from any micro-batch; the last one's test finds it."""
    model = net()
    optimizer = lowmem.create_optimizer("galore_adamw_layerwise", model, **options("galore_adamw"))
    for step in range(1, 4):
        for micro in range(2):
            handle = None
            if step == 2 and micro == 0:
                handle = model.mlp.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
            if micro == 0:
                with optimizer.layerwise.accumulating():
                    loss_of(model, 10 * step + micro).backward()
            else:
                loss_of(model, 10 * step + micro).backward()
            if handle is not None:
                handle.remove()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            optimizer.step()
        optimizer.zero_grad()
    assert optimizer.nonfinite_skips == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert optimizer.layerwise.last_grad_norm is not None and optimizer.layerwise.last_grad_norm < float("inf")


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_mezo_skips_a_step_whose_projected_gradient_is_not_finite(bad):
    """The step is skipped whole (one projected gradient scales every tensor's update) and the step count kept, so
    the run continues as one that never took that batch."""
    def run(poisoned: bool):
        model = net()
        optimizer = lowmem.create_optimizer("mezo", model, lr=1e-3)
        steps = [1, 2, 3, 4]
        for step in steps:
            if poisoned and step == 2:
                optimizer.step(lambda: torch.tensor(float(bad)))
            optimizer.step(lambda step=step: loss_of(model, step))
        return model, optimizer

    with pytest.warns(RuntimeWarning, match=r"MeZO's projected gradient \((nan|inf)\) has NaN or inf values"):
        hit, hit_opt = run(True)
    clean, _ = run(False)
    assert hit_opt.nonfinite_skips == 1
    for p, q in zip(hit.parameters(), clean.parameters(), strict=True):
        assert torch.equal(p, q)


# ---- torch.optim's argument contract ------------------------------------------------------------------------------


def _steps(optimizer, model, steps=3):
    for step in range(1, steps + 1):
        loss_of(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0-d", "1-d", "2-d"])
@pytest.mark.parametrize("name", [*LAYERLESS, "mezo"])
def test_a_one_element_tensor_lr_steps_as_the_float(name, shape):
    """An lr that fp32 holds exactly (a tensor's is fp32: 1e-2 would differ from the float in its last bits, which
    Muon's shape factor, computed in double as in torch, carries into the step)."""
    opts = options(name, lr=2.0**-7) if name != "mezo" else {"lr": 2.0**-10}
    float_model, tensor_model = net(), net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = lowmem.create_optimizer(name, float_model, **opts)
        tensor = lowmem.create_optimizer(name, tensor_model, **{**opts, "lr": torch.full(shape, opts["lr"])})
    if name == "mezo":
        for step in range(1, 4):
            plain.step(lambda step=step: loss_of(float_model, step))
            tensor.step(lambda step=step: loss_of(tensor_model, step))
        expected, got = list(float_model.parameters()), list(tensor_model.parameters())
    else:
        expected, got = _steps(plain, float_model), _steps(tensor, tensor_model)
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(expected, net().parameters(), strict=True))


def _bad_arguments(name: str) -> list[tuple[dict, str]]:
    """(options, torch's message) for each argument the name takes, set out of range."""
    allowed = get_spec(name).options()
    cases = [({"lr": torch.tensor([1e-3, 1e-3])}, "Tensor lr must be 1-element"),
             ({"lr": -1e-3}, "Invalid learning rate: -0.001"),
             ({"weight_decay": -0.1}, "Invalid weight_decay value: -0.1")]
    eps = allowed.get("eps")
    if isinstance(eps, tuple):
        cases.append(({"eps": (-1e-30, eps[1])}, r"Invalid epsilon value: \(-1e-30"))
    elif eps is not None:
        cases.append(({"eps": -1e-8}, "Invalid epsilon value: -1e-08"))
    betas = allowed.get("betas")
    if betas is not None:
        for i in range(len(betas)):
            for value in (1.0, -0.1):
                bad = tuple(value if j == i else b for j, b in enumerate(betas))
                cases.append(({"betas": bad}, f"Invalid beta parameter at index {i}: {value}"))
    if "beta1" in allowed:
        cases.append(({"beta1": 1.0}, "Invalid beta parameter at index 0: 1.0"))
    return cases


@pytest.mark.parametrize("name", NAMES)
def test_arguments_out_of_range_are_refused_in_torchs_words(name):
    for bad, message in _bad_arguments(name):
        with pytest.raises(ValueError, match=message):
            lowmem.create_optimizer(name, net(), **{**options(name), **bad})


def test_mezo_arguments_out_of_range_are_refused_in_torchs_words():
    for bad, message in _bad_arguments("mezo"):
        with pytest.raises(ValueError, match=message):
            lowmem.create_optimizer("mezo", net(), **bad)


class WithComplex(Net):
    def __init__(self):
        super().__init__()
        self.phase = nn.Parameter(torch.randn(8, dtype=torch.complex64))


@pytest.mark.parametrize("name", [*NAMES, "mezo"])
def test_complex_parameters_are_refused_with_the_way_out(name):
    opts = options(name) if name != "mezo" else {}
    with pytest.raises(ValueError, match=r"'phase' is complex \(torch.complex64\).*torch.view_as_real"):
        lowmem.create_optimizer(name, WithComplex(), **opts)


def test_adam_mini_keeps_frozen_tensors_so_a_layer_unfrozen_later_trains():
    model = net()
    model.attn.requires_grad_(False)
    optimizer = AdamMini(model.named_parameters(), lr=1e-2)
    assert any(p is model.attn.weight for g in optimizer.param_groups for p in g["params"])
    _steps(optimizer, model, steps=1)
    before = model.attn.weight.detach().clone()
    model.attn.requires_grad_(True)
    _steps(optimizer, model, steps=1)
    assert not torch.equal(before, model.attn.weight)


@pytest.mark.parametrize("params", [lambda m: m.parameters(), lambda m: [{"params": list(m.parameters())}]],
                         ids=["tensors", "dict groups"])
def test_adam_mini_given_tensors_or_groups_says_it_needs_named_parameters(params):
    with pytest.raises(TypeError, match=r"Adam-mini partitions parameters by name, so it takes "
                                        r"model.named_parameters\(\)"):
        AdamMini(params(net()), lr=1e-3)


def _linear_groups():
    model = net()
    return [{"params": [model.attn.weight, model.mlp.weight], "rank": 4}, {"params": [model.mlp.bias]}]


#: Each drop-in class, constructed as its reference package's users construct it.
DROP_INS = {
    "GaLoreAdamW": lambda **kw: lowmem.optim.GaLoreAdamW(_linear_groups(), **kw),
    "GaLoreAdamW8bit": lambda **kw: lowmem.optim.GaLoreAdamW8bit(_linear_groups(), **kw),
    "GaLoreAdafactor": lambda **kw: lowmem.optim.GaLoreAdafactor(_linear_groups(), **{"lr": 1e-3, **kw,
                                                                                      "relative_step": False}),
    "APOLLOAdamW": lambda **kw: lowmem.optim.APOLLOAdamW(_linear_groups(), **kw),
    "FiraAdamW": lambda **kw: lowmem.optim.FiraAdamW(_linear_groups(), **kw),
    "FRUGAL": lambda **kw: lowmem.optim.FRUGAL(net().parameters(), **kw),
    "Adafactor": lambda **kw: lowmem.optim.Adafactor(net().parameters(), **{"lr": 1e-3, **kw, "relative_step": False}),
    "CAME": lambda **kw: lowmem.optim.CAME(net().parameters(), **{"lr": 1e-3, **kw}),
    "AdamW8bit": lambda **kw: lowmem.optim.AdamW8bit(net().parameters(), **kw),
    "AdamMini": lambda **kw: AdamMini(net().named_parameters(), **kw),
}


@pytest.mark.parametrize("cls", DROP_INS)
def test_drop_in_classes_keep_the_contract(cls):
    make = DROP_INS[cls]
    assert make(skip_nonfinite=False).param_groups[0]["skip_nonfinite"] is False
    for bad, message in [({"lr": torch.tensor([1e-3, 1e-3])}, "Tensor lr must be 1-element"),
                         ({"lr": -1.0}, "Invalid learning rate"), ({"weight_decay": -0.1}, "Invalid weight_decay")]:
        with pytest.raises(ValueError, match=message):
            make(**bad)
    if cls not in ("Adafactor", "GaLoreAdafactor"):
        with pytest.raises(ValueError, match="needs a learning rate|positive lr"):
            make(lr=None)


def test_settings_lowmem_would_ignore_are_refused():
    params = list(net().parameters())
    for flag in ("maximize", "amsgrad"):
        with pytest.raises(ValueError, match=rf"{flag}=True is not supported"):
            lowmem.optim.LowMemOptimizer([{"params": params, flag: True}], lr=1e-3)
    with pytest.raises(ValueError, match=r"Adafactor takes two eps values"):
        lowmem.optim.Adafactor(params, lr=1e-3, relative_step=False, eps=1e-3)
    with pytest.raises(ValueError, match="Invalid learning rate: nan"):
        lowmem.optim.MeZO(net(), lr=float("nan"))
