"""Checkpoint / resume: stopping, saving, loading into a fresh optimizer and continuing is bit-identical.

For every optimizer class (and every FRUGAL projection): run ``TOTAL`` steps straight, versus run ``k``
steps, save ``opt.state_dict()`` with ``torch.save``, build a fresh model copy and a fresh optimizer, load the
state back with ``torch.load(..., weights_only=True)`` and continue with the same gradients. The projector is
refreshed before steps 1, 6 and 11 (``update_proj_gap = 5``); the stop is before a refresh (k = 4) or exactly at
one (k = 5: the refresh is due on the first step after loading).

Also: APOLLO keeps no projection matrix in its state (it is regenerated from a seed) and holds exactly the
reference's bytes minus apollo-torch's stored matrices.
"""

import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # apollo-torch imports transformers / bitsandbytes
    import apollo_torch

from lowmem.optim import (
    CAME,
    FRUGAL,
    Adafactor,
    AdamW8bit,
    APOLLOAdamW,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

GAP, TOTAL, RANK = 5, 12, 8
SHAPES = {"tall": (96, 64), "wide": (64, 96), "square": (48, 48)}
PLAIN = {"bias": (64,), "embed": (50, 24)}


def frugal(**kw):
    def build(plain, proj):
        groups = [{"params": plain, "is_proj_params": False}, {"params": proj, "is_proj_params": True}]
        return FRUGAL(groups, update_gap=GAP, lr=1e-2, weight_decay=0.05, **kw)
    return build


def low_rank(cls, group, **ctor):
    def build(plain, proj):
        groups = [{"params": plain}, {"params": proj, "rank": RANK, "update_proj_gap": GAP, **group}]
        return cls(groups, **{"lr": 1e-2, "weight_decay": 0.05, **ctor})
    return build


def dense(cls, **ctor):
    def build(plain, proj):
        return cls([{"params": plain}, {"params": proj}], weight_decay=0.05, **ctor)
    return build


OPTIMIZERS = {
    "adafactor": dense(Adafactor, beta1=0.9),
    "adamw_8bit": dense(AdamW8bit, lr=1e-2),  # the 96x64 weights (6144 elements) get quantized states
    "galore_adamw_8bit": low_rank(GaLoreAdamW8bit, dict(scale=0.25, rank=32, proj_type="std"), min_8bit_size=1024),
    "came": dense(CAME, lr=1e-3),
    "galore_adafactor": low_rank(GaLoreAdafactor, dict(scale=0.25, proj_type="std"), lr=None, beta1=0.9),
    "galore": low_rank(GaLoreAdamW, dict(scale=0.25, proj_type="std")),
    "apollo_random": low_rank(APOLLOAdamW, dict(proj="random", scale_type="channel", scale=1.0, proj_type="std")),
    "apollo_mini": low_rank(APOLLOAdamW, dict(proj="random", scale_type="tensor", scale=128, rank=1, proj_type="std"),
                             scale_front=True),
    "fira": low_rank(FiraAdamW, dict(alpha=0.25, proj_type="std")),
    "frugal_svd": frugal(projection="svd", density=0.25),
    "frugal_random": frugal(projection="random", density=0.25),
    "frugal_randperm": frugal(projection="randperm", density=0.25),
    "frugal_coord_columns": frugal(projection="coordinates", coord_choice="columns", density=0.25),
    "frugal_coord_rows": frugal(projection="coordinates", coord_choice="rows", density=0.25),
    "frugal_coord_randk": frugal(projection="coordinates", coord_choice="randk", density=0.25),
    "frugal_blocks_descending": frugal(projection="blocks", block_order="descending", density=0.34),
    "frugal_blocks_random": frugal(projection="blocks", block_order="random", density=0.34),
}


def initial_weights():
    gen = torch.Generator().manual_seed(0)
    return {name: 0.1 * torch.randn(*shape, generator=gen) for name, shape in {**PLAIN, **SHAPES}.items()}


def gradients():
    """Seeded per-step gradients whose scale varies (so the norm-growth limiters engage)."""
    gen = torch.Generator().manual_seed(1)
    shapes = {**PLAIN, **SHAPES}
    return [
        {name: (1 + step % 4) * torch.randn(*shape, generator=gen) for name, shape in shapes.items()}
        for step in range(TOTAL)
    ]


def fresh_model(weights):
    """A fresh copy of the model: new Parameters holding (clones of) ``weights``."""
    return {name: torch.nn.Parameter(w.clone()) for name, w in weights.items()}


def build(name, params):
    plain = [params[n] for n in PLAIN]
    proj = [params[n] for n in SHAPES]
    return OPTIMIZERS[name](plain, proj)


def train(opt, params, grads):
    for g in grads:
        for n, p in params.items():
            p.grad = g[n].clone()
        opt.step()


def run_straight(name, grads):
    params = fresh_model(initial_weights())
    torch.manual_seed(1234)  # FRUGAL's random choices draw from the global RNG, as the reference does
    opt = build(name, params)
    train(opt, params, grads)
    return params, opt


def run_resumed(name, grads, stop, tmp_path, load=True):
    params = fresh_model(initial_weights())
    torch.manual_seed(1234)
    opt = build(name, params)
    train(opt, params, grads[:stop])

    # Checkpoint. FRUGAL's random variants (random / randperm / coordinates / blocks random) draw their
    # subspaces from the global torch RNG, exactly like the reference code, so the RNG state is part of
    # the checkpoint: saved at the stop and restored before continuing -- what the HF Trainer does with
    # its rng_state.pth file.
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    torch.save({n: p.detach() for n, p in params.items()}, tmp_path / "model.pt")
    torch.save(torch.get_rng_state(), tmp_path / "rng_state.pt")
    del opt, params
    torch.manual_seed(999)  # whatever happens in between must not matter

    # Resume into a fresh model copy and a fresh optimizer. weights_only=True raises on pickled python
    # objects (e.g. a projector instance), so this load doubles as the check that the state is plain data.
    params = fresh_model(torch.load(tmp_path / "model.pt", weights_only=True))
    opt = build(name, params)
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    if load:
        opt.load_state_dict(sd)
    torch.set_rng_state(torch.load(tmp_path / "rng_state.pt", weights_only=True))
    train(opt, params, grads[stop:])
    return params, opt, sd


@pytest.mark.parametrize("stop", [4, 5], ids=["before_refresh", "at_refresh"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_is_bit_identical(name, stop, tmp_path):
    grads = gradients()
    straight, opt_a = run_straight(name, grads)
    resumed, opt_b, sd = run_resumed(name, grads, stop, tmp_path)
    assert len(sd["state"]) > 0
    for n in straight:
        assert torch.isfinite(straight[n]).all(), n
        assert torch.equal(straight[n], resumed[n]), (
            f"{name}: '{n}' differs after resuming at step {stop}: max |diff| "
            f"{(straight[n] - resumed[n]).abs().max().item():.3e}"
        )
    assert opt_b.state_bytes() == opt_a.state_bytes()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_without_loading_the_state_differs(name, tmp_path):
    """Control: the comparison above detects a lost optimizer state (restarted moments, subspace, seeds)."""
    grads = gradients()
    straight, _ = run_straight(name, grads)
    restarted, _, _ = run_resumed(name, grads, 4, tmp_path, load=False)
    assert any(not torch.equal(straight[n], restarted[n]) for n in SHAPES)


def test_state_dict_holds_only_plain_data(tmp_path):
    """Every per-parameter state value is a tensor, int, float, bool or str (nothing pickled)."""
    grads = gradients()
    for name in OPTIMIZERS:
        _, opt = run_straight(name, grads[:6])
        for state in opt.state_dict()["state"].values():
            for key, value in state.items():
                assert torch.is_tensor(value) or type(value) in (int, float, bool, str), (name, key, type(value))


# --- APOLLO: the random projection matrix is regenerated from its seed, never stored ---------------------


def apollo_pair(group, ctor, steps=7):
    """Run lowmem's and apollo-torch's APOLLO side by side on the same weights and gradients."""
    grads = gradients()[:steps]
    opts, models = [], []
    for cls in (APOLLOAdamW, apollo_torch.APOLLOAdamW):
        params = fresh_model(initial_weights())
        keys = dict(rank=RANK, update_proj_gap=GAP, proj="random", proj_type="std")
        keys.update(group)
        opt = cls([{"params": [params[n] for n in PLAIN]}, {"params": [params[n] for n in SHAPES], **keys}],
                  lr=1e-2, weight_decay=0.05, **ctor)
        train(opt, params, grads)
        opts.append(opt)
        models.append(params)
    return opts, models


def reference_state_bytes(opt):
    """apollo-torch's state: its tensors plus the projector's ``ortho_matrix`` (kept in a python object)."""
    total, matrices = 0, 0
    for state in opt.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        if "projector" in state:
            m = state["projector"].ortho_matrix
            matrices += m.numel() * m.element_size()
    return total + matrices, matrices


@pytest.mark.parametrize("variant", ["random", "mini"])
def test_apollo_state_has_no_projection_matrix(variant, tmp_path):
    if variant == "random":
        group, ctor, rank = dict(scale_type="channel", scale=1.0), {}, RANK
    else:
        group, ctor, rank = dict(scale_type="tensor", scale=128, rank=1), dict(scale_front=True), 1
    (ours, ref), (ours_params, ref_params) = apollo_pair(group, ctor)
    for n in ours_params:  # the same run (fp32 parity), so the byte counts compare like for like
        diff = (ours_params[n] - ref_params[n]).abs().max() / ref_params[n].abs().max()
        assert diff <= 1e-5, (n, diff.item())

    # std projection: tall m x n (m >= n) -> matrix r x n; wide m x n -> matrix m x r
    matrix_shapes = {"tall": (rank, 64), "wide": (64, rank), "square": (rank, 48)}
    for n, shape in matrix_shapes.items():
        p, q = ours_params[n], ref_params[n]
        assert tuple(ref.state[q]["projector"].ortho_matrix.shape) == shape  # where apollo-torch keeps it
        state = ours.state[p]
        assert isinstance(state["seed"], int) and isinstance(state["proj_seed"], int)
        tensors = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}
        assert shape not in tensors.values(), (n, tensors)
        assert sum(v.numel() for v in state.values() if torch.is_tensor(v)) < p.numel()

    # Exact bytes, counted independently, and strictly less than apollo-torch's by exactly its matrices.
    counted = sum(v.numel() * v.element_size() for s in ours.state.values() for v in s.values() if torch.is_tensor(v))
    assert ours.state_bytes() == counted
    ref_total, ref_matrices = reference_state_bytes(ref)
    assert ref_matrices > 0
    assert ours.state_bytes() < ref_total
    assert ours.state_bytes() == ref_total - ref_matrices

    # Our checkpoint loads with weights_only=True; apollo-torch's (a pickled projector object) does not --
    # so the weights_only check in the resume test has teeth.
    torch.save(ours.state_dict(), tmp_path / "ours.pt")
    torch.load(tmp_path / "ours.pt", weights_only=True)
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        torch.load(tmp_path / "ref.pt", weights_only=True)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_holds_only_tensors_and_plain_numbers(name):
    params = {n: torch.nn.Parameter(w.clone()) for n, w in initial_weights().items()}
    opt = OPTIMIZERS[name]([params[n] for n in PLAIN], [params[n] for n in SHAPES])
    for grads in gradients()[:2]:
        for n, p in params.items():
            p.grad = grads[n].clone()
        opt.step()
    values = [v for s in opt.state.values() for v in s.values()]
    assert values and all(torch.is_tensor(v) or type(v) in (int, float, bool) for v in values), \
        {type(v) for v in values}
