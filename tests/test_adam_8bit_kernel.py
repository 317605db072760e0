"""The compiled fused 8-bit Adam update (``lowmem.kernels.adam_8bit``) against its eager twin.

From the same state, one step of each path must give: block maxima within 1e-6 relative (the compiled
update may round ``m``/``v`` differently in the last bit, e.g. by a fused multiply-add); codes equal on
>= 99.9% of elements and never more than one code apart (a last-bit difference moves a value across a
midpoint only when it sits on one); the same weights to within 1e-6 of the step plus
the weight's last bit. Over 50 steps the two
trajectories stay within 1% of the total weight change of each other. Where the kernel cannot run
(size not a multiple of 256, compilation failing), the eager twin runs and the result is bit-identical.
"""

import copy

import pytest
import torch

from lowmem.kernels import adam_8bit
from lowmem.optim import AdamW8bit, LowMemOptimizer, rules


@pytest.fixture(autouse=True)
def restore_kernel_switch():
    yield
    adam_8bit.set_enabled(True)


def make(kind, shape, dtype, seed=0, **kw):
    w = torch.nn.Parameter((0.1 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))).to(dtype))
    if kind == "torch":
        return w, AdamW8bit([w], lr=1e-2, weight_decay=1e-2, **kw)
    return w, LowMemOptimizer([w], lr=1e-2, weight_decay=1e-2, rule="adamw_hf", state_dtype="8bit", eps=1e-6, **kw)


def grad(shape, step, dtype):
    gen = torch.Generator().manual_seed(100 + step)
    return ((1 + step % 4) * torch.randn(*shape, generator=gen)).to(dtype)


def run(opt, w, steps, start=0, fused=True):
    adam_8bit.set_enabled(fused)
    for s in range(start, start + steps):
        w.grad = grad(w.shape, s, w.dtype)
        opt.step()


def count_fused_calls(monkeypatch):
    calls = []
    original = adam_8bit.adam_step_8bit

    def spy(*args, **kw):
        out = original(*args, **kw)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(adam_8bit, "adam_step_8bit", spy)
    return calls


@pytest.mark.parametrize("kind,shape,dtype,options", [
    ("torch", (256, 64), torch.float32, {}),
    ("hf", (512, 96), torch.float32, {}),
    ("torch", (128, 96), torch.bfloat16, {}),
    ("hf", (256, 64), torch.float32, {"correct_bias": False}),
])
def test_one_step_matches_the_eager_twin(monkeypatch, kind, shape, dtype, options):
    w, opt = make(kind, shape, dtype, **options)
    run(opt, w, 5, fused=False)  # a state with history
    w_twin = torch.nn.Parameter(w.detach().clone())
    twin = copy.deepcopy(opt)
    twin.param_groups[0]["params"] = [w_twin]
    twin.state = {w_twin: copy.deepcopy(opt.state[w])}
    calls = count_fused_calls(monkeypatch)
    before = w.detach().float().clone()
    run(opt, w, 1, start=5, fused=True)
    run(twin, w_twin, 1, start=5, fused=False)
    assert calls == [True]  # the step really ran compiled; the twin's never tried
    fused, eager = opt.state[w], twin.state[w_twin]
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(fused[key + "_absmax"], eager[key + "_absmax"], rtol=1e-6, atol=0)
        diff = (fused[key].int() - eager[key].int()).abs()
        assert diff.max() <= 1, key
        assert (diff == 0).float().mean() >= 0.999, key
    step = (eager_w := w_twin.detach().float()) - before
    tol = 1e-6 * step.abs().max() + torch.finfo(dtype).eps * eager_w.abs().max()  # + the weight's last bit
    assert (w.detach().float() - eager_w).abs().max() <= tol


@pytest.mark.parametrize("kind", ["torch", "hf"])
def test_fifty_steps_track_the_eager_twin(kind):
    w1, fused = make(kind, (256, 64), torch.float32)
    w2, eager = make(kind, (256, 64), torch.float32)
    start = w1.detach().clone()
    run(fused, w1, 50, fused=True)
    run(eager, w2, 50, fused=False)
    change = (w2.detach() - start).abs().mean()
    assert (w1.detach() - w2.detach()).abs().mean() <= 0.01 * change
    assert change > 0.05  # the weights really moved


def test_sizes_off_the_block_grid_run_the_eager_twin(monkeypatch):
    w1, fused = make("torch", (65, 80), torch.float32)  # 5200 elements: quantized, not a multiple of 256
    w2, eager = make("torch", (65, 80), torch.float32)
    calls = count_fused_calls(monkeypatch)
    run(fused, w1, 3, fused=True)
    run(eager, w2, 3, fused=False)
    assert calls == []
    assert torch.equal(w1, w2)
    assert all(torch.equal(fused.state[w1][k], eager.state[w2][k]) for k in ("exp_avg", "exp_avg_sq"))


def test_a_failing_compiler_falls_back_to_the_eager_twin_with_a_warning(monkeypatch):
    def no_compiler(name):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(adam_8bit, "_compiled", no_compiler)
    w1, fused = make("torch", (256, 64), torch.float32)
    w2, eager = make("torch", (256, 64), torch.float32)
    with pytest.warns(RuntimeWarning, match="compiled 8-bit Adam unavailable.*no C\\+\\+ compiler"):
        run(fused, w1, 1, fused=True)
    assert "no C++ compiler" in adam_8bit._disabled_reason  # later steps go straight to the twin
    run(eager, w2, 1, fused=False)
    assert torch.equal(w1, w2)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("shape", [(64, 96), (37, 100)])  # 6144 = 24 blocks; 3700 is not a whole number of blocks
def test_large_tensors_update_in_chunks_bit_identically(monkeypatch, fused, shape):
    """Chunking bounds the update's temporaries without changing a bit: same blocks, same path."""
    results = []
    for chunk in (1 << 30, 1024):
        monkeypatch.setattr(rules, "CHUNK_8BIT", chunk)
        w, opt = make("torch", shape, torch.float32, min_8bit_size=0)
        run(opt, w, 4, fused=fused)
        results.append((w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items() if torch.is_tensor(v)}))
    (w_whole, s_whole), (w_chunked, s_chunked) = results
    assert torch.equal(w_whole, w_chunked)
    assert all(torch.equal(s_whole[k], s_chunked[k]) for k in s_whole)


def test_chunked_update_bounds_the_step_temporaries():
    """A 2M-element weight: the 8-bit step's live optimizer memory stays near fp32 AdamW's, not 13x the weight."""
    from torch.distributed._tools.mem_tracker import MemTracker

    layer = torch.nn.Linear(2048, 1024, bias=False)
    opt = AdamW8bit(layer.parameters(), lr=1e-3)
    adam_8bit.set_enabled(False)
    try:
        for _ in range(2):
            layer.weight.grad = torch.randn_like(layer.weight)
            tracker = MemTracker()
            tracker.track_external(layer, opt)
            with tracker:
                opt.step()
    finally:
        adam_8bit.set_enabled(True)
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    optimizer_bytes = sum(v for k, v in peak.items() if "OPT" in str(k))
    assert optimizer_bytes < 5 * layer.weight.nbytes  # was 13x before chunking (104 MiB for an 8 MiB weight)
