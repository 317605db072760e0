"""CPU benchmark: one projector refresh of LLaMA-130M-shaped gradients, exact SVD vs the opt-in randomized SVD.

GaLore / Fira / FRUGAL-svd recompute their subspace every ``update_proj_gap`` steps; with the exact SVD
(the default, identical to the references) that step costs ~20x a normal one on CPU. ``svd_method=
"randomized"`` (``torch.svd_lowrank``, rank + 32 samples, 2 power iterations) approximates the same
subspace. Reports ms per matrix and the subspace difference ||P_exact - P_fast|| / ||P_exact||
(P = QᵀQ, the projector onto the kept subspace) on matrices whose singular values decay as 1/(1+i):
a slow decay, so a conservative case (trained-model gradients are closer to low rank).

Run: ``PYTHONPATH=. python benchmarks/bench_svd_refresh.py``
"""

import statistics
import time

import torch

from lowmem.optim.projectors import SVDProjector


def gradient(m: int, n: int, seed: int) -> torch.Tensor:
    """A gradient-like matrix: singular values decaying as 1/(1+i)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    return (u * (1.0 / (1 + torch.arange(k)))) @ v.t()


def time_refresh(proj: SVDProjector, grad: torch.Tensor, reps: int = 3) -> tuple[float, dict]:
    times, state = [], {}
    for _ in range(reps):
        t0 = time.perf_counter()
        proj.refresh(state, grad)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), state


def main() -> None:
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    print("| shape (m x n) | rank | exact SVD ms | randomized ms | speed-up | subspace difference |")
    print("|---|---:|---:|---:|---:|---:|")
    for (m, n), rank in [((768, 768), 256), ((2048, 768), 256), ((768, 2048), 256), ((768, 768), 64),
                         ((2048, 768), 64), ((4096, 4096), 256)]:
        grad = gradient(m, n, seed=m + n)
        t_exact, s_exact = time_refresh(SVDProjector(rank, "std", 200), grad)
        t_fast, s_fast = time_refresh(SVDProjector(rank, "std", 200, svd_method="randomized"), grad)
        key = "proj_v" if m >= n else "proj_u"
        q1, q2 = s_exact[key], s_fast[key]
        p1, p2 = (q1.t() @ q1, q2.t() @ q2) if key == "proj_v" else (q1 @ q1.t(), q2 @ q2.t())
        diff = ((p1 - p2).norm() / p1.norm()).item()
        print(f"| {m} x {n} | {rank} | {t_exact:.0f} | {t_fast:.0f} | {t_exact / t_fast:.1f}x | {diff:.3f} |")


if __name__ == "__main__":
    main()
