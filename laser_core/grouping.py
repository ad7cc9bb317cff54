"""How a matrix's rows are grouped into the K blocks of a multi-subspace reduction (a registry, ``GROUPINGS``).

- ``contiguous`` (the default, the paper's): block k holds rows ``[round(k*n/K), round((k+1)*n/K))``.
- ``clustered``: rows that point along the same line are grouped, as projective clustering groups them (each block
  then lies closer to a low-dimensional subspace, so the same ranks keep more of W). Balanced K-lines clustering:
  Lloyd iterations on the rows' directions, sign ignored (a row and its negative span one line), each block as
  large as its contiguous counterpart, so the ranks kept and the parameter count of a (K, rho) reduction are
  those of the contiguous one and the two compare on equal terms. Deterministic (no random start).

K = 1 is one block of every row under any grouping: plain LASER truncation.
"""
from __future__ import annotations

from typing import Callable

import torch

from .config import CONTIGUOUS
from .errors import ConfigError

MAX_ITERATIONS = 25


def block_sizes(rows: int, k: int) -> list[int]:
    """Rows of each of K blocks, sizes differing by at most one (the contiguous blocks' sizes, for every grouping)."""
    bounds = [round(i * rows / k) for i in range(k + 1)]
    return [bounds[i + 1] - bounds[i] for i in range(k)]


def _contiguous(w: torch.Tensor, k: int) -> None:
    return None


def _balanced_assign(sim: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Cluster of each row, most similar first, no cluster past its size: in rounds, every unplaced row asks for
    its most similar cluster with room left, and each cluster takes the most similar of those asking."""
    n, k = sim.shape
    room = torch.tensor(sizes, device=sim.device)
    label = torch.full((n,), -1, dtype=torch.long, device=sim.device)
    while bool((label < 0).any()):
        free = (label < 0).nonzero().squeeze(1)
        wish = sim[free].masked_fill(room[None, :] <= 0, -torch.inf).argmax(dim=1)
        for c in wish.unique().tolist():
            asking = free[wish == c]
            take = asking[sim[asking, c].argsort(descending=True, stable=True)[:int(room[c])]]
            label[take] = c
            room[c] -= len(take)
    return label


def _clustered(w: torch.Tensor, k: int) -> torch.Tensor:
    """Row order of balanced K-lines clustering: the rows of block 0 (ascending), then block 1's, and so on."""
    norms = w.norm(dim=1)
    x = w / norms[:, None].clamp_min(torch.finfo(w.dtype).tiny)
    # a deterministic start far apart: the longest row, then each time the row least aligned with those chosen
    picks = [int(norms.argmax())]
    near = (x @ x[picks[0]]).abs()
    for _ in range(1, k):
        picks.append(int(near.argmin()))
        near = torch.maximum(near, (x @ x[picks[-1]]).abs())
    centres = x[picks]
    sizes = block_sizes(w.shape[0], k)
    label = None
    for _ in range(MAX_ITERATIONS):
        new = _balanced_assign((x @ centres.T).abs(), sizes)
        if label is not None and torch.equal(new, label):
            break
        label = new
        for c in range(k):  # each centre: one power step toward its rows' principal direction
            rows = x[label == c]
            v = rows.T @ (rows @ centres[c])
            centres[c] = v / v.norm() if float(v.norm()) > 0 else centres[c]
    first = torch.stack([(label == c).nonzero().min() for c in range(k)])  # blocks in order of their first row
    return torch.cat([(label == c).nonzero().squeeze(1) for c in first.argsort().tolist()])


GROUPINGS: dict[str, Callable[[torch.Tensor, int], torch.Tensor | None]] = {
    CONTIGUOUS: _contiguous, "clustered": _clustered}
GROUPING_HELP = {CONTIGUOUS: "contiguous row blocks, as the paper splits them",
                 "clustered": "rows grouped by direction (balanced K-lines clustering), blocks of the same sizes"}


def check_grouping(name: str) -> str:
    """``name`` if it is a known grouping; ConfigError listing the known ones otherwise."""
    if name not in GROUPINGS:
        raise ConfigError(f"unknown row grouping {name!r}; known groupings: {', '.join(GROUPINGS)}")
    return name


def check_row_order(order, rows: int, what: str) -> torch.Tensor:
    """``order`` (a list of row indices, as a recipe records it) as a tensor, once it is known to be an order of all
    ``rows`` rows: each once. ConfigError naming ``what`` otherwise."""
    if not isinstance(order, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in order):
        raise ConfigError(f"{what}: the row order must be a list of row numbers")
    if sorted(order) != list(range(rows)):
        raise ConfigError(f"{what}: the row order must list each of the matrix's {rows} rows once "
                          f"(it lists {len(order)} numbers, {len(set(order))} distinct)")
    return torch.tensor(order, dtype=torch.long)


def row_order(w: torch.Tensor, k: int, grouping: str = CONTIGUOUS) -> torch.Tensor | None:
    """The order of ``w``'s rows whose consecutive :func:`block_sizes` runs are the K blocks; None for the
    identity (contiguous blocks, or K = 1). Computed in float32 (or better) on ``w``'s device."""
    if k == 1:
        return None
    check_grouping(grouping)
    return GROUPINGS[grouping](w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32), k)
