"""Still for what ``bench_suite.py`` (the step-time ratios) does not time: refresh and amortized steps, FRUGAL vs AdamW,
APOLLO's per-step redraw of its projection, page faults per step (benchmarks/RESULTS.md, "Not in the suite").

CPU benchmark: ``opt.step()`` time and optimizer-state bytes, lowmem vs the reference packages.

Builds the weight matrices of LLaMA-130M (hidden 768, intermediate 2048; per layer q/k/v/o 768x768,
gate/up 2048x768, down 768x2048, ``nn.Linear`` layout out x in) as fp32 ``nn.Parameter`` with fixed
random gradients, and times ``opt.step()`` for each pair in the same process on the same CPU:

* GaLore       ``lowmem.optim.GaLoreAdamW`` vs ``galore_torch.GaLoreAdamW``  (rank 256, scale 0.25)
* APOLLO       ``lowmem.optim.APOLLOAdamW`` vs ``apollo_torch.APOLLOAdamW``  (rank 256, channel, scale 1)
* APOLLO-Mini  same classes                                                 (rank 1, tensor, scale 128)
* Fira         ``lowmem.optim.FiraAdamW``   vs ``fira.FiraAdamW``           (rank 256, alpha 0.25)
* FRUGAL       ``lowmem.optim.FRUGAL`` (blocks and svd, density 0.25) vs ``torch.optim.AdamW`` on the
  same parameters (no reference package: the ratio is against full AdamW)

All use ``update_proj_gap`` = 200. Two numbers per optimizer:

* steady: ms per step of steps that do not refresh the projection. Before every timed block the
  per-parameter ``state["step"]`` counter (a plain int in every optimizer benchmarked here except
  torch's AdamW, which never refreshes) is set back to 1, so a block of fewer than 199 steps never
  reaches a refresh. The counter only feeds the bias correction and the refresh test, so this does
  not change the work a step does.
* refresh: one step with the counters set to a multiple of 200, so it recomputes the projection
  (GaLore/Fira: an SVD per matrix; APOLLO: a new seed; FRUGAL: a new block set or SVD) and then
  updates as usual. Amortized = (refresh + 199 * steady) / 200.

Ours and reference are measured alternately (A B A B ...) and each reported time is the median
over repetitions. Timed blocks of fast optimizers are lengthened to ``--min-block-s``. Before each
sample the script waits briefly for other processes to go idle, records how much CPU they used
during the sample (samples where they used >= 0.2 cores are left out of the median when at least
half are clean) and counts minor page faults per step: on CPU, glibc malloc may hand freshly mapped
pages to the full-size temporaries of a step, and zeroing them can cost as much as the differences
measured here. ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824``
removes that effect for an allocator-neutral comparison.

The last section measures what lowmem's APOLLO pays to redraw its random projection from the seed
on every step (``torch.randn``), and, via a diagnostic monkeypatch that caches the matrices, the
same optimizer's step without that cost.

Run: ``PYTHONPATH=. python benchmarks/bench_optimizer_step.py [--layers 2] [--out report.md]``
(about 3-4 minutes on 2 cores with the defaults).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import resource
import statistics
import time
import warnings

import torch
from torch import nn

import lowmem.optim as lm
from lowmem.optim.projectors import GaussianProjector

HIDDEN, INTERMEDIATE = 768, 2048
GAP = 200


def layer_shapes() -> list[tuple[str, tuple[int, int]]]:
    """One LLaMA-130M decoder layer's linear weights, (out, in)."""
    h, f = HIDDEN, INTERMEDIATE
    return [("q_proj", (h, h)), ("k_proj", (h, h)), ("v_proj", (h, h)), ("o_proj", (h, h)),
            ("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f))]


def make_master(layers: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, grad) pairs, drawn once; every optimizer gets its own copy of the same values."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        for _, shape in layer_shapes():
            w = torch.randn(shape, generator=gen) * 0.02
            g = torch.randn(shape, generator=gen) * 1e-2
            out.append((w, g))
    return out


def make_params(master) -> list[nn.Parameter]:
    params = []
    for w, g in master:
        p = nn.Parameter(w.clone())
        p.grad = g.clone()
        params.append(p)
    return params


# ---------------------------------------------------------------- optimizer pairs

def _galore_group(params):
    return [{"params": params, "rank": 256, "update_proj_gap": GAP, "scale": 0.25, "proj_type": "std"}]


def _apollo_group(params, rank, scale_type, scale):
    return [{"params": params, "rank": rank, "proj": "random", "scale_type": scale_type, "scale": scale,
             "update_proj_gap": GAP, "proj_type": "std"}]


def _fira_group(params):
    return [{"params": params, "rank": 256, "update_proj_gap": GAP, "alpha": 0.25, "proj_type": "std"}]


def build_pairs():
    """name -> (ours factory, reference factory, reference label, reference refreshes?)."""
    import apollo_torch
    import fira
    import galore_torch

    lr = 1e-3
    return {
        "GaLore (r=256, scale 0.25)": (
            lambda p: lm.GaLoreAdamW(_galore_group(p), lr=lr),
            lambda p: galore_torch.GaLoreAdamW(_galore_group(p), lr=lr, no_deprecation_warning=True),
            "galore_torch.GaLoreAdamW", True),
        "APOLLO (r=256, channel, scale 1)": (
            lambda p: lm.APOLLOAdamW(_apollo_group(p, 256, "channel", 1.0), lr=lr, scale_front=False),
            lambda p: apollo_torch.APOLLOAdamW(_apollo_group(p, 256, "channel", 1.0), lr=lr, scale_front=False),
            "apollo_torch.APOLLOAdamW", True),
        "APOLLO-Mini (r=1, tensor, scale 128)": (
            lambda p: lm.APOLLOAdamW(_apollo_group(p, 1, "tensor", 128.0), lr=lr, scale_front=False),
            lambda p: apollo_torch.APOLLOAdamW(_apollo_group(p, 1, "tensor", 128.0), lr=lr, scale_front=False),
            "apollo_torch.APOLLOAdamW", True),
        "Fira (r=256, alpha 0.25)": (
            lambda p: lm.FiraAdamW(_fira_group(p), lr=lr),
            lambda p: fira.FiraAdamW(_fira_group(p), lr=lr, no_deprecation_warning=True),
            "fira.FiraAdamW", True),
        "FRUGAL (blocks, descending, density 0.25)": (
            lambda p: lm.FRUGAL([{"params": p, "is_proj_params": True}], projection="blocks",
                                block_order="descending", density=0.25, update_gap=GAP, lr=lr, weight_decay=0.01),
            lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.01),
            "torch.optim.AdamW (baseline)", False),
        "FRUGAL (svd, density 0.25)": (
            lambda p: lm.FRUGAL([{"params": p, "is_proj_params": True}], projection="svd", proj_side="std",
                                density=0.25, update_gap=GAP, lr=lr, weight_decay=0.01),
            lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.01),
            "torch.optim.AdamW (baseline)", False),
    }


# ---------------------------------------------------------------- measurement

def set_steps(opt: torch.optim.Optimizer, value: int) -> None:
    """Set every parameter's plain-int step counter (torch AdamW's tensor counter is left alone)."""
    for state in opt.state.values():
        if isinstance(state.get("step"), int):
            state["step"] = value


def lowmem_version() -> str:
    """The git commit of the lowmem checkout being benchmarked, and whether lowmem/ had local edits."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(lm.__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "lowmem"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted changes in lowmem/' if dirty else ''}"


def busy_cpu_seconds() -> float:
    """Non-idle CPU seconds of the whole machine since boot (from /proc/stat; 0 where unavailable)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    return time.process_time()


class Sample(float):
    """A timing in seconds that also records how busy other processes kept the CPU meanwhile."""

    others: float  # average cores used by other processes during the sample
    clean: bool  # others stayed under CLEAN_OTHERS cores (allowing /proc/stat's 10 ms tick of noise)
    faults: float  # minor page faults per step (fresh pages the allocator had to map and zero)


def _timed(fn, divisor: int = 1) -> Sample:
    flt0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    busy0, own0, t0 = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt0
    others = (busy_cpu_seconds() - busy0) - (own_cpu_seconds() - own0)
    sample = Sample(wall / divisor)
    sample.others = max(0.0, others) / wall
    sample.clean = others < max(CLEAN_OTHERS * wall, 0.03)
    sample.faults = flt / divisor
    return sample


def time_steady(opt, steps: int) -> Sample:
    set_steps(opt, 1)

    def run():
        for _ in range(steps):
            opt.step()

    return _timed(run, steps)


def time_refresh(opt) -> Sample:
    set_steps(opt, GAP)
    return _timed(opt.step)


#: Seconds that wait_for_idle may still spend in this run (``--wait-budget``), and has spent.
WAIT_BUDGET = {"left": 60.0, "spent": 0.0}


def wait_for_idle(max_wait: float, window: float = 0.1, limit: float = 0.1) -> float:
    """Sleep in ``window``-second slices until the machine is idle (< ``limit`` cores busy), at most
    ``max_wait`` seconds and never beyond the run's wait budget; returns the seconds waited.
    Keeps other processes' bursts out of the samples without letting a busy machine stretch the run."""
    t0 = time.perf_counter()
    max_wait = min(max_wait, WAIT_BUDGET["left"])
    while time.perf_counter() - t0 < max_wait:
        busy0, own0 = busy_cpu_seconds(), own_cpu_seconds()
        time.sleep(window)
        # Our own OpenMP threads may still spin for a moment after the last step: count others only.
        if (busy_cpu_seconds() - busy0) - (own_cpu_seconds() - own0) < limit * window + 0.011:
            break
    waited = time.perf_counter() - t0
    WAIT_BUDGET["left"] = max(0.0, WAIT_BUDGET["left"] - waited)
    WAIT_BUDGET["spent"] += waited
    return waited


#: A sample is "clean" when other processes used less than this many cores on average meanwhile.
CLEAN_OTHERS = 0.2


def robust_median(samples: list[Sample]) -> tuple[float, int, int]:
    """Median of the clean samples (all of them when fewer than half are clean), #used, #total."""
    clean = [x for x in samples if x.clean]
    used = clean if len(clean) * 2 >= len(samples) and clean else samples
    return statistics.median(used), len(clean), len(samples)


def reference_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Tensors in opt.state values, plus the reference projector's ``ortho_matrix`` (tensor or list)."""
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
        proj = state.get("projector")
        mats = getattr(proj, "ortho_matrix", None)
        if mats is not None:
            for t in mats if isinstance(mats, (list, tuple)) else [mats]:
                total += t.numel() * t.element_size()
    return total


def block_steps(opts, args) -> int:
    """Steps per timed block: at least ``--steps``, more for fast optimizers so that a block lasts
    ``--min-block-s`` (short blocks are noisier); always below the refresh gap."""
    slowest = max(time_steady(opt, 2) for opt in opts)
    return int(min(GAP - 2, max(args.steps, math.ceil(args.min_block_s / max(slowest, 1e-6)))))


def measure_steady(opts, args, before=None) -> tuple[list[list[Sample]], int]:
    """Warm up every optimizer, then time blocks of steady steps interleaved A B (C) A B (C) ...;
    ``before(i)`` runs untimed before optimizer i's block."""
    for opt in opts:  # the first step allocates state and computes the first projection
        if before:
            before(opts.index(opt))
        opt.step()
        time_steady(opt, args.warmup)
    steps = block_steps(opts, args)
    samples = [[] for _ in opts]
    for _ in range(args.reps):
        for i, opt in enumerate(opts):
            if before:
                before(i)
            wait_for_idle(args.wait_idle)
            samples[i].append(time_steady(opt, steps))
    return samples, steps


def bench_pair(name, make_ours, make_ref, ref_refreshes, master, args):
    ours, ref = make_ours(make_params(master)), make_ref(make_params(master))
    pair = [ours, ref]
    steady, steps = measure_steady(pair, args)
    refresh = [[], []]
    for _ in range(args.refresh_reps):
        for i, opt in enumerate(pair):
            if i == 1 and not ref_refreshes:
                continue
            wait_for_idle(args.wait_idle)
            refresh[i].append(time_refresh(opt))
            time_steady(opt, 1)  # let any post-refresh allocation settle out of the next sample
    (s_ours, c0, n0), (s_ref, c1, n1) = robust_median(steady[0]), robust_median(steady[1])
    (r_ours, c2, n2) = robust_median(refresh[0])
    (r_ref, c3, n3) = robust_median(refresh[1]) if ref_refreshes else (s_ref, 0, 0)
    row = dict(
        name=name,
        steady=(s_ours, s_ref),
        refresh=(r_ours, r_ref),
        amortized=((r_ours + (GAP - 1) * s_ours) / GAP, (r_ref + (GAP - 1) * s_ref) / GAP),
        bytes=(ours.state_bytes(), reference_state_bytes(ref)),
        spread=(_spread(steady[0]), _spread(steady[1])),
        clean=f"{c0 + c1}/{n0 + n1} steady, {c2 + c3}/{n2 + n3} refresh",
        block=steps,
        faults=(statistics.median(x.faults for x in steady[0]), statistics.median(x.faults for x in steady[1])),
    )
    del ours, ref, pair
    return row


def _spread(xs):
    return (max(xs) - min(xs)) / statistics.median(xs) if xs else 0.0


# ---------------------------------------------------------------- APOLLO matrix regeneration

def _ms_per_call(fn, calls: int, reps: int = 7, wait: float = 5.0) -> float:
    """Median over ``reps`` batches of ``calls`` calls, in ms per call."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(reps):
        wait_for_idle(wait)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(samples)


def bench_regeneration(master, args) -> list[tuple[str, str]]:
    """What lowmem's APOLLO pays on every step to redraw its random matrices instead of storing them."""

    def randn(shape):
        return lambda: torch.randn(shape, generator=torch.Generator().manual_seed(1234), dtype=torch.float32)

    rows = [(label, f"{_ms_per_call(fn, calls, wait=args.wait_idle):.3f} ms") for label, fn, calls in [
        ("torch.Generator().manual_seed(s)", lambda: torch.Generator().manual_seed(1234), 200),
        ("generator + torch.randn (256, 768)", randn((256, 768)), 40),
        ("generator + torch.randn (768, 256)", randn((768, 256)), 40),
        ("generator + torch.randn (256, 2048)", randn((256, 2048)), 20),
        ("generator + torch.randn (1, 768)", randn((1, 768)), 200),
    ]]
    # The whole regeneration as lowmem runs it (generator, randn, / sqrt(r)) for all of this model's matrices.
    for rank in (256, 1):
        proj = GaussianProjector(rank, "std", GAP)
        states = []
        for i, (_, g) in enumerate(master):
            states.append({"seed": i + 1})
            proj.refresh(states[-1], g)
        shapes = sorted({tuple(proj.matrix(st, g).shape) for st, (_, g) in zip(states, master, strict=True)})

        def all_matrices(proj=proj, states=states):
            for st, (_, g) in zip(states, master, strict=True):
                proj.matrix(st, g)

        ms = _ms_per_call(all_matrices, 5 if rank > 1 else 100, wait=args.wait_idle)
        rows.append((f"GaussianProjector.matrix() for all {len(master)} matrices, rank {rank}, shapes "
                     f"{', '.join(map(str, shapes))} (= added per step)", f"{ms:.2f} ms"))

    # In context: lowmem APOLLO as is vs the same optimizer with each matrix cached (as if stored in the
    # state, +4rn bytes per matrix like apollo-torch), vs apollo-torch; interleaved A B C.
    import apollo_torch

    cache: dict = {}
    use_cache = [False]
    original = GaussianProjector.matrix

    def matrix(self, state, grad):
        if not use_cache[0]:
            return original(self, state, grad)
        key = (id(state), state["proj_seed"])
        if key not in cache:
            cache[key] = original(self, state, grad)
        return cache[key]

    group = lambda p: _apollo_group(p, 256, "channel", 1.0)  # noqa: E731
    opts = [lm.APOLLOAdamW(group(make_params(master))), lm.APOLLOAdamW(group(make_params(master))),
            apollo_torch.APOLLOAdamW(group(make_params(master)))]
    GaussianProjector.matrix = matrix
    try:
        samples, steps = measure_steady(opts, args, before=lambda i: use_cache.__setitem__(0, i == 1))
    finally:
        GaussianProjector.matrix = original
    regen, cached, ref = (robust_median(x)[0] * 1e3 for x in samples)
    flt = [statistics.median(x.faults for x in xs) for xs in samples]
    extra = sum(t.numel() * t.element_size() for t in cache.values())
    rows.append(("APOLLO r=256 steady step, lowmem as is (regenerates)",
                 f"{regen:.1f} ms ({flt[0]:,.0f} page faults/step)"))
    rows.append((f"APOLLO r=256 steady step, lowmem with the matrices cached (diagnostic monkeypatch; "
                 f"+{extra:,} B of state)", f"{cached:.1f} ms ({flt[1]:,.0f} page faults/step)"))
    rows.append(("APOLLO r=256 steady step, apollo_torch (stores the matrices)",
                 f"{ref:.1f} ms ({flt[2]:,.0f} page faults/step)"))
    rows.append(("=> regeneration share of lowmem's APOLLO step (as is - cached)",
                 f"{regen - cached:.1f} ms ({(regen - cached) / regen:.0%}); "
                 f"cached / apollo_torch = {cached / ref:.2f}"))
    return rows


# ---------------------------------------------------------------- report

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mib(b: int) -> str:
    return f"{b / 2**20:.2f} MiB"


def short(name: str) -> str:
    """'FRUGAL (svd, density 0.25)' -> 'FRUGAL-svd', 'Fira (r=256, alpha 0.25)' -> 'Fira'."""
    base, _, rest = name.partition(" (")
    return f"{base}-{rest.split(',')[0]}" if base == "FRUGAL" else base


def render(rows, randn_rows, header_lines) -> str:
    out = list(header_lines) + [""]
    out.append("| optimizer | reference | steady ours ms/step | steady ref ms/step | steady ratio | "
               "amortized ours ms/step | amortized ref ms/step | amortized ratio | "
               "refresh step ours / ref ms | state bytes ours | state bytes ref | bytes ratio |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        (so, sr), (ao, ar), (ro, rr), (bo, br) = r["steady"], r["amortized"], r["refresh"], r["bytes"]
        out.append(
            f"| {r['name']} | {r['ref_label']} | {so * 1e3:.1f} | {sr * 1e3:.1f} | **{so / sr:.2f}** | "
            f"{ao * 1e3:.1f} | {ar * 1e3:.1f} | **{ao / ar:.2f}** | {ro * 1e3:.0f} / {rr * 1e3:.0f} | "
            f"{bo:,} ({mib(bo)}) | {br:,} ({mib(br)}) | {bo / br:.3f} |")
    out.append("")
    out.append("Ratio = ours / reference (lower is better; goal <= 1.0). FRUGAL's ratio is against full "
               "torch.optim.AdamW, whose refresh column is just its steady step (it never refreshes).")
    out.append("Steps per timed block and steady-state spread (max-min)/median over repetitions, ours / ref: "
               + ", ".join(f"{short(r['name'])} {r['block']} steps {r['spread'][0]:.0%}/{r['spread'][1]:.0%}"
                           for r in rows) + ".")
    out.append("Minor page faults per steady step, ours / ref (each fault maps and zeroes a fresh 4 KiB page; "
               "they depend on glibc malloc's state, not only on the optimizer): " + ", ".join(
                   f"{short(r['name'])} {r['faults'][0]:,.0f}/{r['faults'][1]:,.0f}" for r in rows) + ".")
    out.append(f"Samples taken while other processes used < {CLEAN_OTHERS} cores (only these enter the medians "
               "when at least half are clean): " + "; ".join(f"{short(r['name'])} {r['clean']}" for r in rows)
               + ".")
    out.append("")
    out.append("APOLLO matrix regeneration in lowmem (redrawn from its seed on every step, not stored). The three "
               "APOLLO steps below are a separate A B C interleaved measurement in fresh optimizers; compare "
               "'as is' with 'cached' (same code, same allocator history), and read apollo_torch's time there "
               "together with its page faults:")
    out.append("")
    out.append("| operation | time |")
    out.append("|---|---:|")
    for label, value in randn_rows:
        out.append(f"| {label} | {value} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="LLaMA-130M decoder layers to build (130M has 12)")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed block (< 199)")
    ap.add_argument("--min-block-s", type=float, default=0.5,
                    help="lengthen the timed blocks of fast optimizers to at least this many seconds")
    ap.add_argument("--reps", type=int, default=7, help="timed blocks per optimizer (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="steady warm-up steps after the first step")
    ap.add_argument("--refresh-reps", type=int, default=3, help="timed refresh steps per optimizer (median)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--wait-idle", type=float, default=5.0,
                    help="before each timed sample, wait up to this many seconds for other processes to go idle")
    ap.add_argument("--wait-budget", type=float, default=60.0, help="total seconds of such waiting per run")
    ap.add_argument("--skip-regeneration", action="store_true", help="skip the APOLLO regeneration section")
    ap.add_argument("--only", default=None, help="comma-separated substrings of optimizer names to run")
    ap.add_argument("--out", default=None, help="write the markdown report to this file")
    args = ap.parse_args(argv)
    if not 1 <= args.steps < GAP - 1:
        ap.error(f"--steps must be in [1, {GAP - 2}] so a timed block never reaches a refresh")

    WAIT_BUDGET["left"] = args.wait_budget
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    master = make_master(args.layers)
    n_params = sum(w.numel() for w, _ in master)
    header = [
        f"date: {datetime.date.today().isoformat()}",
        f"lowmem commit {lowmem_version()}; torch {torch.__version__}; CPU: {cpu_model()} "
        f"({os.cpu_count()} logical CPUs); torch threads: {torch.get_num_threads()}",
        f"model: LLaMA-130M linear weights, {args.layers} of 12 layers = {len(master)} fp32 matrices, "
        f"{n_params:,} parameters; update_proj_gap {GAP}",
        f"timing: median of {args.reps} blocks of >= {args.steps} steps (>= {args.min_block_s} s; ours/ref "
        f"interleaved) after 1 + {args.warmup} warm-up steps; refresh = median of {args.refresh_reps} single "
        f"refresh steps; "
        f"amortized = (refresh + {GAP - 1} x steady) / {GAP}",
    ]
    print("\n".join(header), flush=True)

    rows = []
    busy0, own0 = busy_cpu_seconds(), own_cpu_seconds()
    t_start = time.perf_counter()
    for name, (make_ours, make_ref, ref_label, ref_refreshes) in build_pairs().items():
        if args.only and not any(s.strip().lower() in name.lower() for s in args.only.split(",")):
            continue
        t0 = time.perf_counter()
        row = bench_pair(name, make_ours, make_ref, ref_refreshes, master, args)
        row["ref_label"] = ref_label
        rows.append(row)
        print(f"  {name}: steady {row['steady'][0] * 1e3:.1f} vs {row['steady'][1] * 1e3:.1f} ms, "
              f"refresh {row['refresh'][0] * 1e3:.0f} vs {row['refresh'][1] * 1e3:.0f} ms "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    randn_rows = bench_regeneration(master, args) if not args.skip_regeneration else []
    wall = time.perf_counter() - t_start
    others = max(0.0, (busy_cpu_seconds() - busy0) - (own_cpu_seconds() - own0))
    header.append(f"benchmark wall time: {wall:.0f} s; CPU time used by other processes meanwhile: {others:.1f} s "
                  f"({others / wall:.2f} cores on average; near 0 means the timings were not disturbed); "
                  f"{WAIT_BUDGET['spent']:.0f} s went to idle checks before samples")
    report = render(rows, randn_rows, header)
    print()
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report + "\n")


if __name__ == "__main__":
    main()
