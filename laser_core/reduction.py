"""Block-SVD rank reduction (its factors cached per matrix and K, for every rho) and the one context manager through
which the model's weights are edited.

Rows of W (out x in) are split into K contiguous blocks; block k keeps rank
``max(1, floor(rho * min(rows_k, cols)))`` of its own SVD. K = 1 is plain LASER truncation.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .config import Edit, check_k, check_one_per_matrix, check_rho
from .errors import JobBusy
from .matrices import MatrixRef, matrix_of
from .models import LoadedModel
from .store import FACTORS, Store

log = logging.getLogger(__name__)


@dataclass
class BlockFactors:
    """SVD factors of each row block: ``U[k] @ diag(S[k]) @ Vh[k]`` equals block k of W."""

    U: list[torch.Tensor]
    S: list[torch.Tensor]
    Vh: list[torch.Tensor]

    @property
    def k(self) -> int:
        return len(self.S)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor mapping (for safetensors)."""
        out = {}
        for i in range(self.k):
            out[f"U{i}"], out[f"S{i}"], out[f"Vh{i}"] = self.U[i], self.S[i], self.Vh[i]
        return out

    def to(self, device: torch.device) -> "BlockFactors":
        """The same factors on ``device`` (where the weight they truncate lives)."""
        return BlockFactors(*([t.to(device) for t in ts] for ts in (self.U, self.S, self.Vh)))

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "BlockFactors":
        k = sum(1 for name in t if name.startswith("S"))
        return cls([t[f"U{i}"] for i in range(k)], [t[f"S{i}"] for i in range(k)], [t[f"Vh{i}"] for i in range(k)])


def row_blocks(rows: int, k: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) row ranges of K blocks, sizes differing by at most one."""
    check_k(k, rows)
    bounds = [round(i * rows / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


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


def _svd(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd`` on the block's own device; where an accelerator's solver fails to converge (it can on
    ill-conditioned blocks), the CPU's LAPACK solver takes over and the factors go back to that device."""
    try:
        return torch.linalg.svd(block, full_matrices=False)
    except torch.linalg.LinAlgError:
        if block.device.type == "cpu":
            raise
        log.warning("SVD did not converge on %s: computing it on the CPU", block.device)
        return tuple(t.to(block.device) for t in torch.linalg.svd(block.cpu(), full_matrices=False))


def _full_precision(w: torch.Tensor) -> torch.Tensor:
    """``w`` detached, in float32 (float64 where it is): what every SVD here runs in."""
    return w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32)


def block_svd(w: torch.Tensor, k: int) -> BlockFactors:
    """Deterministic full-precision SVD (``torch.linalg.svd``, float32 or better) of each row block of ``w``, on
    ``w``'s device (a GPU computes the SVDs of a large model's matrices far faster than a few CPU cores)."""
    w32 = _full_precision(w)
    us, ss, vhs = [], [], []
    for s, e in row_blocks(w32.shape[0], k):
        u, sv, vh = _svd(w32[s:e])
        us.append(u)
        ss.append(sv)
        vhs.append(vh)
    return BlockFactors(us, ss, vhs)


def block_singular_values(w: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The singular values of each of the K row blocks of ``w`` (as :func:`block_svd`'s ``S``, without the factors),
    on the CPU."""
    w32 = _full_precision(w)
    return [torch.linalg.svdvals(w32[s:e]).cpu() for s, e in row_blocks(w32.shape[0], k)]


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
    return torch.cat(parts, dim=0)


def reduced_weight(lm: LoadedModel, edit: Edit, factors: BlockFactors | None = None) -> torch.Tensor:
    """New value of the parameter ``edit.name`` (in the parameter's own layout, dtype and device)."""
    ref = lm.ref(edit.name)
    param = dict(lm.model.named_parameters())[edit.name]
    check_k(edit.k, ref.shape[0])
    if factors is None:
        factors = block_svd(matrix_of(param, ref), edit.k)
    w = block_truncate(factors, edit.rho)
    w = w.t() if ref.transposed else w
    return w.to(device=param.device, dtype=param.dtype).contiguous()


def get_factors(lm: LoadedModel, name: str, k: int, store: Store, memo: dict | None = None) -> BlockFactors:
    """Block-SVD factors of matrix ``name`` for K blocks, on the model's device: one SVD per (matrix, K) serves
    every rho (cached in ``store``).

    ``memo`` (a dict a search passes to every candidate) keeps the last (matrix, K)'s factors in memory, so
    that the candidates of one matrix's rho grid neither read them back from the store one by one nor, where
    the store caches nothing (``--no-cache``, the benchmark), compute the SVD again.
    """
    if memo is not None and (name, k) in memo:
        return memo[(name, k)]
    key = _factors_key(store, lm, name, k)
    t = store.get_tensors(key)
    if t is not None:
        f = BlockFactors.from_tensors(t).to(lm.device)
    else:
        store.counts["svd"] += 1
        with lm.lock:  # the base weights: no running job's edit may be in them meanwhile
            f = block_svd(matrix_of(dict(lm.model.named_parameters())[name], lm.ref(name)), k)
        store.put_tensors(key, f.tensors())
    if memo is not None:
        memo.clear()  # searches go matrix by matrix and K by K: one entry is all they reuse
        memo[(name, k)] = f
    return f


def _factors_key(store: Store, lm: LoadedModel, name: str, k: int) -> str:
    return store.key(FACTORS, lm.fingerprint, "-", {"name": name, "k": k})  # FACTORS: the store's bounded part


def block_spectrum(lm: LoadedModel, name: str, k: int, store: Store, blocking: bool = True) -> list | None:
    """The singular values of each of the K row blocks of matrix ``name`` of the unedited model (on the CPU): from
    the cached SVD factors where a candidate of this (matrix, K) was evaluated, else computed from the weights.

    The weights hold a running evaluation's edit until it ends, so they are read under the model's lock; with
    ``blocking`` False, None where another job holds it.
    """
    t = store.get_tensors(_factors_key(store, lm, name, k))
    if t is not None:
        return [s.cpu() for s in BlockFactors.from_tensors(t).S]
    if not lm.lock.acquire(blocking=blocking):
        return None
    try:
        return block_singular_values(matrix_of(lm.model.get_parameter(name), lm.ref(name)), k)
    finally:
        lm.lock.release()


@contextlib.contextmanager
def edited(lm: LoadedModel, edits: Sequence[Edit], factors: dict[tuple[str, int], BlockFactors] | None = None,
           blocking: bool = True) -> Iterator[None]:
    """Apply ``edits`` to ``lm.model`` for the duration of the block; restore every touched weight bit-exactly.

    Holds ``lm.lock`` so no two edits overlap on the same model. Restores on normal exit, exceptions and
    cancellation alike.

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
        new = {e.name: reduced_weight(lm, e, (factors or {}).get((e.name, e.k))) for e in edits}
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
