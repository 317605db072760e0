"""Projectors: WHERE a parameter's optimizer statistics live.

A projector is stateless code over one parameter's state dict. It says when to refresh, refreshes
from the current gradient (SVD factors, a seed, chosen indices), maps a full gradient down to the
subspace (``down``) and a subspace tensor back up (``up``). Everything it keeps in the state is a
tensor or a plain number, so checkpoints load with ``torch.load(weights_only=True)``.

Shapes use ``nn.Linear`` layout: a gradient is ``m x n`` (out x in).

| projector      | used by               | state it keeps (bytes, fp32)                 |
|----------------|-----------------------|----------------------------------------------|
| identity       | plain AdamW, Adam-mini| nothing                                      |
| svd            | GaLore, Fira, FRUGAL  | ``r x n`` or ``m x r`` factor (4rn / 4mr)    |
| random_orth    | FRUGAL ``random``     | same as svd                                  |
| gaussian       | APOLLO, APOLLO-Mini   | two ints: the matrix is regenerated per step |
| coordinates    | FRUGAL coords/randperm| int64 indices of the kept rows/columns/cells |
| blocks         | FRUGAL blocks         | one bool (is this tensor active)             |
"""

from __future__ import annotations

import math
import re

import torch

from ..kernels.codes_8bit import CHUNK
from .sharded import is_sharded, replicated_like, settled

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def resolve_side(proj_type: str, shape: torch.Size | tuple[int, int]) -> str:
    """Which side carries the rank: ``right`` (moments m x r), ``left`` (r x n) or ``full`` (r x r).

    ``std`` puts the rank on the smaller dimension (GaLore's default).
    """
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"unknown proj_type {proj_type!r}; use one of {PROJ_TYPES}")


def _due(state: dict, gap: int, *keys: str) -> bool:
    """Refresh before the 1st, (T+1)-th, ... update, counted on the step before its increment."""
    return not any(k in state for k in keys) or state.get("step", 0) % gap == 0


class Projector:
    """Base class: the identity projector (full-rank statistics, nothing stored)."""

    #: True for projectors that choose among a group's tensors (blocks) rather than per tensor.
    group_level = False
    #: Chooses which parameters train before their backward (BAdam: ``LayerBlockProjector``).
    chooses_ahead = False

    def check_shape(self, shape: torch.Size, name: str) -> None:
        """Raise a clear error before any step when this projector cannot handle ``shape``."""

    def check_group(self, count: int) -> None:
        """Raise a clear error before any step when a group of ``count`` tensors cannot be handled."""

    def side(self, shape) -> str | None:
        """Which side of an ``m x n`` gradient carries the rank (None: no matrix subspace)."""
        return None

    def needs_refresh(self, state: dict) -> bool:
        return False

    def refresh(self, state: dict, grad: torch.Tensor) -> None:
        """Recompute the subspace from ``grad``."""

    def down(self, state: dict, grad: torch.Tensor) -> torch.Tensor | None:
        return grad

    def up(self, state: dict, low: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Map ``low`` back to the full shape of ``like`` (the full gradient)."""
        return low

    def add_up_(self, p: torch.Tensor, state: dict, low: torch.Tensor, scale: float, alpha: float) -> bool:
        """``p += alpha * (scale * up(low))`` with no temporary of ``p``'s size, where this projector can; False where
        the caller must form ``up`` itself."""
        return False

    def residual(self, state: dict, grad: torch.Tensor, low: torch.Tensor | None) -> torch.Tensor:
        """The part of ``grad`` outside the subspace (``grad - up(down(grad))``); None if there is none."""
        return grad if low is None else None


class _MatrixProjector(Projector):
    """Projection by stored factors: ``right``: G Qᵀ / N Q; ``left``: Qᵀ G / Q N; ``full``: both."""

    def __init__(self, rank: int | None, proj_type: str, update_proj_gap: int, density: float | None = None):
        if proj_type not in PROJ_TYPES:
            raise ValueError(f"unknown proj_type {proj_type!r}; use one of {PROJ_TYPES}")
        if update_proj_gap is None or int(update_proj_gap) < 1:
            raise ValueError(f"update_proj_gap must be a positive integer, got {update_proj_gap!r}")
        self.rank, self.density = rank, density
        self.proj_type, self.gap = proj_type, int(update_proj_gap)

    #: Whether a ``rank`` at or above ``min(m, n)`` projects at ``min(m, n)`` (the SVD's factors have no more
    #: columns, as in galore-torch and fira); APOLLO's random sketch keeps ``rank`` dimensions, as apollo-torch does.
    caps_rank = True

    def rank_for(self, shape) -> int:
        """The rank for this shape: the fixed ``rank`` (at most ``min(m, n)`` where ``caps_rank``), or FRUGAL's
        ``round(density * dim)``."""
        if self.density is None:
            return min(int(self.rank), min(shape)) if self.caps_rank else int(self.rank)
        dim = {"right": shape[1], "left": shape[0], "full": min(shape)}[self.side(shape)]
        return round(dim * self.density)

    def check_shape(self, shape, name):
        if len(shape) != 2:
            raise ValueError(
                f"parameter {name} has shape {tuple(shape)}: low-rank projection needs a 2-D weight; "
                "leave it out of the targets (it will get plain AdamW)"
            )
        if self.density is None and not int(self.rank) >= 1:
            raise ValueError(f"rank={self.rank} must be at least 1 (parameter {name} with shape {tuple(shape)})")

    def full_rank(self, shape) -> bool:
        """Whether ``rank`` reaches ``min(m, n)`` for this shape, so the projection saves nothing."""
        return self.density is None and int(self.rank) >= min(shape)

    def full_rank_warning(self, names: list[str]) -> str:
        """The warning for the matrices (``names``: each with its shape) whose ``min(m, n)`` is at most the rank."""
        return (f"rank={self.rank} is at least min(m, n) for {_listed(names)}: they are projected at min(m, n), i.e. "
                "at full rank, as galore-torch does, so their optimizer state is no smaller than AdamW's. Lower the "
                "rank to save memory.")

    def side(self, shape):
        return resolve_side(self.proj_type, shape)

    def needs_refresh(self, state):
        return _due(state, self.gap, "proj_u", "proj_v")

    def refresh(self, state, grad):
        u, v = self.factors(grad, self.rank_for(grad.shape), self.side(grad.shape))
        if u is not None:
            # sharded: keep this rank's rows of U (m x r), like the gradient's; ``down`` then sums U_i^T G_i over the
            # ranks (an r x n all-reduce) and ``up`` gives each rank its rows. V (r x n) stays whole on every rank.
            state["proj_u"] = u.redistribute(grad.device_mesh, grad.placements) if is_sharded(grad) else u
        if v is not None:
            state["proj_v"] = v

    def factors(self, grad, rank, side):  # pragma: no cover - abstract
        raise NotImplementedError

    def down(self, state, grad):
        side = self.side(grad.shape)
        if side == "right":
            return grad @ state["proj_v"].t()
        if side == "left":  # sharded: each rank's U_i^T G_i, summed over the ranks (an r x n all-reduce)
            return settled(state["proj_u"].t() @ grad)
        return settled(state["proj_u"].t() @ grad @ state["proj_v"].t())

    def residual(self, state, grad, low):
        return grad - self.up(state, low, grad)

    def up(self, state, low, like):
        return self._up_rows(state, low, self.side(like.shape))

    @staticmethod
    def _up_rows(state, low, side, rows: slice | None = None):
        """Rows ``rows`` of the back-projection (all of them for None: a sharded factor is never indexed)."""
        def part(t):
            return t if rows is None else t[rows]
        if side == "right":
            return part(low) @ state["proj_v"]
        if side == "left":
            return part(state["proj_u"]) @ low
        return part(state["proj_u"]) @ low @ state["proj_v"]

    def add_up_(self, p, state, low, scale, alpha):
        """GaLore's back-projection added to the weight a range of rows at a time (``CHUNK`` elements): the m x n update
        never exists whole (for the 1.1B's MLP weights a 23 MB bf16 temporary at a layer-wise step's peak). Each row
        is the same product, scaled and added with the same roundings as the whole update (bit-identical in bf16 on
        this machine's CPU, tested). Plain tensors only: an int8 weight's recorded update and sharded ones form it."""
        if not isinstance(p, torch.Tensor) or is_sharded(p) or is_sharded(low) or p.dim() != 2:
            return False
        side, step = self.side(p.shape), rows_added_at_once(p.shape)
        for start in range(0, p.shape[0], step):
            rows = slice(start, min(start + step, p.shape[0]))
            update = self._up_rows(state, low, side, rows)
            if scale != 1.0:
                update.mul_(scale)
            p[rows].add_(update, alpha=alpha)
        return True


def rows_added_at_once(shape) -> int:
    """How many rows of an m x n weight ``_MatrixProjector.add_up_`` adds at a time: ``CHUNK`` elements' worth."""
    return max(1, CHUNK // shape[1])


def _listed(names: list[str]) -> str:
    """``N matrices (a, b, c, d and K more)``."""
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return f"{len(names)} matri{'x' if len(names) == 1 else 'ces'} ({shown})"


def _to_grad_dtype(t: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``t`` in the gradient's dtype, as a compact tensor of its own: a slice of the full SVD factor would keep the
    whole factor alive in the optimizer state (an m x min(m, n) matrix for a rank-r projector)."""
    return t.clone() if grad.dtype == torch.float32 else t.to(grad.device, grad.dtype)


class SVDProjector(_MatrixProjector):
    """GaLore's projector: the top-r singular vectors of the gradient, refreshed every T steps.

    The SVD runs in fp32; the kept factor is cast to the gradient dtype. ``svd_method="randomized"``
    (opt-in) uses ``torch.svd_lowrank`` (rank + 32 samples, 2 power iterations): several times faster
    when the rank is well below the dimension (7x at rank 64 of 768 on CPU, subspace within 5%), not
    worth it at rank >= dim / 4 (see benchmarks/RESULTS.md).
    """

    def __init__(self, rank, proj_type, update_proj_gap, density=None, svd_method="exact", oversample=32):
        super().__init__(rank, proj_type, update_proj_gap, density)
        if svd_method not in ("exact", "randomized"):
            raise ValueError(f"unknown svd_method {svd_method!r}; use 'exact' (default) or 'randomized'")
        self.svd_method, self.oversample = svd_method, oversample

    def factors(self, grad, rank, side):
        g = grad if grad.dtype == torch.float32 else grad.float()
        if self.svd_method == "randomized":
            q = min(rank + self.oversample, min(g.shape))
            u_all, _, v_all = torch.svd_lowrank(g, q=q, niter=2)
            u, vh = u_all[:, :rank], v_all[:, :rank].t()
        else:
            u_all, _, vh_all = torch.linalg.svd(g, full_matrices=False)
            u, vh = u_all[:, :rank], vh_all[:rank, :]
        u = _to_grad_dtype(u, grad) if side in ("left", "full") else None
        vh = _to_grad_dtype(vh, grad) if side in ("right", "full") else None
        return u, vh


class RandomOrthogonalProjector(_MatrixProjector):
    """FRUGAL's ``random``: a random orthonormal basis (QR of a Gaussian, global RNG), every T steps."""

    def factors(self, grad, rank, side):
        m, n = grad.shape
        u = v = None
        if side in ("left", "full"):
            u = _to_grad_dtype(torch.nn.init.orthogonal_(torch.empty(m, rank, device=grad.device)), grad)
        if side in ("right", "full"):
            v = _to_grad_dtype(torch.nn.init.orthogonal_(torch.empty(rank, n, device=grad.device)), grad)
        # every rank draws the same basis: the global RNG advances alike on all of them
        return (None if u is None else replicated_like(u, grad)), (None if v is None else replicated_like(v, grad))


def next_seed(seed: int, advance: int = 15) -> int:
    """APOLLO's seed chain: the last of ``advance`` int64 draws from a CPU generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (advance,), generator=gen)[-1].item()


class GaussianProjector(_MatrixProjector):
    """APOLLO's projector: a seeded Gaussian N(0, 1/r) matrix, never stored.

    The state keeps two ints (the seed of the current matrix and the next seed); the matrix is drawn
    again from its seed on every step, so APOLLO's state is the two moments alone.
    """

    caps_rank = False

    def __init__(self, rank, proj_type, update_proj_gap):
        super().__init__(rank, proj_type, update_proj_gap)
        if proj_type == "full":
            raise ValueError("proj_type='full' is not available with the random (APOLLO) projector; use std")

    def full_rank_warning(self, names):
        return (f"rank={self.rank} is at least min(m, n) for {_listed(names)}: as in apollo-torch, the random sketch "
                f"keeps {self.rank} dimensions, so their optimizer state is no smaller than AdamW's. Lower the rank "
                "(APOLLO-Mini uses 1) to save memory.")

    def needs_refresh(self, state):
        return _due(state, self.gap, "proj_seed")

    def refresh(self, state, grad):
        state["proj_seed"] = state["seed"]
        state["seed"] = next_seed(state["seed"])

    def matrix(self, state, grad) -> torch.Tensor:
        m, n = grad.shape
        r = self.rank_for(grad.shape)
        shape = (m, r) if self.side(grad.shape) == "left" else (r, n)
        gen = torch.Generator(device=grad.device).manual_seed(state["proj_seed"])
        p = torch.randn(shape, generator=gen, device=grad.device, dtype=torch.float32) / math.sqrt(r)
        return replicated_like(_to_grad_dtype(p, grad), grad)  # every rank draws the same matrix

    def down(self, state, grad):
        p = self.matrix(state, grad)
        return grad @ p.t() if self.side(grad.shape) == "right" else settled(p.t() @ grad)

    def up(self, state, low, like):  # pragma: no cover - APOLLO lifts never project back
        raise NotImplementedError("the APOLLO lift scales the raw gradient and never projects back")


class CoordinateProjector(Projector):
    """FRUGAL's coordinate subspaces: random columns, rows, or single entries (``randk``).

    ``down`` gathers the chosen coordinates, ``up`` scatters into zeros. Indices come from one
    ``torch.randperm`` on the global RNG, as the reference draws them. The count is
    ``floor(density * length)`` for coordinates and ``round(density * dim)`` for FRUGAL's
    ``randperm`` projection (a permutation matrix sliced to r rows/columns, kept here as indices).
    randk keeps one flat int64 index per entry (8 B), half the reference's two index vectors.
    """

    def __init__(self, choice: str, density: float, update_gap: int, permutation_side: str | None = None):
        if choice not in ("columns", "rows", "randk", "permutation"):
            raise ValueError(f"unknown coord_choice {choice!r}; use 'columns', 'rows' or 'randk'")
        self.choice, self.density, self.gap = choice, float(density), int(update_gap)
        self.permutation_side = permutation_side

    def check_shape(self, shape, name):
        if len(shape) != 2:
            raise ValueError(f"parameter {name} has shape {tuple(shape)}: coordinate projection needs a 2-D weight")

    def needs_refresh(self, state):
        return _due(state, self.gap, "proj_idx")

    def refresh(self, state, grad):
        m, n = grad.shape
        if self.choice == "permutation":
            side = self.side(grad.shape)
            r = round({"right": n, "left": m, "full": min(m, n)}[side] * self.density)
            rows = cols = None
            # The reference builds identity-permutation matrices from CPU randperm draws, left first.
            if side in ("left", "full"):
                rows = torch.argsort(torch.randperm(m))[:r].to(grad.device)
            if side in ("right", "full"):
                cols = torch.randperm(n)[:r].to(grad.device)
            state["proj_idx"] = rows if cols is None else cols
            if side == "full":
                state["proj_rows"] = rows
            return
        length = {"columns": n, "rows": m, "randk": m * n}[self.choice]
        state["proj_idx"] = torch.randperm(length, device=grad.device)[: int(length * self.density)]

    def side(self, shape):
        return resolve_side(self.permutation_side, shape) if self.choice == "permutation" else None

    def _axis(self, shape) -> str:
        if self.choice != "permutation":
            return self.choice
        return {"right": "columns", "left": "rows", "full": "full"}[self.side(shape)]

    def down(self, state, grad):
        idx, axis = state["proj_idx"], self._axis(grad.shape)
        if axis == "columns":
            return grad[:, idx]
        if axis == "rows":
            return grad[idx]
        if axis == "full":
            return grad[state["proj_rows"]][:, idx]
        return grad.reshape(-1)[idx]

    def up(self, state, low, like):
        return self._scatter(state, torch.zeros(like.shape, dtype=low.dtype, device=low.device), low)

    def residual(self, state, grad, low):
        return self._scatter(state, grad.clone(), 0.0)

    def _scatter(self, state, full, values):
        idx, axis = state["proj_idx"], self._axis(full.shape)
        if axis == "columns":
            full[:, idx] = values
        elif axis == "rows":
            full[idx] = values
        elif axis == "full":
            full[state["proj_rows"][:, None], idx[None, :]] = values
        else:
            full.view(-1)[idx] = values.reshape(-1) if torch.is_tensor(values) else values
        return full


class BlockProjector(Projector):
    """FRUGAL's block subspace: whole tensors are either active (full statistics) or inactive (none).

    Every ``update_gap`` steps the group's active set moves on: ``descending`` from the last tensor
    backwards, ``ascending`` from the first, ``mirror`` in pairs from both ends, ``random`` a fresh
    permutation (global RNG). ``round(density * len(tensors))`` tensors are active at a time.
    """

    group_level = True
    ORDERS = ("random", "ascending", "descending", "mirror")

    def __init__(self, density: float, update_gap: int, block_order: str):
        if block_order not in self.ORDERS:
            raise ValueError(f"unknown block_order {block_order!r}; use one of {self.ORDERS}")
        self.density, self.gap, self.order = float(density), int(update_gap), block_order

    def num_active(self, num_tensors: int) -> int:
        k = round(num_tensors * self.density)
        if self.order == "mirror" and k % 2:
            raise ValueError(
                f"block_order='mirror' activates tensors in pairs, but density={self.density} gives "
                f"{k} active tensors of {num_tensors}; pick a density that gives an even number"
            )
        return k

    def check_group(self, count):
        self.num_active(count)

    def due(self, states: list[dict]) -> bool:
        """Whether to choose again: before the first step, then every ``gap`` steps of the group (counted by its
        most advanced tensor, so one that skipped an update, say on a NaN gradient, does not reschedule the rest)."""
        steps = [state["step"] for state in states if "step" in state]
        return bool(states) and (not steps or max(steps) % self.gap == 0)

    def choose(self, group: dict, count: int) -> list[int]:
        """Indices of the tensors to activate now; advances the group's cursor (a plain int)."""
        k = self.num_active(count)
        if self.order == "random":
            return torch.randperm(count)[:k].tolist()
        if self.order == "ascending":
            start = group.setdefault("next_block_start", 0)
            nxt = start + k
            group["next_block_start"] = nxt - count if nxt >= count else nxt
            return [i % count for i in range(start, start + k)]
        if self.order == "descending":
            start = group.setdefault("next_block_start", count - 1)
            nxt = start - k
            group["next_block_start"] = nxt + count if nxt < 0 else nxt
            return [i % count for i in range(start, start - k, -1)]
        half = count // 2
        start = group.setdefault("next_block_start", 0)
        chosen = []
        for i in range(start, start + k // 2):
            chosen += [i % half, count - 1 - i % half]
        nxt = start + k // 2
        group["next_block_start"] = nxt - half if nxt >= half else nxt
        return chosen

    def down(self, state, grad):
        return grad if state.get("active") else None


class LayerBlockProjector(Projector):
    """BAdam's block coordinate descent (Luo et al. 2024; the ``badam`` package's ``BlockOptimizer``): one block of
    parameters trains at a time, the others are frozen, so neither their gradients nor their optimizer states exist.

    A block is one transformer layer: the parameters whose names share a ``layers.<i>.`` prefix, in the order they
    first appear; parameters in no layer (embeddings, final norm, head) never train, as in the reference's default.
    The first block trains from construction on; after step ``t`` (counted from 1) the next block takes over when
    ``(t + 1) % switch_interval == 0`` (so the first block gets one step fewer, as in the reference). ``switch_mode``:
    ``ascending`` / ``descending`` (from ``start_block``, or the first / last block), ``random`` (each round of blocks
    in a fresh ``torch.randperm`` order, global RNG) or ``fixed`` (``start_block`` only). Every switch drops every
    optimizer state, the reference's restart of Adam; low-precision weights of the new block get an fp32 master copy
    (``master``) for the time they train, as the reference keeps.

    The optimizer applies the choices (``LowMemOptimizer.activate_block``): ``requires_grad`` follows the block. The
    group keeps the schedule in plain keys (``badam_steps``, ``badam_block``, ``badam_next``, ``badam_order``), so a
    checkpoint resumes it.
    """

    chooses_ahead = True
    MODES = ("ascending", "descending", "random", "fixed")
    LAYER = re.compile(r".*layers.[^.]*\.")

    def __init__(self, switch_interval: int, switch_mode: str, start_block: int | None):
        if switch_mode not in self.MODES:
            raise ValueError(f"unknown switch_mode {switch_mode!r}; use one of {self.MODES}")
        if int(switch_interval) < 1:
            raise ValueError(f"switch_interval={switch_interval}: BAdam switches blocks every switch_interval >= 1 "
                             "steps (switch_mode='fixed' keeps one block)")
        if switch_mode == "fixed" and start_block is None:
            raise ValueError("switch_mode='fixed' trains one block: give start_block (its index)")
        if switch_mode == "random" and start_block is not None:
            raise ValueError("switch_mode='random' draws the blocks' order; start_block applies to ascending, "
                             "descending and fixed")
        self.gap, self.mode, self.start_block = int(switch_interval), switch_mode, start_block

    def blocks(self, names: list[str]) -> list[list[int]]:
        """The indices of ``names`` in each block, blocks in order of first appearance."""
        prefixes: list[str] = []
        for name in names:
            found = self.LAYER.match(name)
            if found and found.group(0) not in prefixes:
                prefixes.append(found.group(0))
        return [[i for i, name in enumerate(names) if prefix in name] for prefix in prefixes]

    def check_names(self, names: list[str] | None) -> int:
        if not names or not self.blocks(names):
            raise ValueError("BAdam trains one transformer layer at a time and found no 'layers.<i>.' parameters: "
                             "give it named parameters (create_optimizer('badam', model) does)")
        count = len(self.blocks(names))
        if self.start_block is not None and not 0 <= self.start_block < count:
            raise ValueError(f"start_block={self.start_block}: the model has blocks 0 to {count - 1}")
        return count

    def start(self, group: dict) -> list[int]:
        """Schedule the first block of a new group (``badam_next``, the reference's cursor) and switch to it."""
        count = self.check_names(group.get("param_names"))
        group["badam_steps"] = 0
        if self.start_block is not None:
            group["badam_next"] = self.start_block
        elif self.mode == "random":
            group["badam_order"] = torch.randperm(count).tolist()
            group["badam_next"] = group["badam_order"].pop()
        else:
            group["badam_next"] = count - 1 if self.mode == "descending" else 0
        return self.switch(group)

    def advance(self, group: dict) -> bool:
        """Count a step of the group; whether the next block takes over now."""
        group["badam_steps"] += 1
        return (group["badam_steps"] + 1) % self.gap == 0

    def switch(self, group: dict) -> list[int]:
        """Make the scheduled block the active one, schedule the next; the active block's parameter indices."""
        blocks = self.blocks(group["param_names"])
        active = group["badam_block"] = group["badam_next"]
        if self.mode == "random":
            if not group["badam_order"]:
                group["badam_order"] = torch.randperm(len(blocks)).tolist()
            group["badam_next"] = group["badam_order"].pop()
        elif self.mode != "fixed":
            group["badam_next"] = (active + (1 if self.mode == "ascending" else -1)) % len(blocks)
        return blocks[active]

    def active(self, group: dict) -> list[int]:
        """The active block's parameter indices (after a resume: what ``requires_grad`` must say again)."""
        return self.blocks(group["param_names"])[group["badam_block"]]


PROJECTORS = ("identity", "svd", "random_orth", "gaussian", "coordinates", "permutation", "blocks", "layer_blocks")


def make_projector(group: dict) -> Projector:
    """Build the projector named by ``group['projector']`` with the group's options."""
    name = group.get("projector", "identity")
    gap = group.get("update_proj_gap", 200)
    rank, density, proj_type = group.get("rank"), group.get("density"), group.get("proj_type", "std")
    if name == "identity":
        return Projector()
    if name == "svd":
        return SVDProjector(rank, proj_type, gap, density, group.get("svd_method", "exact"))
    if name == "random_orth":
        return RandomOrthogonalProjector(rank, proj_type, gap, density)
    if name == "gaussian":
        return GaussianProjector(rank, proj_type, gap)
    if name == "coordinates":
        return CoordinateProjector(group.get("coord_choice", "columns"), density, gap)
    if name == "permutation":
        return CoordinateProjector("permutation", density, gap, permutation_side=proj_type)
    if name == "blocks":
        return BlockProjector(density, gap, group.get("block_order", "random"))
    if name == "layer_blocks":
        return LayerBlockProjector(group.get("switch_interval", 50), group.get("switch_mode", "descending"),
                                   group.get("start_block"))
    raise ValueError(f"unknown projector {name!r}; use one of {PROJECTORS}")
