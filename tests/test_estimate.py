"""The run-time estimate of a search, from the timings the cache holds, on a tiny model."""
from __future__ import annotations

import dataclasses
import statistics

import pytest
import torch

from laser_core import SearchConfig, TaskSpec, load_task, make_splits, run_search
from laser_core.candidates import cached_results, evaluate_candidate
from laser_core.estimate import MIN_RUNS, estimate_search, human_seconds

SMALL = SearchConfig(q=2, ks=(1, 2), rhos=(0.5, 0.1))


@pytest.fixture
def llama_splits(tiny_lm, mc_task):
    ts = TaskSpec(str(mc_task), n_calib=20, n_test=20)
    return tiny_lm("llama"), make_splits(load_task(ts), ts)


def test_nothing_timed_in_the_cache_gives_no_estimate(llama_splits, store):
    lm, splits = llama_splits
    assert estimate_search(lm, splits, SMALL, store) is None


def test_a_candidate_costs_the_share_of_blocks_it_runs_of_the_base_evaluation(llama_splits, store):
    lm, splits = llama_splits
    assert lm.n_layers == 2
    base = evaluate_candidate(lm, None, splits, "calib", store)["seconds"]
    full_val = base * len(splits.val) / len(splits.calib)
    test = full_val * len(splits.test) / len(splits.val)
    cfg = SearchConfig("laser", rhos=(0.5, 0.1), layers=(1,))
    est = estimate_search(lm, splits, cfg, store)
    assert est.candidates == 7 * 2 and est.cached == 0 and est.to_run + est.same_ranks == 14
    assert "calibration split, scaled to" in est.basis and est.full_eval_s == pytest.approx(full_val)
    # layer 1 of 2: half the blocks per candidate, half a forward once to build its states, the base on the
    # validation split, then the base and the best on the held-out test split
    assert est.seconds == pytest.approx(full_val * (0.5 * est.to_run + 0.5 + 1) + 2 * test)
    whole = estimate_search(lm, splits, dataclasses.replace(cfg, prefix_reuse=False), store)
    assert whole.seconds == pytest.approx(full_val * (est.to_run + 1) + 2 * test)
    assert estimate_search(lm, splits, dataclasses.replace(cfg, layers=(0,)), store).seconds > est.seconds
    # C2I before its gradient step: which matrices is not known, so every candidate counts as a full evaluation
    c2i = estimate_search(lm, splits, SMALL, store)
    assert c2i.upper_bound and not c2i.scores_cached and c2i.to_run == 8
    assert c2i.seconds == pytest.approx(base * 8 + 2 * base * len(splits.test) / len(splits.calib))
    assert estimate_search(lm, splits, dataclasses.replace(cfg, early_stop=True), store).upper_bound


def test_a_held_out_test_timing_alone_is_a_basis_too(llama_splits, store):
    # the base is often first evaluated on the held-out test split (Export, Results' comparison, a recipe check)
    lm, splits = llama_splits
    base = evaluate_candidate(lm, None, splits, "test", store)["seconds"]
    est = estimate_search(lm, splits, SMALL, store)
    n = len(splits.calib)
    assert est.basis == f"the base model's evaluation of the held-out test split, scaled to {n} examples"
    assert est.full_eval_s == pytest.approx(base * len(splits.calib) / len(splits.test))


def test_after_a_search_its_candidates_cost_nothing_and_their_timings_become_the_basis(llama_splits, store):
    lm, splits = llama_splits
    run_search(lm, splits, SMALL, store)
    again = estimate_search(lm, splits, SMALL, store)
    assert (again.to_run, again.cached + again.same_ranks, again.seconds) == (0, 8, 0.0)
    assert again.summary().startswith("under a second (0 to run, ")
    # not "at most about 0 s"
    assert dataclasses.replace(again, upper_bound=True).summary().startswith("under a second")
    assert again.scores_cached and not again.upper_bound
    timed = [d for d in cached_results(store, lm, splits)
             if d["split"] == "calib" and d["name"] and d["seconds"] and d.get("same_as_rho") is None]
    assert len(timed) >= MIN_RUNS and f"{len(timed)} candidates already timed" in again.basis
    assert all(0 < d["setup_s"] < d["seconds"] for d in timed)  # the SVD and states: once per matrix and layer
    assert again.full_eval_s == pytest.approx(statistics.median((d["seconds"] - d["setup_s"]) * 2 / (2 - d["layer"])
                                                                for d in timed))
    more = estimate_search(lm, splits, dataclasses.replace(SMALL, q=3), store)
    assert more.candidates == 12 and more.cached == again.cached and more.to_run == 12 - more.cached - more.same_ranks
    assert more.to_run > 0 and more.seconds > 0 and not more.upper_bound


def test_a_search_that_runs_candidates_together_is_estimated_from_candidates_timed_together(llama_splits, store,
                                                                                            monkeypatch):
    """A candidate run in a stack is timed at its share of the stack's time, on a GPU a fraction of its time alone.
    A search that stacks is estimated from candidates timed in stacks, and one that does not from those timed alone;
    where only the other kind is timed, they are the basis (for a search that stacks on a GPU, at most that long)."""
    from laser_core.estimate import block_share
    lm, splits = llama_splits
    alone = SearchConfig(q=3, ks=(1,), rhos=(0.5, 0.25, 0.1), stack=1)
    together = SearchConfig(q=3, ks=(2,), rhos=(0.5, 0.25, 0.1), stack=4)

    def timed(share_of_full: dict) -> None:  # every candidate a set share of a full evaluation: 1.0 alone
        for key, doc in store.iter_json(f"result/{lm.fingerprint}/"):
            if doc.get("name") and doc["split"] == "calib":
                share = block_share(lm, doc["layer"], True)
                store.put_json(key, {**doc, "seconds": share_of_full[doc.get("stacked", 1) > 1] * share,
                                     "setup_s": 0.0})

    run_search(lm, splits, alone, store)
    timed({False: 1.0})
    first = estimate_search(lm, splits, together, store)
    assert first.full_eval_s == pytest.approx(1.0) and "run together" not in first.basis
    assert not first.upper_bound  # a CPU: together takes about as long as one at a time (or longer)
    monkeypatch.setattr(type(lm), "device", property(lambda self: torch.device("cuda")))  # where together takes less
    assert estimate_search(lm, splits, together, store).summary().startswith("at most")
    monkeypatch.undo()
    report = run_search(lm, splits, together, store)
    assert {c["stacked"] for c in report.candidates} == {3}  # the rho grid of each (matrix, K) as one stack
    timed({False: 1.0, True: 0.25})
    for cfg, unit in ((together, 0.25), (alone, 1.0)):
        est = estimate_search(lm, splits, dataclasses.replace(cfg, q=5), store)
        assert est.full_eval_s == pytest.approx(unit) and ("run together" in est.basis) == (unit < 1)
        assert est.to_run > 0 and not est.upper_bound


def test_durations_read_as_people_say_them():
    assert [human_seconds(s) for s in (40, 540, 52000)] == ["40 s", "9 min", "14.4 h"]


def test_a_c2i_search_whose_scores_are_not_cached_counts_the_gradient_step_and_svds_as_they_took_before(
        llama_splits, store):
    """The gradient step scales with the tokens it runs (another split or task of the model: scaled by theirs, from
    the one nearest in tokens; timed before tokens were listed: by the number of examples); the SVDs, which depend
    on the weights alone, come from spectra of the same K on any split. Spectra cached before their time (or its
    tokens) was listed get it listed when next read."""
    from laser_core.gradients import gradient_tokens
    from laser_core.scores import SPECTRA_TIME, load_spectra, spectra_time
    lm, splits = llama_splits
    evaluate_candidate(lm, None, splits, "calib", store)
    before = estimate_search(lm, splits, SMALL, store)
    assert before.summary().endswith("plus the gradient step and the SVDs, not cached yet (neither timed on this "
                                     "model yet)")
    load_spectra(lm, splits, store)  # K = 1, what the paper score needs
    (key, doc), = store.iter_json(f"{SPECTRA_TIME}/{lm.fingerprint}/")
    assert doc["gradients"] > 0 and doc["svd"] > 0 and doc["examples"] == len(splits.calib) == 20
    assert doc["tokens"] == gradient_tokens(lm, splits.examples("calib")) > 20
    store.put_json(key, {**doc, "gradients": 40.0, "svd": 7.0})
    assert spectra_time(lm, splits, store) == (40.0, "this calibration split", 7.0, "this task")
    ts = dataclasses.replace(splits.spec, n_calib=10, seed=1)
    other = make_splits(load_task(ts), ts)
    here = gradient_tokens(lm, other.examples("calib"))
    assert here != doc["tokens"] * 10 / 20  # else scaling by tokens could not be told from scaling by examples
    evaluate_candidate(lm, None, other, "calib", store)
    est = estimate_search(lm, other, SMALL, store)
    bare = estimate_search(lm, other, SMALL, null_timing(store))
    step = 40.0 * here / doc["tokens"]
    assert est.seconds == pytest.approx(bare.seconds + step + 7.0)
    said = f"another split of this task, scaled by tokens: {doc['tokens']:,} there, {here:,} here"
    assert est.summary().endswith(f"including, not cached yet, the gradient step (about {step:.0f} s, as on {said}) "
                                  "and the SVDs (about 7 s, as on this task)")
    first_order = estimate_search(lm, other, dataclasses.replace(SMALL, score="first_order"), store)
    assert first_order.summary().endswith(f"including, not cached yet, the gradient step (about {step:.0f} s, as on "
                                          f"{said}); plus the SVDs for K 1,2, not timed on this model yet")
    far = {**doc, "calib": {**doc["calib"], "ids": "elsewhere"}, "gradients": 999.0, "tokens": here * 50, "when": 2e9}
    store.put_json(key + "-far", far)  # timed later, but on 50 times the tokens: the nearer one prices it
    assert spectra_time(lm, other, store)[0] == pytest.approx(step)
    store.delete(key + "-far")
    store.put_json(key, {k: v for k, v in doc.items() if k != "tokens"} | {"gradients": 40.0})  # listed before tokens
    assert spectra_time(lm, other, store)[:2] == (pytest.approx(40.0 * 10 / 20),
                                                   "another split of this task, scaled to 10 examples")
    load_spectra(lm, splits, store)  # read from the cache: listed again, with the tokens and the time they took
    assert (store.get_json(key)["tokens"], store.get_json(key)["gradients"]) == (doc["tokens"], doc["gradients"])
    store.delete(key)  # as spectra cached before their time was listed
    assert spectra_time(lm, splits, store)[0] is None
    load_spectra(lm, splits, store)
    assert spectra_time(lm, splits, store)[0] == pytest.approx(doc["gradients"])


def null_timing(store):
    """``store`` as it reads, less the spectra times: what an estimate is without them."""
    from laser_core.scores import SPECTRA_TIME

    class Without:
        def __getattr__(self, name):
            return getattr(store, name)

        def iter_json(self, prefix):
            return iter(()) if prefix.startswith(SPECTRA_TIME) else store.iter_json(prefix)
    return Without()


def test_a_candidate_that_built_its_layers_states_is_scaled_without_them():
    """A sweep of one rho of one type: each candidate builds the states entering its layer, then runs from there,
    so each takes about a full evaluation whatever its layer. Its setup (``setup_s``) is taken off before scaling
    by its share of the blocks; one timed before setups were kept, alone at its layer, is no basis (scaled, a
    candidate at the last of 30 layers would count for 30 full evaluations)."""
    from types import SimpleNamespace as NS

    from laser_core.estimate import full_eval_seconds
    lm, splits = NS(n_layers=30), NS(calib=[0] * 50, val=[0] * 100, test=[0] * 10)
    base = {"split": "val", "name": None, "seconds": 48.0}

    def sweep(**setup):
        return [{"split": "val", "name": f"m{layer}", "layer": layer, "seconds": 50.0,
                 **({"setup_s": 50.0 * layer / 30} if setup else {})} for layer in range(30)]
    full, basis, _ = full_eval_seconds(lm, splits, "val", [base, *sweep(setup=True)], True)
    assert full == pytest.approx(50.0) and basis == "30 candidates already timed on this split"
    full, basis, _ = full_eval_seconds(lm, splits, "val", [base, *sweep()], True)
    assert (full, basis) == (48.0, "the base model's evaluation of the validation split")
    twice = [{**d, "name": d["name"] + "b", "seconds": 50.0 * (30 - d["layer"]) / 30} for d in sweep()]
    full, _, _ = full_eval_seconds(lm, splits, "val", [base, *sweep(), *twice], True)  # the second at each layer
    assert full == pytest.approx(statistics.median([50.0 * 30 / (30 - layer) for layer in range(30)] + [50.0] * 30))


def test_laser_full_sweep_counts_every_matrix_at_its_share_and_each_layers_states_once(llama_splits, store):
    """What the searches table compares a C2I search with where no full LASER sweep ran: on a 2-layer model with 7
    matrices a layer, one rho, 7 candidates run whole at layer 0, 7 run half the blocks at layer 1 after the half
    forward that builds that layer's states; a second rho with other ranks doubles the candidates, not the build."""
    from laser_core.estimate import full_sweep_seconds, full_sweep_unit
    lm, splits = llama_splits
    assert full_sweep_unit(lm, splits, store) is None  # nothing timed
    assert full_sweep_seconds(lm, splits, (0.5,), 1.0) == pytest.approx(7 * 1 + 7 * 0.5 + 0.5)
    assert full_sweep_seconds(lm, splits, (0.5, 0.1), 2.0) == pytest.approx(2 * (14 * 1 + 14 * 0.5 + 0.5))
    assert full_sweep_seconds(lm, splits, (0.1, 0.5, 0.5), 3.0) == pytest.approx(3 * (14 * 1 + 14 * 0.5 + 0.5))  # kept
    base = evaluate_candidate(lm, None, splits, "val", store)["seconds"]
    assert full_sweep_unit(lm, splits, store) == (pytest.approx(base),
                                                  "the base model's evaluation of the validation split")
