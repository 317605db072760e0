"""Exact optimizer-state bytes for known shapes, against the closed-form formulas."""

import pytest
import torch

from lowmem.example import tiny_llama
from lowmem.optim import FRUGAL, APOLLOAdamW, FiraAdamW, GaLoreAdamW, LowMemOptimizer, create_optimizer
from lowmem.optim.registry import get_spec
from lowmem.optim.states import state_bytes

M, N, R = 96, 64, 8  # a tall weight (m >= n); the wide case swaps the roles


def one_step(opt_cls, shape, group, dtype=torch.float32, **ctor):
    w = torch.nn.Parameter(torch.randn(*shape, dtype=dtype))
    opt = opt_cls([{"params": [w], **group}], lr=1e-3, **ctor)
    w.grad = torch.randn(*shape, dtype=dtype)
    opt.step()
    return opt, opt.state[w]


@pytest.mark.parametrize("shape", [(M, N), (N, M)])
def test_galore_bytes_match_formula(shape):
    m, n = shape
    _, state = one_step(GaLoreAdamW, shape, dict(rank=R, update_proj_gap=10, scale=0.25, proj_type="std"))
    small, big = min(m, n), max(m, n)
    # moments big x r (two of them) + projector r x small, 4 bytes each: 8r/small + 4r/big per param
    assert state_bytes(state) == 4 * (2 * big * R + R * small)
    assert state_bytes(state) / (m * n) == pytest.approx(8 * R / small + 4 * R / big)


def test_galore_bf16_states_are_half():
    _, state = one_step(GaLoreAdamW, (M, N), dict(rank=R, update_proj_gap=10, scale=1.0), dtype=torch.bfloat16)
    assert state_bytes(state) == 2 * (2 * M * R + R * N)


def test_state_dtype_option_controls_moment_bytes():
    _, fp32_state = one_step(GaLoreAdamW, (M, N), dict(rank=R), state_dtype="bfloat16")
    assert fp32_state["exp_avg"].dtype == torch.bfloat16
    assert state_bytes(fp32_state) == 2 * 2 * M * R + 4 * R * N  # bf16 moments, fp32 projector


@pytest.mark.parametrize("shape", [(M, N), (N, M)])
def test_apollo_keeps_no_projection_matrix(shape):
    m, n = shape
    _, state = one_step(APOLLOAdamW, shape, dict(rank=R, proj="random", scale_type="channel", scale=1.0))
    # two moments on the big side x r, plus the limiter's 0-d fp32 norm; seeds are plain ints
    assert state_bytes(state) == 4 * 2 * max(m, n) * R + 4
    assert isinstance(state["seed"], int) and isinstance(state["proj_seed"], int)


def test_apollo_mini_is_sgd_level():
    opt, state = one_step(APOLLOAdamW, (M, N), dict(rank=1, proj="random", scale_type="tensor", scale=128))
    assert state_bytes(state) == 8 * M + 4
    formula = 8 / N + 4 / M  # the reference's bytes/param, which also stores the 1 x n matrix
    assert state_bytes(state) / (M * N) <= formula


def test_fira_is_galore_plus_one_scalar():
    _, state = one_step(FiraAdamW, (M, N), dict(rank=R, alpha=0.25))
    assert state_bytes(state) == 4 * (2 * M * R + R * N) + 4


def test_adamw_is_eight_bytes_per_param():
    opt, state = one_step(LowMemOptimizer, (M, N), {})
    assert state_bytes(state) == 8 * M * N == opt.state_bytes()


def test_frugal_blocks_hold_state_only_for_active_tensors():
    ws = [torch.nn.Parameter(torch.randn(M, N)) for _ in range(4)]
    opt = FRUGAL([{"params": ws, "is_proj_params": True}], projection="blocks", density=0.25,
                 block_order="descending", update_gap=5)
    for w in ws:
        w.grad = torch.randn(M, N)
    opt.step()
    assert [opt.state[w]["active"] for w in ws] == [False, False, False, True]
    assert opt.state_bytes() == 8 * M * N  # one active tensor of four: 8 * density B/param on average


def test_frugal_randk_uses_one_index_per_entry():
    w = torch.nn.Parameter(torch.randn(M, N))
    opt = FRUGAL([{"params": [w], "is_proj_params": True}], projection="coordinates", coord_choice="randk",
                 density=0.25)
    w.grad = torch.randn(M, N)
    opt.step()
    k = int(M * N * 0.25)
    assert opt.state_bytes() == 8 * k + 8 * k  # two fp32 moments + one int64 flat index per entry


def test_load_state_dict_keeps_state_dtypes(tmp_path):
    """torch would cast state to the param dtype on load; lowmem keeps fp32 moments and int64 indices."""
    w = torch.nn.Parameter(torch.randn(M, N, dtype=torch.bfloat16))
    opt = GaLoreAdamW([{"params": [w], "rank": R}], state_dtype="float32")
    v = torch.nn.Parameter(torch.randn(M, N))
    frugal = FRUGAL([{"params": [v], "is_proj_params": True}], projection="coordinates")
    w.grad, v.grad = torch.randn(M, N, dtype=torch.bfloat16), torch.randn(M, N)
    opt.step()
    frugal.step()
    for optimizer, param in ((opt, w), (frugal, v)):
        before = {k: t.dtype for k, t in optimizer.state[param].items() if torch.is_tensor(t)}
        torch.save(optimizer.state_dict(), tmp_path / "opt.pt")
        optimizer.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
        after = {k: t.dtype for k, t in optimizer.state[param].items() if torch.is_tensor(t)}
        assert after == before
    assert opt.state[w]["exp_avg"].dtype == torch.float32
    assert frugal.state[v]["proj_idx"].dtype == torch.int64


@pytest.mark.parametrize("name", ["galore_adamw", "galore_adamw_8bit", "fira_adamw", "frugal_svd", "galore_adafactor",
                                  "galore+came+bf16", "apollo_adamw", "adam_mini", "came_8bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_bytes_are_the_bytes_kept_alive(name, dtype):
    """Every state tensor owns exactly its own storage: a view into a bigger temporary (say, a slice of the full SVD
    factor) would keep memory alive that state_bytes() does not count."""
    model = tiny_llama(hidden=64, layers=1).to(dtype)
    opt = create_optimizer(name, model, lr=1e-3, **({"rank": 8} if "rank" in get_spec(name).options() else {}))
    ids = torch.zeros(1, 8, dtype=torch.long)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                assert value.untyped_storage().nbytes() == value.nbytes, (key, tuple(value.shape))
