"""Singular-value gradients and the scores that rank matrices for reduction.

Sign convention (used everywhere in LASER Lab): L is the calibration log-loss, which we minimise, and
``g_i = dL/dsigma_i = u_i^T G v_i`` with ``G = dL/dW``. A gradient-descent step changes sigma_i by
``-lr * g_i``, so **g_i > 0 means descent pushes sigma_i toward zero**: the loss wants that direction
smaller. The paper calls these "negative gradients" because it writes the descent direction (or the
log-likelihood, whose gradient is -g). Removing components is then predicted to help.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .config import CONTIGUOUS
from .errors import ConfigError, NumericsError
from .evaluate import CancelToken
from .forward import lead_cache, rows_and_batches, scored_logprobs
from .matrices import MatrixRef, matrix_of
from .memory import halving
from .models import LoadedModel
from .reduction import block_rank, block_svd, row_blocks
from .tasks import Example

log = logging.getLogger(__name__)
GRADIENT_TOKENS = 4096  # padded tokens per batch of the gradient step; halved while the device runs out of memory...
MIN_GRADIENT_TOKENS = 16  # ...down to this (one row per batch, or about)


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise NumericsError(f"{what} is NaN or infinite (the model's output overflowed; try float32)")


def loss_backward(lm: LoadedModel, examples: Sequence[Example], max_tokens: int = GRADIENT_TOKENS,
                  cancel: CancelToken | None = None, progress: Callable[[int, int], None] | None = None) -> float:
    """Accumulate ``d log_loss / d weight`` into ``.grad`` of the parameters that require grad.

    Runs batch by batch (backward after each) so memory stays that of one batch. Returns the log-loss.
    """
    seqs, fast, lead, batches = rows_and_batches(lm, examples, max_tokens, gold_only=True)
    ex = list(examples)
    total = 0.0
    for bn, idx in enumerate(batches):
        if cancel:
            cancel.check()
        batch = [seqs[i] for i in idx]
        lps = scored_logprobs(lm, batch, lead=lead_cache(lm, lead))  # per batch: one graph each
        terms = []
        for s, lp in zip(batch, lps):
            e = ex[s.example]
            terms.append(-lp[e.answer] if (fast or lm.kind == "masked") else -lp.mean())
        loss = torch.stack(terms).sum() / len(ex)
        _check_finite(loss, "the calibration loss")
        loss.backward()
        total += loss.item()
        if progress:
            progress(bn + 1, len(batches))
    return total


def gradient_tokens(lm: LoadedModel, examples: Sequence[Example], max_tokens: int = GRADIENT_TOKENS) -> int:
    """The tokens :func:`loss_backward` runs for ``examples``: each batch's rows times its width, plus the shared
    lead that each batch runs again. Its time follows these more than the number of examples (100 calibration
    examples of truthful_qa hold about 5 times FEVER's tokens, qa_wikidata's a quarter): what prices the gradient
    step of one task from another's."""
    seqs, _, lead, batches = rows_and_batches(lm, examples, max_tokens, gold_only=True)
    return sum(len(idx) * max(len(seqs[i].ids) for i in idx) + len(lead) for idx in batches)


def singular_value_gradients(u: torch.Tensor, grad: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """``g_i = u_i^T G v_i`` for every singular triplet: the gradient of the loss w.r.t. each sigma_i.

    Args:
        u: (m, r) left singular vectors; grad: (m, n) dL/dW; vh: (r, n) right singular vectors (V^T).
    Returns:
        (r,) tensor of dL/dsigma_i.
    """
    return ((grad.to(u.dtype) @ vh.t()) * u).sum(dim=0)


def calibration_gradients(lm: LoadedModel, examples: Sequence[Example], cancel: CancelToken | None = None,
                          progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """One batched forward+backward over ``examples``: ``G = dL/dW`` (out x in) for every matrix.

    Only the located matrices get gradients. Each gradient is left where autograd made it, on the model's
    device in the weight's dtype, and not copied: on a GPU, copying every gradient to the host in float32
    would take twice a bf16 model's size of host RAM (about 26 GB for 7B parameters) for nothing, since
    :func:`compute_spectra` uses them on the model's device. The model's weights are not changed;
    ``requires_grad`` and ``.grad`` are reset on exit. Returns (gradients by parameter name, log-loss).
    """
    params = dict(lm.model.named_parameters())
    names = [r.name for r in lm.matrices]
    with lm.lock:
        try:
            for n in names:
                params[n].grad = None
                params[n].requires_grad_(True)
            loss = _backward_fitting(lm, examples, [params[n] for n in names], cancel, progress)
            grads = {}
            for r in lm.matrices:
                g = params[r.name].grad
                if g is None:
                    g = torch.zeros_like(params[r.name])
                grads[r.name] = matrix_of(g, r).detach()
        finally:
            for n in names:
                params[n].requires_grad_(False)
                params[n].grad = None
    return grads, loss


def _backward_fitting(lm: LoadedModel, examples: Sequence[Example], params: list[torch.Tensor],
                      cancel: CancelToken | None, progress: Callable[[int, int], None] | None) -> float:
    """:func:`loss_backward` in batches of :data:`GRADIENT_TOKENS` padded tokens, run again from the start with half
    as many (the gradients accumulated so far of ``params`` dropped) while the device runs out of memory, down to
    :data:`MIN_GRADIENT_TOKENS`. The same sum either way, up to float rounding. Returns the log-loss."""
    def run(tokens: int) -> float:
        with torch.enable_grad():
            return loss_backward(lm, examples, tokens, cancel, progress)

    def smaller(tokens: int) -> None:
        for p in params:
            p.grad = None
        log.warning("the gradient step ran out of memory on %s in batches of %d tokens: again in batches of %d",
                    lm.device, tokens * 2, tokens)
    return halving(run, GRADIENT_TOKENS, MIN_GRADIENT_TOKENS, smaller)


@dataclass
class MatrixSpectrum:
    """Per matrix and K: singular values and their gradients for each row block (K=1: one block)."""

    ref: MatrixRef
    S: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # K -> per-block singular values
    g: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # K -> per-block dL/dsigma
    finite: bool = True


def spectrum(w: torch.Tensor, grad: torch.Tensor, ks: Sequence[int],
             grouping: str = CONTIGUOUS) -> tuple[dict, dict]:
    """Block singular values and singular-value gradients of ``w`` for each K in ``ks`` (rows grouped into blocks
    by ``grouping``), computed on ``w``'s device (``grad`` in float32, one matrix at a time) and returned on the
    CPU."""
    grad = grad.to(w.device, torch.float32)
    S, g = {}, {}
    for k in ks:
        f = block_svd(w, k, grouping)
        rows = grad if f.rows is None else grad[f.rows]  # the gradient's rows in the blocks' order
        S[k] = [s.cpu() for s in f.S]
        g[k] = [singular_value_gradients(u, rows[a:b], vh).cpu()
                for (a, b), u, vh in zip(row_blocks(w.shape[0], k), f.U, f.Vh)]
    return S, g


# ---- scores: a registry of named rules, each mapping a spectrum to a number (higher = try first) ----

def paper_score(sp: MatrixSpectrum, tail_fraction: float = 0.9, **_) -> float:
    """The paper's rule: sum of the push toward zero, max(g_i, 0), over the trailing ``tail_fraction`` of
    the spectrum (default 0.9: every component a rho=0.1 reduction would drop)."""
    g = sp.g[1][0]
    start = min(len(g) - 1, int(math.floor((1.0 - tail_fraction) * len(g) + 1e-9)))
    return float(g[start:].clamp(min=0).sum())


def first_order_gain(sp: MatrixSpectrum, k: int, rho: float) -> float:
    """Predicted loss decrease of the (K, rho) reduction, to first order: ``-dL = sum_{i>=r_k} sigma_i g_i``.

    Dropping component i changes sigma_i by -sigma_i, so dL ~= sum_i g_i * (-sigma_i) over the dropped ones;
    with K blocks, each block's gradient rows are projected on that block's own SVD.
    """
    cols = sp.ref.shape[1]
    total = 0.0
    for (a, b), s, g in zip(row_blocks(sp.ref.shape[0], k), sp.S[k], sp.g[k]):
        r = block_rank(b - a, cols, rho)
        total += float((s[r:] * g[r:]).sum())
    return total


def first_order_score(sp: MatrixSpectrum, ks: Sequence[int] = (1,), rhos: Sequence[float] = (0.1,), **_) -> float:
    """Best predicted loss decrease over the (K, rho) grid (see :func:`first_order_gain`)."""
    return max(first_order_gain(sp, k, r) for k in ks if k in sp.S for r in rhos)


SCORES: dict[str, Callable[..., float]] = {"paper": paper_score, "first_order": first_order_score}


def get_score(name: str) -> Callable[..., float]:
    """The score function registered as ``name``; ConfigError listing the known names otherwise."""
    if name not in SCORES:
        raise ConfigError(f"unknown score {name!r}; known scores: {', '.join(sorted(SCORES))}")
    return SCORES[name]


def compute_spectra(lm: LoadedModel, grads: dict[str, torch.Tensor], ks: Sequence[int] = (1,),
                    cancel: CancelToken | None = None, progress: Callable[[int, int], None] | None = None,
                    grouping: str = CONTIGUOUS) -> dict[str, MatrixSpectrum]:
    """SVD of every located matrix (per K, rows grouped by ``grouping``) and its singular-value gradients.
    Non-finite gradients are kept but flagged (``finite=False``): the matrix is skipped by searches and reported,
    not a crash."""
    params = dict(lm.model.named_parameters())
    out = {}
    for i, r in enumerate(lm.matrices):
        if cancel:
            cancel.check()
        grad = grads[r.name]
        finite = bool(torch.isfinite(grad).all())
        w = matrix_of(params[r.name], r).detach().float()  # the SVD runs where the model is
        usable_ks = [k for k in ks if k <= r.shape[0]]
        if finite:
            S, g = spectrum(w, grad, usable_ks, grouping)
        else:
            log.warning("gradient of %s is NaN/inf: matrix skipped", r.name)
            S, g = spectrum(w, torch.zeros_like(grad), [1])
        out[r.name] = MatrixSpectrum(r, S, g, finite)
        if progress:
            progress(i + 1, len(lm.matrices))
    return out


def score_matrices(spectra: dict[str, MatrixSpectrum], score: str = "paper", tail_fraction: float = 0.9,
                   ks: Sequence[int] = (1,), rhos: Sequence[float] = (0.1,)) -> dict[str, float]:
    """Score of every matrix under the rule ``score``; matrices with non-finite gradients get NaN."""
    fn = get_score(score)
    return {name: (fn(sp, tail_fraction=tail_fraction, ks=ks, rhos=rhos) if sp.finite else float("nan"))
            for name, sp in spectra.items()}


def top_q(scores: dict[str, float], q: int) -> list[str]:
    """Names of the ``q`` highest finite scores, best first."""
    finite = [(s, n) for n, s in scores.items() if not math.isnan(s)]
    if not finite:
        raise NumericsError("every matrix has a NaN/inf gradient: the calibration loss is not usable")
    if q > len(scores):
        raise ConfigError(f"q={q} is larger than the model's {len(scores)} matrices")
    return [n for _, n in sorted(finite, key=lambda t: -t[0])[:q]]
