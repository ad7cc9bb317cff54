"""Candidate stacking: several rhos of one (matrix, K) in one forward give each candidate's own evaluation (1e-4)."""
from __future__ import annotations

import re

import pytest
import torch

from laser_core import Edit, SearchConfig, TaskSpec, edited, load_task, make_splits, run_search
from laser_core.errors import Cancelled, ConfigError, NumericsError
from laser_core.evaluate import CancelToken, evaluate, evaluate_copies
from laser_core.models import from_module, weight_hashes
from laser_core.prefix_states import PrefixStates
from laser_core.reduction import block_svd
from laser_core.matrices import matrix_of
from laser_core.stacking import stack_size, stacked

from conftest import OTHER_ARCHS, build_other
from test_prefix_reuse import LEAD_MULTI, LEAD_ONE, MULTI, ONE_TOKEN

RHOS = (0.9, 0.5, 0.25)


def _factors(lm, name, k):
    return block_svd(matrix_of(lm.model.get_parameter(name), lm.ref(name)), k)


def _assert_stack_equals_one_by_one(lm, examples, ref, k=2):
    """Each run of a stack of RHOS, with and without cached states, against that edit's own evaluation."""
    edits = [Edit(ref.name, k, r) for r in RHOS]
    prefix = PrefixStates(lm, examples, ref.layer)
    starts = [None, prefix, prefix.at_matrix(lm, ref.name)]
    f = _factors(lm, ref.name, k)
    with stacked(lm, edits, f) as runs:
        stacks = [evaluate_copies(lm, examples, runs, prefix=p) for p in starts]
    alone = []
    for e in edits:
        with edited(lm, [e]):
            alone.append(evaluate(lm, examples))
    for got in stacks:
        for e, a, b in zip(edits, got, alone):
            for x, y in zip(a.choice_logprobs, b.choice_logprobs):
                assert x == pytest.approx(y, abs=1e-4), (ref.name, e.rho, x, y)
            assert a.predictions == b.predictions and a.log_loss == pytest.approx(b.log_loss, abs=1e-4)
    return alone


@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta"])
def test_a_stack_gives_each_candidate_its_own_evaluation_at_every_matrix(tiny_lm, arch):
    """Every matrix of both blocks (the last with its lean MLP; GPT-2's Conv1D and fused qkv; a masked LM), choices
    packed or one token, a shared lead, padding: each run equals its edit evaluated alone, with the full forward
    and from cached states (block and matrix entry), and the runs differ (each has its own weights)."""
    lm = tiny_lm(arch)
    before = weight_hashes(lm.model)
    for examples in ([ONE_TOKEN] if lm.kind == "masked" else [ONE_TOKEN, MULTI, LEAD_ONE, LEAD_MULTI]):
        for ref in lm.matrices:
            alone = _assert_stack_equals_one_by_one(lm, examples, ref)
            assert alone[0].choice_logprobs != alone[-1].choice_logprobs, ref.name
    assert weight_hashes(lm.model) == before
    assert not any("forward" in m.__dict__ for m in lm.model.modules())  # every replaced forward restored


@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_a_stack_gives_each_candidate_its_own_evaluation_on_every_other_architecture(tokenizer, arch):
    lm = from_module(build_other(arch, tokenizer), tokenizer)
    examples = ONE_TOKEN if lm.kind == "masked" else LEAD_MULTI
    for layer in sorted({r.layer for r in lm.matrices}):
        for ref in (r for r in lm.matrices if r.layer == layer):
            _assert_stack_equals_one_by_one(lm, examples, ref)


def test_a_stack_cancelled_mid_run_leaves_the_model_as_it_was(tiny_lm):
    lm = tiny_lm("llama")
    ref = lm.matrices[0]
    before = weight_hashes(lm.model)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        with stacked(lm, [Edit(ref.name, 1, r) for r in RHOS], _factors(lm, ref.name, 1)) as runs:
            evaluate_copies(lm, MULTI, runs, cancel=token)
    assert weight_hashes(lm.model) == before and not any("forward" in m.__dict__ for m in lm.model.modules())
    assert evaluate(lm, MULTI).choice_logprobs == evaluate(lm, MULTI).choice_logprobs


def test_a_stack_refuses_candidates_of_different_matrices_and_an_early_stop(tiny_lm):
    lm = tiny_lm("llama")
    a, b = lm.matrices[:2]
    with pytest.raises(ConfigError, match="one matrix, K and grouping"):
        with stacked(lm, [Edit(a.name, 1, 0.5), Edit(b.name, 1, 0.5)], _factors(lm, a.name, 1)):
            pass
    with pytest.raises(ConfigError, match="early stop"):
        evaluate_copies(lm, MULTI, 2, beat=(0.5, 1.0))
    with pytest.raises(ConfigError, match="stack must be >= 0"):
        SearchConfig(stack=-1)


def _splits(mc_task, n=20):
    ts = TaskSpec(str(mc_task), n_calib=n, n_test=n)
    return make_splits(load_task(ts), ts)


def test_a_search_with_stacks_gives_the_candidates_of_one_at_a_time(tiny_lm, mc_task, store):
    """Same candidates, accuracies, log-losses and best; each candidate cached under its own key (a search one at a
    time reads them all back); rhos that keep the same ranks still evaluated once."""
    lm = tiny_lm("gpt2")
    splits = _splits(mc_task)
    cfg = dict(q=3, ks=(1, 2), rhos=(0.9, 0.5, 0.1, 0.05))
    one = run_search(lm, splits, SearchConfig(**cfg, stack=1), None)
    many = run_search(lm, splits, SearchConfig(**cfg, stack=3), store)
    assert [c.get("stacked") for c in one.candidates] == [None] * len(one.candidates)
    assert {c.get("stacked") for c in many.candidates} >= {3}
    for a, b in zip(one.candidates, many.candidates):
        assert (a["name"], a["k"], a["rho"], a["accuracy"], a.get("same_as_rho")) == \
               (b["name"], b["k"], b["rho"], b["accuracy"], b.get("same_as_rho"))
        assert a["log_loss"] == pytest.approx(b["log_loss"], abs=1e-4)
    assert (one.best["name"], one.best["k"], one.best["rho"]) == (many.best["name"], many.best["k"], many.best["rho"])
    evals = store.counts["eval"]
    again = run_search(lm, splits, SearchConfig(**cfg, stack=1), store)
    assert store.counts["eval"] == evals and all(c["cached"] for c in again.candidates if "same_as_rho" not in c)


def test_a_search_cancelled_during_a_stack_reports_and_caches_every_candidate_the_stack_evaluated(tiny_lm, mc_task,
                                                                                                   store):
    lm = tiny_lm("llama")
    before = weight_hashes(lm.model)
    token = CancelToken()
    cfg = SearchConfig(q=2, ks=(1, 2), rhos=(0.9, 0.5, 0.25), stack=3)

    def progress(ev):
        if ev.get("row"):
            token.cancel()  # at the first candidate reported, its stack of 3 is evaluated
    report = run_search(lm, _splits(mc_task), cfg, store, progress=progress, cancel=token)
    assert report.status == "partial" and [c["stacked"] for c in report.candidates] == [3, 3, 3]
    assert weight_hashes(lm.model) == before
    resumed = run_search(lm, _splits(mc_task), cfg, store)
    assert [c["cached"] for c in resumed.candidates][:3] == [True] * 3 and not resumed.candidates[3]["cached"]


def test_a_candidate_whose_run_overflows_is_skipped_alone(tiny_lm, mc_task, monkeypatch):
    import laser_core.stacking as stacking

    real = stacking.evaluate_copies

    def second_overflows(*args, **kwargs):
        out = real(*args, **kwargs)
        out[1] = NumericsError("the log-loss is NaN or infinite")
        return out

    monkeypatch.setattr(stacking, "evaluate_copies", second_overflows)
    lm = tiny_lm("llama")
    report = run_search(lm, _splits(mc_task), SearchConfig(q=1, ks=(1,), rhos=(0.9, 0.5, 0.25), stack=3), None)
    assert [c["rho"] for c in report.candidates] == [0.9, 0.25]
    assert [(s["rho"], s["error"]) for s in report.skipped] == [(0.5, "the log-loss is NaN or infinite")]


def test_a_matrix_whose_module_stacking_does_not_know_is_evaluated_one_candidate_at_a_time(tiny_lm, mc_task,
                                                                                              monkeypatch):
    import laser_core.stacking as stacking

    lm = tiny_lm("llama")
    monkeypatch.setattr(stacking, "_module", lambda lm, name: None)  # as for a module other than a linear layer
    with pytest.raises(ConfigError, match="not a linear layer; evaluate its candidates one by one"):
        with stacked(lm, [Edit(lm.matrices[0].name, 1, r) for r in RHOS], _factors(lm, lm.matrices[0].name, 1)):
            pass
    report = run_search(lm, _splits(mc_task), SearchConfig(q=2, ks=(1,), rhos=RHOS, stack=3), None)
    assert len(report.candidates) == 6 and not any("stacked" in c for c in report.candidates)


def test_stacking_is_on_by_default_on_a_gpu_only_and_never_for_an_early_stop(tiny_lm, mc_task, monkeypatch):
    lm = tiny_lm("llama")
    splits = _splits(mc_task)
    assert stack_size(lm, SearchConfig(), splits) == (8 if lm.device.type == "cuda" else 1)
    assert stack_size(lm, SearchConfig(stack=4), splits) == 4
    assert stack_size(lm, SearchConfig(stack=4, early_stop=True), splits) == 1
    monkeypatch.setattr(type(lm), "device", property(lambda self: torch.device("cuda")))  # read by stack_size only
    assert stack_size(lm, SearchConfig(), splits) == 8


@pytest.mark.parametrize("fits", [2, 1])
def test_a_stack_that_runs_out_of_memory_is_halved_until_it_fits_and_the_search_gives_the_same_candidates(
        tiny_lm, mc_task, monkeypatch, caplog, fits):
    """A stack of 4 that the device cannot hold is run again as 2 (or, where 2 do not fit either, one at a time), and
    later stacks start from the size that fit: one failed try per halving, not one per (matrix, K). The candidates
    are those of a search one at a time, the weights untouched, and a warning says what happened."""
    import laser_core.stacking as stacking

    real, tried = stacking.evaluate_copies, []

    def device_holds_fits(lm, examples, copies, **kwargs):
        tried.append(copies)
        if copies > fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                         "of 23.6 GiB of which 1.1 GiB is free. Including non-PyTorch memory...")
        return real(lm, examples, copies, **kwargs)

    monkeypatch.setattr(stacking, "evaluate_copies", device_holds_fits)
    lm = tiny_lm("llama")
    before = weight_hashes(lm.model)
    cfg = dict(q=2, ks=(1, 2), rhos=(0.9, 0.5, 0.25, 0.1))
    stacks = run_search(lm, _splits(mc_task), SearchConfig(**cfg, stack=8), None)
    one = run_search(lm, _splits(mc_task), SearchConfig(**cfg, stack=1), None)
    assert tried[:2] == [4, 2] and tried[2:] == ([2] * (len(tried) - 2) if fits == 2 else [])
    assert len(tried) == (2 + 2 * 2 * 2 - 1 if fits == 2 else 2)  # (2 matrices x 2 K) groups of 4 rhos, 2 stacks each
    assert [c.get("stacked") for c in stacks.candidates] == [fits if fits > 1 else None] * len(one.candidates)
    for a, b in zip(one.candidates, stacks.candidates):
        assert (a["name"], a["k"], a["rho"], a["accuracy"]) == (b["name"], b["k"], b["rho"], b["accuracy"])
        assert a["log_loss"] == pytest.approx(b["log_loss"], abs=1e-4)
    assert weight_hashes(lm.model) == before
    said = [r.getMessage() for r in caplog.records if "ran out of memory" in r.getMessage()]
    assert said == ["a stack of 4 candidates ran out of memory on cpu: 2 at a time from here on"] + \
        ([] if fits == 2 else ["a stack of 2 candidates ran out of memory on cpu: one at a time from here on"])


def test_a_stack_that_fails_otherwise_than_for_memory_is_not_retried(tiny_lm, mc_task, monkeypatch):
    import laser_core.stacking as stacking

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(stacking, "evaluate_copies", broken)
    lm = tiny_lm("llama")
    before = weight_hashes(lm.model)
    with pytest.raises(RuntimeError, match="a bug"):
        run_search(lm, _splits(mc_task), SearchConfig(q=1, ks=(1,), rhos=RHOS, stack=3), None)
    assert weight_hashes(lm.model) == before


def test_a_stack_whose_cached_states_do_not_fit_beside_the_others_runs_without_them_and_gives_the_same(
        tiny_lm, mc_task, monkeypatch, caplog):
    """The second layer's states cannot be built beside the first's (a fake device): the search switches prefix
    reuse off with a warning and stacks from the whole model, with the candidates of a search with room to spare.
    Before, building a stack's states was outside what makes room, and the search stopped there."""
    import logging

    import laser_core.prefix_states as prefix_states
    lm = tiny_lm("llama")
    cfg = SearchConfig("laser", ks=(1,), rhos=RHOS, layers=(0, 1), types=("down",), stack=4)
    roomy = run_search(lm, _splits(mc_task), cfg, None)
    built = []

    class SecondDoesNotFit(PrefixStates):
        def __init__(self, *args, **kwargs):
            built.append(1)
            if len(built) == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(prefix_states, "PrefixStates", SecondDoesNotFit)
    with caplog.at_level(logging.WARNING, logger="laser_core.memory"):
        tight = run_search(lm, _splits(mc_task), cfg, None)
    said = [r.getMessage() for r in caplog.records if "ran out of memory" in r.getMessage()]
    assert said == ["preparing the stack of model.layers.1.mlp.down_proj.weight K=1 rho=0.9 ran out of memory on cpu: "
                    "prefix reuse off from here on (each candidate runs the whole model, with no hidden states cached)"]
    assert len(built) == 2 and {c["stacked"] for c in tight.candidates} == {3}  # stacks, from the whole model
    assert [(c["name"], c["rho"], c["accuracy"]) for c in tight.candidates] == \
        [(c["name"], c["rho"], c["accuracy"]) for c in roomy.candidates]
    assert [c["log_loss"] for c in tight.candidates] == pytest.approx([c["log_loss"] for c in roomy.candidates], abs=1e-5)


def test_a_stack_that_does_not_fit_beside_other_layers_states_drops_them_before_it_halves(tiny_lm, mc_task,
                                                                                         monkeypatch, caplog, search_pools):
    """A device that cannot run a stack while the states of two layers are cached: the other layer's states give
    way and the stack runs again at its size (a smaller stack would cost its speed for the rest of the search), with
    a warning; the candidates are those of a search with room to spare."""
    import logging

    import laser_core.search as search
    import laser_core.stacking as stacking
    lm = tiny_lm("llama")
    cfg = SearchConfig("laser", ks=(1,), rhos=RHOS, layers=(0, 1), types=("down",), stack=4)
    roomy = run_search(lm, _splits(mc_task), cfg, None)
    search_pools.clear()  # the pool to watch is the next search's
    pools, real, tried = search_pools, stacking.evaluate_copies, []

    def two_layers_do_not_fit(lm_, examples, copies, **kwargs):
        tried.append((copies, len(pools[0].items)))
        if len(pools[0].items) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return real(lm_, examples, copies, **kwargs)
    sizes, real_ahead = [], search.stack_ahead

    def ahead(*args, **kwargs):  # the stack size each look-ahead hands back to the search
        out = real_ahead(*args, **kwargs)
        sizes.append(out[1])
        return out
    monkeypatch.setattr(stacking, "evaluate_copies", two_layers_do_not_fit)
    monkeypatch.setattr(search, "stack_ahead", ahead)
    with caplog.at_level(logging.WARNING, logger="laser_core"):
        tight = run_search(lm, _splits(mc_task), cfg, None)
    said = [r.getMessage() for r in caplog.records if "ran out of memory" in r.getMessage()]
    assert tried == [(3, 1), (3, 2), (3, 1)] and len(said) == 1, (tried, said)
    assert re.fullmatch(r"a stack of 3 candidates ran out of memory on cpu: [\d.e-]+ MB of hidden states cached for "
                        r"1 other layer dropped: one layer's \([\d.e-]+ MB\) at a time from here on", said[0]), said
    assert {c["stacked"] for c in tight.candidates} == {3} and not pools[0].off
    assert set(sizes) == {4}  # no halving: the search goes on at the stack asked for, not at the 3 that ran
    assert [(c["name"], c["rho"], c["accuracy"]) for c in tight.candidates] == \
        [(c["name"], c["rho"], c["accuracy"]) for c in roomy.candidates]
    assert [c["log_loss"] for c in tight.candidates] == pytest.approx([c["log_loss"] for c in roomy.candidates], abs=1e-5)
