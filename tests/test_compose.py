"""Greedy composition of edits across matrices (laser_core.compose), on tiny random models."""
from __future__ import annotations

import pytest

from laser_core import CancelToken, Cancelled, Edit, SearchConfig, TaskSpec, edited, evaluate, load_task, make_splits
from laser_core.candidates import doc_edit, merit
from laser_core.compose import cached_composition, compose_greedy, compose_pool
from laser_core.models import weight_hashes
from laser_core.search import run_search
from laser_core.store import null_store


def _searched(lm, mc_task, store):
    ts = TaskSpec(str(mc_task), n_calib=20, n_test=20)
    splits = make_splits(load_task(ts), ts)
    report = run_search(lm, splits, SearchConfig(q=4, ks=(1, 2), rhos=(0.5, 0.1)), store)
    return splits, report


def test_the_pool_is_each_other_matrixs_best_on_the_start_split_that_beats_the_base_alone():
    def doc(name, acc, loss=1.0, split="calib", **kw):
        return {"name": name, "k": 1, "rho": 0.5, "accuracy": acc, "log_loss": loss, "split": split, **kw}
    start = doc("a", 0.9)
    cands = [start, doc("a", 0.95), doc("b", 0.6), doc("b", 0.7, 2.0), doc("b", 0.7, 1.5), doc("c", 0.8),
             doc("d", 0.99, stopped_early=True), doc("e", 0.99, split="test"), doc("f", 0.5)]
    pool = compose_pool(cands, start, base=doc(None, 0.55))
    assert [(c["name"], c["accuracy"], c["log_loss"]) for c in pool] == [("c", 0.8, 1.0), ("b", 0.7, 1.5)]
    assert [c["name"] for c in compose_pool(cands, start)] == ["c", "b", "f"]  # no base: every other matrix


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_composition_keeps_an_edit_only_where_the_edits_together_score_better(tiny_lm, mc_task, store, arch):
    lm = tiny_lm(arch)
    splits, report = _searched(lm, mc_task, store)
    before = weight_hashes(lm.model)
    events = []
    comp = compose_greedy(lm, splits, report.best, report.candidates, store, progress=events.append)
    assert weight_hashes(lm.model) == before  # the base model in memory is never left edited
    pool = compose_pool(report.candidates, report.best)
    assert [(s["name"], s["k"], s["rho"]) for s in comp.steps] == [(c["name"], c["k"], c["rho"]) for c in pool]
    assert len(pool) >= 2 and len(events) == len(pool) + 1 and events[-1]["done"] == events[-1]["total"]
    # every step against an independent evaluation of the edits so far plus the one tried
    kept, current = [Edit(report.best["name"], report.best["k"], report.best["rho"])], report.best
    for s in comp.steps:
        tried = kept + [Edit(s["name"], s["k"], s["rho"])]
        with edited(lm, tried):
            direct = evaluate(lm, splits.examples("calib"))
        assert (s["accuracy"], s["log_loss"]) == pytest.approx((direct.accuracy, direct.log_loss))
        better = merit({"accuracy": direct.accuracy, "log_loss": direct.log_loss}) > merit(current)
        assert s["kept"] == better
        if better:
            kept, current = tried, {"accuracy": direct.accuracy, "log_loss": direct.log_loss}
    assert comp.edits == kept and comp.added == len(kept) - 1
    assert merit(comp.result) >= merit(report.best)
    with edited(lm, kept):
        test = evaluate(lm, splits.examples("test"))
    assert comp.result_test["accuracy"] == pytest.approx(test.accuracy)
    assert comp.base_test["accuracy"] == report.base_test["accuracy"]
    assert comp.held_out_change() is not None and comp.to_dict()["edits"][0]["name"] == report.best["name"]
    misses = store.counts["miss"]
    again = compose_greedy(lm, splits, report.best, report.candidates, store)  # the cache answers every evaluation
    assert again.steps == comp.steps and again.result_test == {**comp.result_test, "cached": True}
    assert store.counts["miss"] == misses


def test_a_cancelled_composition_raises_and_leaves_the_model_as_it_was(tiny_lm, mc_task, store):
    lm = tiny_lm("llama")
    splits, report = _searched(lm, mc_task, store)
    before = weight_hashes(lm.model)
    cancel = CancelToken()
    calls = []

    def stop_after_first(ev):
        calls.append(ev)
        cancel.cancel()
    with pytest.raises(Cancelled):
        compose_greedy(lm, splits, report.best, report.candidates, null_store(), cancel=cancel,
                       progress=stop_after_first)
    assert len(calls) == 1 and weight_hashes(lm.model) == before


def test_search_compose_prints_the_steps_and_writes_a_recipe_that_eval_confirms(tiny_dirs, tiny_lm, mc_task, tmp_path,
                                                                               capsys):
    from laser_core.cli import main
    from laser_core.recipe import load_recipe
    flags = ["--model", str(tiny_dirs["llama"]), "--task", str(mc_task), "--n-calib", "20", "--n-test", "20",
             "--cache-dir", str(tmp_path / "c")]
    assert main(["search", *flags, "--q", "4", "--ks", "1,2", "--rhos", "0.5,0.1", "--recipe-out",
                 str(tmp_path / "r.json"), "--compose"]) == 0
    out = capsys.readouterr().out
    lm = tiny_lm("llama")
    splits, report = _searched(lm, mc_task, null_store())  # the same search, computed afresh
    comp = compose_greedy(lm, splits, report.best, report.candidates, null_store(), report.base)
    assert f"compose: {len(compose_pool(report.candidates, report.best, report.base))} edit" in out
    for st in comp.steps:
        assert f"+ {st['name']} K={st['k']} rho={st['rho']}" in out
    pool = compose_pool(report.candidates, report.best, report.base)
    assert len(pool) >= 2  # --compose-max 1 then leaves some out
    composed = tmp_path / "r-composed.json"
    full = composed.read_bytes() if composed.exists() else None
    assert main(["search", *flags, "--q", "4", "--ks", "1,2", "--rhos", "0.5,0.1", "--recipe-out",
                 str(tmp_path / "r.json"), "--compose-max", "1"]) == 0  # implies --compose; the cache answers it
    capped = capsys.readouterr().out
    assert f"compose: 1 of {len(pool)} edits to try (--compose-max 1; each other matrix's best" in capped
    assert f"  + {pool[0]['name']} K={pool[0]['k']} rho={pool[0]['rho']}" in capped
    assert f"+ {pool[1]['name']} K={pool[1]['k']}" not in capped and f"({len(pool) - 1} more not tried" in capped
    assert (composed.read_bytes() if composed.exists() else None) == full  # the full composition's recipe stays
    if "composed recipe:" in capped:  # the capped one has its own name
        assert f"composed recipe: {tmp_path / 'r-composed-max1.json'}" in capped
        assert load_recipe(tmp_path / "r-composed-max1.json")["method"] == "composed"
    if not comp.added:  # a random model: whether an edit helps is the data's to say; say so either way
        assert "no edit added to the best one; no composed recipe" in out and not composed.exists()
        return
    recipe = load_recipe(composed)
    assert [(e["name"], e["k"], e["rho"]) for e in recipe["edits"]] == [(e.name, e.k, e.rho) for e in comp.edits]
    assert recipe["method"] == "composed" and recipe["metrics"]["edited_test"]["accuracy"] == comp.result_test["accuracy"]
    assert f"composed held-out accuracy {comp.result_test['accuracy']:.3f}" in out
    assert "held-out change from the best edit alone" in out
    assert main(["eval", *flags, "--recipe", str(composed), "--split", "test"]) == 0
    assert capsys.readouterr().out.startswith(f"test: accuracy {comp.result_test['accuracy']:.3f}")


def test_a_start_edit_stopped_early_is_evaluated_to_the_end_before_it_is_compared(tiny_lm, mc_task, store):
    lm = tiny_lm("llama")
    splits, report = _searched(lm, mc_task, store)
    partial = {**report.best, "accuracy": 1.0, "log_loss": 0.0, "stopped_early": True}  # unbeatable, were it whole
    comp = compose_greedy(lm, splits, partial, report.candidates, store, held_out=False)
    assert comp.start["accuracy"] == report.best["accuracy"] and not comp.start.get("stopped_early")
    assert comp.steps == compose_greedy(lm, splits, report.best, report.candidates, store, held_out=False).steps


def test_search_compose_stopped_by_ctrl_c_exits_130_and_writes_no_composed_recipe(tiny_dirs, mc_task, tmp_path, capsys,
                                                                                  monkeypatch):
    import signal

    import laser_core.compose as compose
    from laser_core.cli import main
    real = compose.compose_greedy

    def interrupted(*a, **kw):  # Ctrl-C after the first edit tried: the CLI's handler sets the token
        def progress(ev):
            kw["progress"](ev)
            signal.raise_signal(signal.SIGINT)
        return real(*a, **{**kw, "progress": progress})
    monkeypatch.setattr(compose, "compose_greedy", interrupted)
    rc = main(["search", "--model", str(tiny_dirs["llama"]), "--task", str(mc_task), "--n-calib", "20", "--n-test", "20",
               "--q", "4", "--ks", "1,2", "--rhos", "0.5,0.1", "--no-cache", "--recipe-out", str(tmp_path / "r.json"),
               "--compose"])
    out = capsys.readouterr().out
    assert rc == 130 and "cancelled: the edits evaluated together are kept in the cache; no composed recipe" in out
    assert (tmp_path / "r.json").exists() and not (tmp_path / "r-composed.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


def test_an_edit_that_breaks_the_numerics_together_is_not_kept_and_held_out_test_is_never_chosen_on(
        tiny_lm, mc_task, store, monkeypatch):
    import laser_core.compose as compose
    from laser_core import ConfigError, NumericsError
    lm = tiny_lm("llama")
    splits, report = _searched(lm, mc_task, store)
    pool = compose_pool(report.candidates, report.best)
    real = compose.evaluate_edits

    def overflow_with_the_first(lm_, edits, *a, **kw):
        if len(edits) > 1 and edits[-1].name == pool[0]["name"]:
            raise NumericsError("the log-loss is NaN or infinite")
        return real(lm_, edits, *a, **kw)
    monkeypatch.setattr(compose, "evaluate_edits", overflow_with_the_first)
    comp = compose_greedy(lm, splits, report.best, report.candidates, store, held_out=False)
    first = comp.steps[0]
    assert first["name"] == pool[0]["name"] and not first["kept"] and first["error"].startswith("the log-loss")
    assert len(comp.steps) == len(pool) and pool[0]["name"] not in [e.name for e in comp.edits]
    test_doc = {**report.best_test, "split": "test"}
    with pytest.raises(ConfigError, match="chooses its edits on a search's split .calib or val., not on 'test'"):
        compose_greedy(lm, splits, test_doc, report.candidates, store)


def test_a_composition_whose_edits_together_broke_the_numerics_is_read_back_from_the_cache(tiny_lm, mc_task, store,
                                                                                            monkeypatch):
    """The overflow is what these weights do, so it is cached like a result: before, cached_composition found no
    composition with such a step, and Export showed it only in the session that ran it."""
    import torch

    import laser_core.candidates as candidates
    from laser_core import NumericsError
    from laser_core.candidates import cached_combinations, cached_edits
    lm = tiny_lm("llama")
    splits, report = _searched(lm, mc_task, store)
    pool = compose_pool(report.candidates, report.best)
    weight = lm.model.get_parameter(pool[0]["name"])
    unedited, real = weight.detach().clone(), candidates.evaluate_split

    def overflow_while_the_first_is_applied(*a, **kw):  # with the pool's best edit in the weights, the output overflows
        if not torch.equal(weight, unedited):
            raise NumericsError("the log-loss is NaN or infinite (the model's output overflowed; try float32)")
        return real(*a, **kw)
    monkeypatch.setattr(candidates, "evaluate_split", overflow_while_the_first_is_applied)
    ran = compose_greedy(lm, splits, report.best, report.candidates, store)
    assert ran.steps[0]["error"].startswith("the log-loss") and not ran.steps[0]["kept"]
    tried = [doc_edit(report.best), doc_edit(pool[0])]
    assert cached_edits(store, lm, splits, "calib", tried) is None  # no accuracy to show for it
    with pytest.raises(NumericsError, match="output overflowed"):
        cached_edits(store, lm, splits, "calib", tried, failed=True)
    assert all("accuracy" in d for d in cached_combinations(store, lm, splits))  # Results lists no failure as a row

    def no_model_run(*a, **kw):
        raise AssertionError("the model ran")
    monkeypatch.setattr(candidates, "evaluate_split", no_model_run)
    got = cached_composition(lm, splits, report.best, report.candidates, store)
    assert got is not None and (got.steps, got.edits) == (ran.steps, ran.edits)
    again = compose_greedy(lm, splits, report.best, report.candidates, store)  # the same call again: no model run
    assert again.steps == ran.steps and again.result_test["accuracy"] == ran.result_test["accuracy"]


def test_a_limited_composition_tries_the_best_first_and_the_cache_reads_any_run_back_without_the_model(
        tiny_lm, mc_task, store, monkeypatch):
    import laser_core.candidates as candidates
    from laser_core import ConfigError
    lm = tiny_lm("llama")
    splits, report = _searched(lm, mc_task, store)
    pool = compose_pool(report.candidates, report.best)
    assert len(pool) >= 2
    assert cached_composition(lm, splits, report.best, report.candidates, store) is None  # never run: nothing to read
    one = compose_greedy(lm, splits, report.best, report.candidates, store, limit=1)
    assert [s["name"] for s in one.steps] == [pool[0]["name"]] and one.left == len(pool) - 1
    assert cached_composition(lm, splits, report.best, report.candidates, store, limit=2) is None  # 2nd try not run
    full = compose_greedy(lm, splits, report.best, report.candidates, store)
    assert full.steps[:1] == one.steps and len(full.steps) == len(pool) and full.left == 0

    def no_model_run(*a, **kw):
        raise AssertionError("the model ran")
    monkeypatch.setattr(candidates, "evaluate_split", no_model_run)
    for limit, want in ((1, one), (None, full), (len(pool), full)):
        got = cached_composition(lm, splits, report.best, report.candidates, store, limit=limit)
        assert got is not None and (got.steps, got.edits, got.left) == (want.steps, want.edits, want.left)
        assert got.result_test["accuracy"] == want.result_test["accuracy"] and got.base_test["n"] == len(splits.test)
    with pytest.raises(ConfigError, match="limit must be >= 1"):
        compose_greedy(lm, splits, report.best, report.candidates, store, limit=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta"])
def test_edits_together_start_from_the_lowest_edited_layer_and_equal_the_full_forward(tiny_lm, mc_task, store, arch):
    """Before, several edits applied together ran every block and recomputed each edit's SVD on every evaluation."""
    from laser_core.candidates import evaluate_edits
    from laser_core.prefix_states import PrefixPool
    lm = tiny_lm(arch)
    ts = TaskSpec(str(mc_task), n_calib=20, n_test=20)
    splits = make_splits(load_task(ts), ts)
    by_layer = {}
    for ref in lm.matrices:
        by_layer.setdefault(ref.layer, []).append(ref.name)
    (a0, b0), (a1, b1) = by_layer[0][:2], by_layer[1][:2]
    pool = PrefixPool(lm, 2**30)
    asked = []
    real_get = pool.get
    pool.get = lambda *a: asked.append((a[2], a[3], real_get(*a) is not None)) or real_get(*a)
    cases = [([Edit(a0, 1, 0.5), Edit(a1, 2, 0.1)], (0, a0, True)),  # one edit at the lowest layer: from its matrix on
             ([Edit(a1, 1, 0.5), Edit(b1, 1, 0.1)], (1, None, True)),  # two there: from the block's input
             ([Edit(a0, 1, 0.5), Edit(b0, 1, 0.5), Edit(a1, 1, 0.1)], (0, None, False))]  # block 0: nothing to skip
    before = weight_hashes(lm.model)
    for edits, want in cases:
        asked.clear()
        fast = evaluate_edits(lm, edits, splits, "calib", null_store(), prefixes=pool)
        with edited(lm, edits):
            direct = evaluate(lm, splits.examples("calib"))
        assert asked == [want]
        assert fast["predictions"] == direct.predictions and fast["accuracy"] == direct.accuracy
        assert fast["log_loss"] == pytest.approx(direct.log_loss, abs=1e-5)
        assert weight_hashes(lm.model) == before
    svds = store.counts["svd"]
    evaluate_edits(lm, cases[0][0], splits, "calib", store)
    evaluate_edits(lm, [cases[0][0][0], Edit(b1, 1, 0.5)], splits, "calib", store)  # a0's factors come from the store
    assert store.counts["svd"] - svds == 3


def test_a_composition_starts_a_try_from_cached_states_only_where_other_tries_share_them(tiny_lm, monkeypatch):
    """States entering the lowest kept edit's layer serve every try at or above it; a try below it would build
    states no other try uses (measured on the demo's FEVER sweep: 3 such tries took 184 s instead of 167 s)."""
    import laser_core.compose as compose
    lm = tiny_lm("llama")
    at = {layer: [r.name for r in lm.matrices if r.layer == layer] for layer in (0, 1)}

    def doc(name, acc, split="calib"):
        return {"name": name, "k": 1, "rho": 0.5, "accuracy": acc, "log_loss": 1.0, "split": split}
    start = doc(at[1][0], 0.6)
    cands = [start, doc(at[0][0], 0.59), doc(at[1][1], 0.58), doc(at[0][1], 0.57), doc(at[1][2], 0.56)]
    asked = []

    def fake(lm_, edits, splits, split, store, cancel, prefixes=None):
        asked.append((edits[-1].name if edits else None, split, prefixes is not None))
        kept = bool(edits) and edits[-1].name == at[0][1]  # the third try: the lowest kept layer is then 0
        return doc(None, 0.7 if kept else 0.5, split)
    monkeypatch.setattr(compose, "evaluate_edits", fake)
    comp = compose_greedy(lm, None, start, cands, held_out=True)
    assert [s["kept"] for s in comp.steps] == [False, False, True, False]
    assert asked == [(at[0][0], "calib", False),  # below layer 1, the only kept one: run whole
                     (at[1][1], "calib", True),  # at layer 1: from its states
                     (at[0][1], "calib", False),  # below: whole (and kept)
                     (at[1][2], "calib", True),  # above layer 0, now the lowest kept
                     (None, "test", False), (at[0][1], "test", False)]  # held-out test: once each, whole
    asked.clear()
    compose_greedy(lm, None, start, cands, held_out=False, prefix_budget_mb=None)
    assert not any(shared for *_, shared in asked)  # prefix reuse off


def test_a_composition_whose_device_cannot_hold_its_cached_states_runs_without_them_and_keeps_the_same(
        tiny_lm, mc_task, store, monkeypatch, caplog):
    """Tries from cached states that run out of memory: prefix reuse goes off for the rest (one warning), and the
    composition keeps what it keeps with room to spare. Before, it stopped at the first such try."""
    import logging

    import torch

    import laser_core.candidates as candidates
    lm = tiny_lm("llama")
    splits, report = _searched(lm, mc_task, store)
    roomy = compose_greedy(lm, splits, report.best, report.candidates, null_store())
    real, shared = candidates.evaluate, []

    def evaluate(lm_, *args, prefix=None, **kwargs):
        shared.append(prefix is not None)
        if prefix is not None:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return real(lm_, *args, prefix=prefix, **kwargs)
    monkeypatch.setattr(candidates, "evaluate", evaluate)
    with caplog.at_level(logging.WARNING, logger="laser_core.memory"):
        tight = compose_greedy(lm, splits, report.best, report.candidates, null_store())
    said = [r.getMessage() for r in caplog.records if "ran out of memory" in r.getMessage()]
    assert any(shared) and len(said) == 1 and said[0].startswith("evaluating 2 edits together ran out of memory on cpu: ")
    assert said[0].endswith("prefix reuse off from here on (each candidate runs the whole model, with no hidden "
                            "states cached)")
    assert [(s["name"], s["kept"], s["accuracy"]) for s in tight.steps] == \
        [(s["name"], s["kept"], s["accuracy"]) for s in roomy.steps]
    assert tight.edits == roomy.edits and tight.result_test["accuracy"] == roomy.result_test["accuracy"]


def test_the_composition_estimate_counts_the_blocks_each_try_runs(tiny_lm):
    """Before, `--compose` said every try would take a full evaluation ("at the base's pace")."""
    from laser_core.compose import composition_seconds
    lm = tiny_lm("llama")  # 2 blocks: a try from layer 1 on runs half of them
    start, tries = {"layer": 1}, [{"layer": 0}, {"layer": 1}, {"layer": 1}]
    # layer 0: whole; the two at layer 1: half each, plus once the forward up to layer 1 that builds their states
    assert composition_seconds(lm, tries, start, 10.0, reuse=True) == pytest.approx(10 + 2 * 5 + 5)
    assert composition_seconds(lm, tries, start, 10.0, reuse=False) == pytest.approx(30)
    assert composition_seconds(lm, tries[:1], start, 10.0, reuse=True) == pytest.approx(10)  # nothing to build



def test_the_composition_estimate_says_when_a_try_below_the_start_could_make_later_tries_longer(tiny_lm):
    from laser_core.compose import composition_estimate
    lm = tiny_lm("llama")
    start = {"layer": 1}
    assert composition_estimate(lm, [{"layer": 0}, {"layer": 1}], start, 10.0, reuse=True) == \
        "about 20 s, longer where an edit below layer 1 is kept"  # kept, layer 0's edit makes the next try run whole
    assert composition_estimate(lm, [{"layer": 1}, {"layer": 0}], start, 10.0, reuse=True) == "about 20 s"  # tried last
    assert composition_estimate(lm, [{"layer": 1}, {"layer": 1}], start, 10.0, reuse=True) == "about 15 s"
    assert composition_estimate(lm, [{"layer": 0}, {"layer": 1}], start, 10.0, reuse=False) == "about 20 s"  # all whole


def test_search_compose_takes_the_searchs_prefix_reuse_settings(tiny_dirs, mc_task, tmp_path, monkeypatch):
    import laser_core.compose as compose
    from laser_core.cli import main
    real, budgets = compose.compose_greedy, []
    monkeypatch.setattr(compose, "compose_greedy",
                        lambda *a, **kw: budgets.append(kw["prefix_budget_mb"]) or real(*a, **kw))
    args = ["search", "--model", str(tiny_dirs["llama"]), "--task", str(mc_task), "--n-calib", "20", "--n-test", "20",
            "--q", "2", "--ks", "1", "--rhos", "0.5", "--cache-dir", str(tmp_path / "c"), "--recipe-out",
            str(tmp_path / "r.json"), "--compose"]
    assert main([*args, "--prefix-budget-mb", "64"]) == 0 and main([*args, "--no-prefix-reuse"]) == 0
    assert budgets == [64, None]
