"""Block-SVD rank reduction (its factors cached per matrix and K, for every rho) and the one context manager through
which the model's weights are edited.

Rows of W (out x in) are split into K blocks (contiguous, or grouped as :mod:`laser_core.grouping` says, in blocks of
the same sizes); block k keeps rank ``max(1, floor(rho * min(rows_k, cols)))`` of its own SVD. K = 1 is plain LASER
truncation.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .config import CONTIGUOUS, Edit, check_k, check_one_per_matrix, check_rho
from .errors import JobBusy
from .grouping import block_sizes, row_order
from .matrices import MatrixRef, matrix_of
from .models import LoadedModel
from .store import FACTORS, Store

log = logging.getLogger(__name__)


@dataclass
class BlockFactors:
    """SVD factors of each row block: ``U[k] @ diag(S[k]) @ Vh[k]`` equals block k of W, the rows
    ``rows[start_k:end_k]`` of W where a grouping ordered them (``rows``), else its contiguous rows."""

    U: list[torch.Tensor]
    S: list[torch.Tensor]
    Vh: list[torch.Tensor]
    rows: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return len(self.S)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor mapping (for safetensors)."""
        out = {}
        for i in range(self.k):
            out[f"U{i}"], out[f"S{i}"], out[f"Vh{i}"] = self.U[i], self.S[i], self.Vh[i]
        if self.rows is not None:
            out["rows"] = self.rows
        return out

    def to(self, device: torch.device) -> "BlockFactors":
        """The same factors on ``device`` (where the weight they truncate lives)."""
        return BlockFactors(*([t.to(device) for t in ts] for ts in (self.U, self.S, self.Vh)),
                            rows=None if self.rows is None else self.rows.to(device))

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "BlockFactors":
        k = sum(1 for name in t if name.startswith("S"))
        return cls([t[f"U{i}"] for i in range(k)], [t[f"S{i}"] for i in range(k)], [t[f"Vh{i}"] for i in range(k)],
                   rows=t.get("rows"))


def row_blocks(rows: int, k: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) row ranges of K blocks, sizes differing by at most one."""
    check_k(k, rows)
    ends = list(itertools.accumulate(block_sizes(rows, k)))
    return list(zip([0] + ends[:-1], ends))


def block_rank(rows: int, cols: int, rho: float) -> int:
    """Rank kept in a block of ``rows`` x ``cols``: ``max(1, floor(rho * min(rows, cols)))``."""
    check_rho(rho)
    return max(1, math.floor(rho * min(rows, cols) + 1e-9))


def block_ranks(shape: tuple[int, int], k: int, rho: float) -> list[int]:
    """Rank kept in each of the K row blocks of a matrix of ``shape``."""
    return [block_rank(e - s, shape[1], rho) for s, e in row_blocks(shape[0], k)]


def params_kept(ref: MatrixRef, k: int, rho: float) -> tuple[list[int], int]:
    """(rank kept per block, parameters of the factored form) of a (K, rho) reduction of ``ref``."""
    ranks = block_ranks(ref.shape, k, rho)
    blocks = row_blocks(ref.shape[0], k)
    return ranks, sum(r * ((b - a) + ref.shape[1]) for r, (a, b) in zip(ranks, blocks))


# cuSOLVER drivers tried in turn per device type (None: torch's default). On an H100, over the demo's 210 matrices,
# gesvda ran in 1.2 s against the default's (gesvdj) 4.2 s, and nearer float64: singular values within 5e-8 of the
# largest against 1e-4, the matrix rebuilt within 3e-7 against 2e-4. It is an approximate method, so its factors
# are kept only where they rebuild the block within SVD_RESIDUAL; else the next driver runs.
SVD_DRIVERS: dict[str, tuple[str | None, ...]] = {"cuda": ("gesvda", None)}
SVD_RESIDUAL = 1e-5  # ||U S Vh - W||_F / ||W||_F a driver tried before the last must reach


def _svd(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd`` on the block's own device, by the first driver of :data:`SVD_DRIVERS` whose factors rebuild
    the block (the last one's are taken as they are); where an accelerator's solvers fail to converge (they can on
    ill-conditioned blocks), the CPU's LAPACK solver takes over and the factors go back to that device."""
    drivers = SVD_DRIVERS.get(block.device.type, (None,))
    for i, driver in enumerate(drivers):
        try:
            u, s, vh = torch.linalg.svd(block, full_matrices=False, **({"driver": driver} if driver else {}))
        except torch.linalg.LinAlgError as e:
            failed = e
            continue
        last = i == len(drivers) - 1
        if last or float(torch.linalg.norm((u * s) @ vh - block)) <= SVD_RESIDUAL * float(torch.linalg.norm(block)):
            return u, s, vh
        log.info("SVD driver %s missed the block by more than %g: trying the next", driver, SVD_RESIDUAL)
    if block.device.type == "cpu":
        raise failed
    log.warning("SVD did not converge on %s: computing it on the CPU", block.device)
    return tuple(t.to(block.device) for t in torch.linalg.svd(block.cpu(), full_matrices=False))


def _full_precision(w: torch.Tensor) -> torch.Tensor:
    """``w`` detached, in float32 (float64 where it is): what every SVD here runs in."""
    return w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32)


def grouped_blocks(w: torch.Tensor, k: int, grouping: str = CONTIGUOUS,
                   rows: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The K row blocks of ``w`` under ``grouping`` (views for contiguous blocks), and the row order they follow
    (None: W's own). ``rows``: an order to follow instead of computing the grouping's (a recipe's recorded one)."""
    if rows is None:
        rows = row_order(w, k, grouping)
    else:
        rows = rows.to(w.device)
    ordered = w if rows is None else w[rows]
    return [ordered[s:e] for s, e in row_blocks(w.shape[0], k)], rows


def block_svd(w: torch.Tensor, k: int, grouping: str = CONTIGUOUS, rows: torch.Tensor | None = None) -> BlockFactors:
    """Deterministic full-precision SVD (``torch.linalg.svd``, float32 or better) of each row block of ``w``, on
    ``w``'s device (a GPU computes the SVDs of a large model's matrices far faster than a few CPU cores); the blocks
    follow ``rows`` where given (see :func:`grouped_blocks`)."""
    blocks, rows = grouped_blocks(_full_precision(w), k, grouping, rows)
    us, ss, vhs = [], [], []
    for block in blocks:
        u, sv, vh = _svd(block)
        us.append(u)
        ss.append(sv)
        vhs.append(vh)
    return BlockFactors(us, ss, vhs, rows)


def block_singular_values(w: torch.Tensor, k: int, grouping: str = CONTIGUOUS) -> list[torch.Tensor]:
    """The singular values of each of the K row blocks of ``w`` (as :func:`block_svd`'s ``S``), on the CPU: without
    the factors, except on a device with drivers of its own in :data:`SVD_DRIVERS` (a GPU's default alone is off)."""
    blocks = grouped_blocks(_full_precision(w), k, grouping)[0]
    return [(_svd(b)[1] if w.device.type in SVD_DRIVERS else torch.linalg.svdvals(b)).cpu() for b in blocks]


def energy_kept(S: Sequence[torch.Tensor], rho: float) -> float:
    """The share of ``||W||_F^2`` that a (K, rho) reduction keeps, from the singular values ``S`` of W's K row blocks.

    The blocks partition W's rows, so it is the kept sigma_i^2 of every block over all of them;
    ``||W - W'||_F / ||W||_F`` is the square root of one minus it. A block has min(rows, cols) singular values,
    which is all :func:`block_rank` reads of its shape.
    """
    total = sum(float((s.double() ** 2).sum()) for s in S)
    kept = sum(float((s[:block_rank(len(s), len(s), rho)].double() ** 2).sum()) for s in S)
    return kept / total if total else 1.0


def block_truncate(f: BlockFactors, rho: float) -> torch.Tensor:
    """The reduced matrix from cached factors: each block keeps its top ``block_rank`` components."""
    parts = []
    for u, s, vh in zip(f.U, f.S, f.Vh):
        r = block_rank(u.shape[0], vh.shape[1], rho)
        parts.append((u[:, :r] * s[:r]) @ vh[:r])
    w = torch.cat(parts, dim=0)
    if f.rows is None:
        return w
    out = torch.empty_like(w)
    out[f.rows] = w  # each row back where the grouping took it from
    return out


def reduced_weight(lm: LoadedModel, edit: Edit, factors: BlockFactors | None = None,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """New value of the parameter ``edit.name`` (in the parameter's own layout, dtype and device), from ``factors``
    where given, else from an SVD of the blocks (which follow ``rows`` where given, see :func:`grouped_blocks`)."""
    ref = lm.ref(edit.name)
    param = dict(lm.model.named_parameters())[edit.name]
    check_k(edit.k, ref.shape[0])
    if factors is None:
        factors = block_svd(matrix_of(param, ref), edit.k, edit.grouping, rows)
    w = block_truncate(factors, edit.rho)
    w = w.t() if ref.transposed else w
    return w.to(device=param.device, dtype=param.dtype).contiguous()


_ORDERS: dict[tuple, list[int] | None] = {}  # edit_row_order's, by (weights, matrix, K, grouping)


def edit_row_order(lm: LoadedModel, edit: Edit) -> list[int] | None:
    """The order of the rows of ``edit``'s matrix whose consecutive runs of :func:`block_sizes` are its K blocks on
    the unedited weights (None: contiguous blocks), once per weights, matrix, K and grouping in this process: those
    of the factors :func:`get_factors` gave (what a search reduced), else computed under the model's lock. What a
    recipe records of a clustered edit (see :mod:`laser_core.grouping`)."""
    key = (lm.fingerprint, *edit.blocks)
    if key not in _ORDERS:
        with lm.lock:
            rows = row_order(matrix_of(lm.model.get_parameter(edit.name), lm.ref(edit.name)), edit.k, edit.grouping)
        _remember_order(key, rows)
    return _ORDERS[key]


def _remember_order(key: tuple, rows: torch.Tensor | None) -> None:
    if len(_ORDERS) >= 256:
        _ORDERS.clear()
    _ORDERS[key] = None if rows is None else rows.cpu().tolist()


def get_factors(lm: LoadedModel, name: str, k: int, store: Store, memo: dict | None = None,
                grouping: str = CONTIGUOUS) -> BlockFactors:
    """Block-SVD factors of matrix ``name`` for K blocks grouped by ``grouping``, on the model's device: one SVD per
    (matrix, K, grouping) serves every rho (cached in ``store``).

    ``memo`` (a dict a search passes to every candidate) keeps the last (matrix, K)'s factors in memory, so
    that the candidates of one matrix's rho grid neither read them back from the store one by one nor, where
    the store caches nothing (``--no-cache``, the benchmark), compute the SVD again.
    """
    if memo is not None and (name, k, grouping) in memo:
        return memo[(name, k, grouping)]
    key = _factors_key(store, lm, name, k, grouping)
    t = store.get_tensors(key)
    if t is not None:
        f = BlockFactors.from_tensors(t).to(lm.device)
    else:
        store.counts["svd"] += 1
        with lm.lock:  # the base weights: no running job's edit may be in them meanwhile
            f = block_svd(matrix_of(dict(lm.model.named_parameters())[name], lm.ref(name)), k, grouping)
        store.put_tensors(key, f.tensors())
    if grouping != CONTIGUOUS and (lm.fingerprint, name, k, grouping) not in _ORDERS:
        _remember_order((lm.fingerprint, name, k, grouping), f.rows)  # a recipe of it needs no lock to record them
    if memo is not None:
        memo.clear()  # searches go matrix by matrix and K by K: one entry is all they reuse
        memo[(name, k, grouping)] = f
    return f


def _factors_key(store: Store, lm: LoadedModel, name: str, k: int, grouping: str) -> str:
    ident = {"name": name, "k": k, **({"grouping": grouping} if k > 1 and grouping != CONTIGUOUS else {})}
    return store.key(FACTORS, lm.fingerprint, "-", ident)  # FACTORS: the store's bounded part


def block_spectrum(lm: LoadedModel, name: str, k: int, store: Store, blocking: bool = True,
                   grouping: str = CONTIGUOUS) -> list | None:
    """The singular values of each of the K row blocks (grouped by ``grouping``) of matrix ``name`` of the unedited
    model (on the CPU): from the cached SVD factors where a candidate of this (matrix, K, grouping) was evaluated,
    else computed from the weights.

    The weights hold a running evaluation's edit until it ends, so they are read under the model's lock; with
    ``blocking`` False, None where another job holds it.
    """
    t = store.get_tensors(_factors_key(store, lm, name, k, grouping))
    if t is not None:
        return [s.cpu() for s in BlockFactors.from_tensors(t).S]
    if not lm.lock.acquire(blocking=blocking):
        return None
    try:
        return block_singular_values(matrix_of(lm.model.get_parameter(name), lm.ref(name)), k, grouping)
    finally:
        lm.lock.release()


@contextlib.contextmanager
def edited(lm: LoadedModel, edits: Sequence[Edit], factors: dict[tuple[str, int, str], BlockFactors] | None = None,
           blocking: bool = True) -> Iterator[None]:
    """Apply ``edits`` to ``lm.model`` for the duration of the block; restore every touched weight bit-exactly.

    Holds ``lm.lock`` so no two edits overlap on the same model. Restores on normal exit, exceptions and
    cancellation alike. ``factors``: SVD factors already at hand, by :attr:`Edit.blocks` (else computed here).

    Raises:
        JobBusy: ``blocking=False`` and another edit holds the model.
        ConfigError: a parameter name is not a block matrix of this model, K/rho are invalid, or two edits
            reduce the same matrix (which one would hold is not said by either).
    """
    edits = check_one_per_matrix(edits)
    if not lm.lock.acquire(blocking=blocking):
        raise JobBusy("another job is editing this model; wait for it to finish or cancel it")
    saved: dict[str, torch.Tensor] = {}
    params = dict(lm.model.named_parameters())
    try:
        new = {e.name: reduced_weight(lm, e, (factors or {}).get(e.blocks)) for e in edits}
        with torch.no_grad():
            for name in list(new):  # popped: once in the weights, no second copy lives through the block
                saved[name] = params[name].detach().clone()
                params[name].copy_(new.pop(name))
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        lm.lock.release()
