"""Numbers checked against independent computations: SVD gradients, first-order predictions, block SVD, batching,
and the paired held-out comparison against published values and by simulation."""
from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest
import torch

from laser_core import ConfigError, Edit
from laser_core.sequences import Seq, least_padded_batches
from laser_core.gradients import (MatrixSpectrum, first_order_gain, paper_score, singular_value_gradients, spectrum)
from laser_core.grouping import row_order
from laser_core.matrices import MatrixRef
from laser_core.reduction import (block_rank, block_ranks, block_singular_values, block_svd, block_truncate,
                                  energy_kept, row_blocks)
from laser_core.significance import holm, mcnemar_midp, newcombe_interval, paired_change


def test_singular_value_gradient_matches_autograd_through_svd():
    torch.manual_seed(0)
    w = torch.randn(7, 5, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    loss_fn = lambda m: torch.sin(m @ x).sum() + (m ** 2).sum() * 0.3  # noqa: E731
    wg = w.clone().requires_grad_(True)
    loss_fn(wg).backward()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    s_param = s.clone().requires_grad_(True)
    loss_fn(u @ torch.diag(s_param) @ vh).backward()  # autograd through the factorisation
    g = singular_value_gradients(u, wg.grad, vh)
    torch.testing.assert_close(g, s_param.grad, rtol=1e-10, atol=1e-12)


def test_block_svd_with_k1_equals_plain_truncation():
    torch.manual_seed(1)
    w = torch.randn(40, 24)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    for rho in (0.9, 0.5, 0.1, 0.01):
        r = max(1, int(rho * 24))
        torch.testing.assert_close(block_truncate(block_svd(w, 1), rho), (u[:, :r] * s[:r]) @ vh[:r])


def test_block_svd_truncates_each_contiguous_block_separately():
    torch.manual_seed(2)
    w = torch.randn(10, 8)
    out = block_truncate(block_svd(w, 3), 0.5)
    assert row_blocks(10, 3) == [(0, 3), (3, 7), (7, 10)]
    for (a, b), r in zip(row_blocks(10, 3), block_ranks((10, 8), 3, 0.5)):
        u, s, vh = torch.linalg.svd(w[a:b], full_matrices=False)
        torch.testing.assert_close(out[a:b], (u[:, :r] * s[:r]) @ vh[:r])
        assert torch.linalg.matrix_rank(out[a:b]) == r


def test_energy_kept_is_one_minus_the_squared_relative_error_of_the_reduced_matrix():
    """One candidate's "keeps x% of the squared Frobenius norm (relative error e)", against the reduced matrix."""
    torch.manual_seed(3)
    w = torch.randn(24, 10, dtype=torch.float64) @ torch.diag(torch.logspace(1, -1, 10, dtype=torch.float64))
    for k, rho in ((1, 0.5), (3, 0.3), (4, 0.05), (24, 1.0), (5, 0.9)):
        S = block_singular_values(w, k)
        for s, s_full in zip(S, block_svd(w, k).S):
            torch.testing.assert_close(s, s_full)
        err = float(((w - block_truncate(block_svd(w, k), rho)) ** 2).sum() / (w ** 2).sum())
        assert energy_kept(S, rho) == pytest.approx(1 - err, abs=1e-9), (k, rho)
    assert energy_kept(block_singular_values(w, 2), 1.0) == pytest.approx(1.0)
    assert energy_kept(block_singular_values(w, 2), 0.1) < energy_kept(block_singular_values(w, 2), 0.5)


def test_block_spectrum_reads_cached_factors_and_waits_for_no_job_that_holds_the_model(tiny_lm, tmp_path):
    """The spectrum comes from the SVD factors a candidate cached, else from the weights, read under the model's lock
    (a running job's edit is in them): without blocking, None while another thread holds it."""
    import contextlib
    import threading

    from laser_core import Store
    from laser_core.reduction import block_spectrum, get_factors

    @contextlib.contextmanager
    def held_by_another_thread(lock):
        held, release = threading.Event(), threading.Event()

        def hold():
            with lock:
                held.set()
                release.wait(10)
        t = threading.Thread(target=hold)
        t.start()
        assert held.wait(10)
        try:
            yield
        finally:
            release.set()
            t.join()

    lm = tiny_lm("llama")
    name = lm.matrices[3].name
    store = Store(tmp_path / "cache")
    computed = [s.cpu() for s in block_svd(lm.model.get_parameter(name), 2).S]  # block_spectrum's are on the CPU
    torch.testing.assert_close(block_spectrum(lm, name, 2, store), computed)
    with held_by_another_thread(lm.lock):
        assert block_spectrum(lm, name, 2, store, blocking=False) is None
    cached = get_factors(lm, name, 4, store).S  # a candidate of (matrix, K=4) was evaluated: its factors are cached
    with held_by_another_thread(lm.lock):
        torch.testing.assert_close(block_spectrum(lm, name, 4, store, blocking=False), [s.cpu() for s in cached])


def test_an_svd_that_fails_to_converge_on_an_accelerator_is_computed_on_the_cpu(monkeypatch, caplog):
    from laser_core import reduction
    real_svd, w = torch.linalg.svd, torch.randn(6, 4)

    class OnAccelerator:  # a block on a device whose solver fails ("meta" stands in for a GPU here)
        device = torch.device("meta")

        def cpu(self):
            return w

    def svd(a, full_matrices=True):
        if not isinstance(a, torch.Tensor):
            raise torch.linalg.LinAlgError("the algorithm failed to converge")
        return real_svd(a, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    with caplog.at_level("WARNING", logger="laser_core.reduction"):
        u, s, vh = reduction._svd(OnAccelerator())
    assert "SVD did not converge on meta: computing it on the CPU" in caplog.text
    assert [(t.device.type, tuple(t.shape)) for t in (u, s, vh)] == [("meta", (6, 4)), ("meta", (4,)), ("meta", (4, 4))]
    monkeypatch.setattr(torch.linalg, "svd", lambda a, full_matrices=True: (_ for _ in ()).throw(
        torch.linalg.LinAlgError("the algorithm failed to converge")))
    with pytest.raises(torch.linalg.LinAlgError):  # on the CPU there is nothing to fall back to
        reduction._svd(w)


def test_an_approximate_svd_driver_is_kept_only_where_its_factors_rebuild_the_block(monkeypatch, caplog):
    """The drivers of a device are tried in turn (on a GPU: cuSOLVER's gesvda, then torch's default); one that misses
    the block by more than SVD_RESIDUAL gives way to the next. "cpu" stands in for the GPU's driver list here."""
    from laser_core import reduction
    real_svd, w = torch.linalg.svd, torch.randn(12, 30)
    calls = []

    def svd(a, full_matrices=True, driver=None):
        calls.append(driver)
        u, s, vh = real_svd(a, full_matrices=full_matrices)
        return (u, s * (1 + 1e-3), vh) if driver == "sloppy" else (u, s, vh)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    monkeypatch.setitem(reduction.SVD_DRIVERS, "cpu", ("sloppy", None))
    with caplog.at_level("INFO", logger="laser_core.reduction"):
        u, s, vh = reduction._svd(w)
    assert calls == ["sloppy", None] and "SVD driver sloppy missed the block" in caplog.text
    torch.testing.assert_close(s, real_svd(w, full_matrices=False).S)
    calls.clear()
    monkeypatch.setitem(reduction.SVD_DRIVERS, "cpu", ("exact", None))
    reduction._svd(w)
    assert calls == ["exact"]  # its factors rebuild the block: the next driver never runs


@pytest.mark.parametrize("shape", [(48, 96), (96, 48), (64, 64)])
def test_block_svd_on_the_test_device_matches_float64_on_an_ill_conditioned_matrix(shape):
    """Singular values from 1 down to 1e-6 (the trailing ones are what the scores read): within 1e-5 of the largest
    of a float64 SVD, and the factors rebuild the matrix within 1e-5. On a GPU (LASER_LAB_TEST_DEVICE=cuda) this
    checks its driver: torch's default there (gesvdj) missed the demo's singular values by up to 1e-4."""
    from conftest import TEST_DEVICE
    from laser_core.reduction import block_singular_values, block_svd

    torch.manual_seed(0)
    m, n = shape
    q1, _ = torch.linalg.qr(torch.randn(m, min(m, n), dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, min(m, n), dtype=torch.float64))
    truth = torch.logspace(0, -6, min(m, n), dtype=torch.float64)
    w = ((q1 * truth) @ q2.T).float()
    f = block_svd(w.to(TEST_DEVICE), 1)
    s64 = torch.linalg.svdvals(w.double())
    assert float((f.S[0].double().cpu() - s64).abs().max()) < 1e-5
    rebuilt = (f.U[0] * f.S[0]) @ f.Vh[0]
    assert float(torch.linalg.norm(rebuilt.cpu() - w) / torch.linalg.norm(w)) < 1e-5
    alone = block_singular_values(w.to(TEST_DEVICE), 1)[0]  # the dashboard's spectrum where no factors are cached
    assert alone.device.type == "cpu" and float((alone.double() - s64).abs().max()) < 1e-5


def test_block_rank_rule_is_floor_of_rho_times_min_side_at_least_one():
    assert block_rank(100, 50, 0.1) == 5
    assert block_rank(100, 50, 0.005) == 1
    assert block_rank(3, 50, 0.5) == 1
    assert block_rank(64, 64, 1.0) == 64
    assert block_ranks((576, 576), 8, 0.1) == [7] * 8


@pytest.mark.parametrize("rho", [0.0, -0.1, 1.5, float("nan")])
def test_rho_outside_unit_interval_is_rejected_with_its_value(rho):
    with pytest.raises(ConfigError, match="rho must be in \\(0, 1\\]"):
        Edit("x", 1, rho)


def test_gradients_stay_in_the_weights_dtype_and_the_spectra_come_out_float32(tiny_dirs, mc_task):
    """No float32 copy of every gradient: on a GPU that copy went to host RAM (2x a bf16 model's size)."""
    from laser_core import ModelSpec, TaskSpec, load_model, load_task, make_splits
    from laser_core.gradients import calibration_gradients, compute_spectra

    ts = TaskSpec(str(mc_task), n_calib=20, n_test=10)
    ex = make_splits(load_task(ts), ts).examples("calib")
    spectra = {}
    for dtype in ("float32", "bfloat16"):
        lm = load_model(ModelSpec(str(tiny_dirs["llama"]), device="cpu", dtype=dtype))
        grads, _ = calibration_gradients(lm, ex)
        assert {g.dtype for g in grads.values()} == {getattr(torch, dtype)}
        spectra[dtype] = compute_spectra(lm, grads, ks=(1, 2))
    name = "model.layers.1.mlp.up_proj.weight"
    for k in (1, 2):
        for g32, g16 in zip(spectra["float32"][name].g[k], spectra["bfloat16"][name].g[k]):
            assert g16.dtype == torch.float32
            assert torch.corrcoef(torch.stack([g32, g16]))[0, 1] > 0.9  # same signal through bf16 rounding


def test_k_larger_than_rows_is_rejected():
    with pytest.raises(ConfigError, match="K=20 is larger than the matrix's 10 rows"):
        block_svd(torch.randn(10, 4), 20)
    with pytest.raises(ConfigError, match="positive integer"):
        Edit("x", 0, 0.5)


def test_paper_score_sums_only_positive_gradients_of_the_tail():
    ref = MatrixRef(0, "q", "w", (10, 10))
    g = torch.tensor([100.0, -5, 1, -1, 2, 3, -4, 0.5, 0.5, 1])
    sp = MatrixSpectrum(ref, {1: [torch.ones(10)]}, {1: [g]})
    assert paper_score(sp, tail_fraction=0.9) == pytest.approx(1 + 2 + 3 + 0.5 + 0.5 + 1)
    assert paper_score(sp, tail_fraction=0.3) == pytest.approx(0.5 + 0.5 + 1)


@pytest.mark.parametrize("grouping", ["contiguous", "clustered"])
def test_first_order_prediction_matches_measured_loss_change(tiny_lm, mc_task, grouping):
    """Shrink the trailing components by a tiny step and compare the loss change with -eps * sum sigma g (with
    clustered row blocks, the gradient's rows must follow the rows grouped into each block)."""
    from laser_core import TaskSpec, load_task, make_splits
    from laser_core.evaluate import evaluate
    from laser_core.gradients import calibration_gradients

    lm = tiny_lm("llama")
    ts = TaskSpec(str(mc_task), n_calib=30, n_test=10)
    ex = make_splits(load_task(ts), ts).examples("calib")
    name = "model.layers.1.mlp.up_proj.weight"
    grads, _ = calibration_gradients(lm, ex)
    ref = lm.ref(name)
    w0 = dict(lm.model.named_parameters())[name].detach().clone()
    S, g = spectrum(w0, grads[name], [1, 4], grouping)
    sp = MatrixSpectrum(ref, S, g)
    for k, rho in [(1, 0.25), (4, 0.5)]:
        predicted = first_order_gain(sp, k, rho)  # predicted decrease of L when the tail is removed
        tail = w0 - block_truncate(block_svd(w0, k, grouping), rho)
        if grouping == "clustered" and k > 1:  # its blocks are not the contiguous ones
            assert not torch.equal(row_order(w0, k, grouping), torch.arange(w0.shape[0], device=w0.device))
        eps = 1e-2
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                dict(lm.model.named_parameters())[name].copy_(w0 - sign * eps * tail)
            losses.append(evaluate(lm, ex).log_loss)
        with torch.no_grad():
            dict(lm.model.named_parameters())[name].copy_(w0)
        measured_decrease = -(losses[0] - losses[1]) / (2 * eps)
        assert abs(predicted) > 1e-6
        assert measured_decrease == pytest.approx(predicted, rel=0.05, abs=1e-5)



def _padded(seqs, batches) -> int:
    return sum(len(idx) * max(len(seqs[i].ids) for i in idx) for idx in batches)


@pytest.mark.parametrize("seed", range(5))
def test_batches_are_the_least_padded_cut_of_the_sorted_lengths_within_the_limits(seed):
    rng = random.Random(seed)
    seqs = [Seq([0] * rng.randint(3, 60), [0], []) for _ in range(9)]
    cpu, overhead, max_tokens, max_batch = SimpleNamespace(device=torch.device("cpu")), 32, 150, 4
    batches = least_padded_batches(cpu, seqs, max_tokens, max_batch)
    assert sorted(i for idx in batches for i in idx) == list(range(len(seqs)))
    for idx in batches:
        assert len(idx) <= max_batch and (len(idx) == 1 or _padded(seqs, [idx]) <= max_tokens)
    # every cut of the length-sorted order, by brute force: none is cheaper
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids))
    best = min(
        _padded(seqs, parts) + overhead * len(parts)
        for cuts in itertools.product([False, True], repeat=len(order) - 1)
        for parts in [[order[a:b] for a, b in itertools.pairwise([0, *(i + 1 for i, c in enumerate(cuts) if c), len(order)])]]
        if all(len(p) <= max_batch and (len(p) == 1 or _padded(seqs, [p]) <= max_tokens) for p in parts))
    assert _padded(seqs, batches) + overhead * len(batches) == best


def test_rows_after_a_long_cached_lead_make_smaller_batches():
    rng = random.Random(0)
    seqs = [Seq([0] * rng.randint(20, 60), [0], []) for _ in range(200)]
    cpu = SimpleNamespace(device=torch.device("cpu"))
    plain, after_lead = least_padded_batches(cpu, seqs, 2048), least_padded_batches(cpu, seqs, 2048, lead=500)
    assert sorted(i for idx in after_lead for i in idx) == list(range(len(seqs)))
    for idx in after_lead:  # each row holds the lead's keys and values: rows x (lead + width) is bounded
        assert len(idx) * (500 + max(len(seqs[i].ids) for i in idx)) <= 2 * 2048
    assert len(after_lead) > len(plain)
    assert any(len(idx) * (500 + max(len(seqs[i].ids) for i in idx)) > 2 * 2048 for idx in plain)


def test_a_gpu_gets_fewer_fuller_batches_than_a_cpu():
    rng = random.Random(0)
    seqs = [Seq([0] * rng.randint(20, 60), [0], []) for _ in range(200)]
    cpu = least_padded_batches(SimpleNamespace(device=torch.device("cpu")), seqs, 8192)
    gpu = least_padded_batches(SimpleNamespace(device=torch.device("cuda")), seqs, 8192)
    assert len(gpu) < len(cpu) and _padded(seqs, cpu) < _padded(seqs, gpu)
    assert _padded(seqs, cpu) < 1.05 * sum(len(s.ids) for s in seqs)
    assert max(len(b) for b in cpu) <= 64 and max(len(b) for b in gpu) > 64  # a GPU's rows are not capped at 64
    short = [Seq([0] * 20, [0], []) for _ in range(300)]  # 6000 tokens: within the token cap, 256 rows at most
    assert [len(b) for b in least_padded_batches(SimpleNamespace(device=torch.device("cuda")), short, 8192)] == [256, 44]


def _paired(both: int, fixed: int, broken: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Per-question outcomes (before, after) with the given cells of the paired table, in a shuffled order."""
    rows = [(True, True)] * both + [(False, True)] * fixed + [(True, False)] * broken + [(False, False)] * neither
    random.Random(1).shuffle(rows)
    return [b for b, _ in rows], [a for _, a in rows]


def test_paired_change_matches_the_published_values_of_a_paired_table():
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (2017), ch. 8, Cavo et al. (2012):
    # 59 right both times, 6 only after, 16 only before, 80 neither. Published: change -0.0621, Newcombe's
    # square-and-add interval -0.1186 to -0.0046, McNemar mid-p 0.034690 (exact conditional 0.052479).
    c = paired_change(*_paired(59, 6, 16, 80))
    assert (c.n, c.fixed, c.broken) == (161, 6, 16)
    assert c.change == pytest.approx(-0.0621, abs=5e-5)
    assert (c.low, c.high) == (pytest.approx(-0.1186, abs=5e-5), pytest.approx(-0.0046, abs=5e-5))
    assert c.p_value == pytest.approx(0.034690, abs=5e-7)
    assert c.significant and c.verdict() == "a real loss"
    swapped = paired_change(*reversed(_paired(59, 6, 16, 80)))  # after vs before: the mirror image
    assert (swapped.low, swapped.high, swapped.p_value) == (pytest.approx(-c.high), pytest.approx(-c.low),
                                                            pytest.approx(c.p_value))
    assert swapped.verdict() == "a real gain"


def test_mcnemar_midp_of_an_even_or_empty_split_is_no_evidence():
    assert mcnemar_midp(0, 0) == 1.0
    assert mcnemar_midp(3, 3) == pytest.approx(1 - 0.5 * 20 / 64)  # 1 - P(X = 3) / 2 for X ~ Bin(6, 1/2)
    assert mcnemar_midp(0, 1) == pytest.approx(0.5)  # 2 * P(X = 0) - P(X = 0) with one change
    assert paired_change([True, False], [True, False]).verdict() == "within noise"


def test_newcombe_interval_covers_the_true_change_95_percent_of_the_time_on_correlated_pairs():
    # an edit that agrees with the base on most questions, as a low-rank edit does: a strong positive correlation,
    # which an interval for independent samples ignores (it would cover nearly always, i.e. be far too wide)
    rng, n, reps, cells, true = random.Random(0), 100, 1000, (0.5, 0.06, 0.04, 0.40), 0.02
    covered = 0
    for _ in range(reps):
        counts = [0, 0, 0, 0]
        for cell in rng.choices(range(4), weights=cells, k=n):
            counts[cell] += 1
        low, high = newcombe_interval(*counts)
        covered += low <= true <= high
    assert 0.93 <= covered / reps <= 0.975


def test_holm_keeps_what_stands_as_a_family_and_keeps_false_alarms_at_5_percent():
    assert holm([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]  # 0.005 < .05/4, 0.01 < .05/3, 0.03 > .05/2
    assert holm([0.01, 0.015, 0.02]) == [True, True, True]  # Bonferroni (each < .05/3) would drop 0.02
    assert holm([0.044, 0.0072] + [0.2] * 10) == [False] * 12  # the report's two smallest, among 12 changes
    assert holm([]) == []
    rng, reps = random.Random(0), 4000  # ten tests with nothing to find: p uniform
    any_alone = any_holm = 0
    for _ in range(reps):
        ps = [rng.random() for _ in range(10)]
        any_alone += min(ps) < 0.05
        any_holm += any(holm(ps))
    assert 0.35 <= any_alone / reps <= 0.45 and 0.035 <= any_holm / reps <= 0.06  # 1 - 0.95**10 = 0.40 vs 0.049


def test_paired_change_refuses_evaluations_of_different_questions():
    with pytest.raises(ConfigError, match="300 and 200 questions"):
        paired_change([True] * 300, [True] * 200)
    with pytest.raises(ConfigError, match="no questions"):
        paired_change([], [])
