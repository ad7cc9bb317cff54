"""Search, restore-on-exit edits, the disk cache, recipes and the CLI, on tiny models."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import pathlib
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from laser_core import (CancelToken, ConfigError, Edit, JobBusy, SearchConfig, Store, TaskSpec, edited, load_task,
                        make_splits, run_search)
from laser_core.cli import main
from laser_core.models import weight_hashes
from laser_core.recipe import apply_recipe, load_recipe, recipe_from_report
from laser_core.saving import save_model_atomic, save_recipe

SMALL = SearchConfig(q=2, ks=(1, 2), rhos=(0.5, 0.1))


def _splits(path, n_calib=20, n_test=20):
    ts = TaskSpec(str(path), n_calib=n_calib, n_test=n_test)
    return ts, make_splits(load_task(ts), ts)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta"])
def test_whole_search_leaves_every_weight_bit_identical(tiny_lm, mc_task, store, arch):
    lm = tiny_lm(arch)
    before = weight_hashes(lm.model)
    _, splits = _splits(mc_task)
    report = run_search(lm, splits, SMALL, store)
    assert len(report.candidates) == 2 * 2 * 2
    assert report.best_test is not None and report.base_test["n"] == 20
    assert weight_hashes(lm.model) == before
    assert all(not p.requires_grad and p.grad is None for p in lm.model.parameters())


def test_edit_is_restored_on_error_and_really_applied_inside(tiny_lm):
    lm = tiny_lm("llama")
    before = weight_hashes(lm.model)
    name = lm.matrices[0].name
    with pytest.raises(RuntimeError, match="boom"):
        with edited(lm, [Edit(name, 1, 0.1)]):
            w = dict(lm.model.named_parameters())[name]
            assert torch.linalg.matrix_rank(w) == 3  # floor(0.1 * 32)
            raise RuntimeError("boom")
    assert weight_hashes(lm.model) == before


def test_inside_an_edit_only_the_weights_and_their_saved_originals_are_in_memory(tiny_lm, mc_task, store, monkeypatch):
    """Before, the reduced matrices (and, for edits applied together, their SVD factors) stayed alive beside the edited
    weights for the whole evaluation: on a large model, gigabytes more."""
    import gc
    import weakref

    import laser_core.candidates as candidates
    import laser_core.reduction as reduction
    from laser_core.candidates import evaluate_edits
    lm = tiny_lm("llama")
    made, real_reduced, real_svd = [], reduction.reduced_weight, reduction.block_svd
    monkeypatch.setattr(reduction, "reduced_weight", lambda *a: made.append(weakref.ref(x := real_reduced(*a))) or x)
    monkeypatch.setattr(reduction, "block_svd", lambda *a: made.append(weakref.ref((f := real_svd(*a)).U[0])) or f)
    alive = []
    real_eval = candidates.evaluate_split
    monkeypatch.setattr(candidates, "evaluate_split",
                        lambda *a, **kw: (gc.collect(), alive.append([r() is not None for r in made]))
                        and real_eval(*a, **kw))
    _, splits = _splits(mc_task)
    edits = [Edit(lm.matrices[0].name, 1, 0.5), Edit(lm.matrices[-1].name, 2, 0.1)]
    evaluate_edits(lm, edits, splits, "calib", store)
    assert len(made) == 4 and alive == [[False] * 4]  # two SVDs, two reduced matrices: none alive while it evaluates


def test_second_edit_on_a_busy_model_is_refused_without_blocking(tiny_lm):
    lm = tiny_lm("llama")
    import threading
    inside, release = threading.Event(), threading.Event()

    def hold():
        with edited(lm, [Edit(lm.matrices[0].name, 1, 0.5)]):
            inside.set()
            release.wait(5)
    t = threading.Thread(target=hold)
    t.start()
    inside.wait(5)
    with pytest.raises(JobBusy, match="another job is editing"):
        with edited(lm, [Edit(lm.matrices[1].name, 1, 0.5)], blocking=False):
            pass
    release.set()
    t.join()


def test_second_identical_run_reads_everything_from_cache(tiny_lm, mc_task, store):
    lm = tiny_lm("llama")
    _, splits = _splits(mc_task)
    first = run_search(lm, splits, SMALL, store)
    second = run_search(lm, splits, SMALL, store)
    assert first.cache.get("eval", 0) == 9 and first.cache.get("svd", 0) == 4  # 8 candidates + best on test
    assert second.cache.get("eval", 0) == 0 and second.cache.get("svd", 0) == 0 and second.cache.get("compute", 0) == 0
    assert second.timings["gradients"] == 0.0
    assert all(c["cached"] for c in second.candidates)
    assert [c["accuracy"] for c in first.candidates] == [c["accuracy"] for c in second.candidates]


def test_one_svd_per_matrix_and_k_serves_its_rho_grid_with_no_cache(tiny_lm, mc_task, monkeypatch):
    import laser_core.reduction as reduction
    from laser_core.candidates import evaluate_candidate
    from laser_core.store import null_store
    lm = tiny_lm("llama")
    _, splits = _splits(mc_task)
    calls = []
    real = reduction.block_svd
    monkeypatch.setattr(reduction, "block_svd", lambda w, k, *a: calls.append((tuple(w.shape), k)) or real(w, k, *a))
    rep = run_search(lm, splits, SearchConfig(q=2, ks=(1, 2), rhos=(0.9, 0.5, 0.25), stack=1), null_store(),
                     held_out=False)  # one at a time, as evaluate_candidate: the numbers must match to the bit
    pairs = {(c["name"], c["k"]) for c in rep.candidates}
    evaluated = [c for c in rep.candidates if "same_as_rho" not in c]
    assert len(evaluated) > len(pairs)  # each (matrix, K) had rhos with different ranks to evaluate
    assert len(calls) == len(pairs) == rep.cache["svd"]
    for c in evaluated[-2:]:  # the same numbers as an evaluation that computes its own SVD
        alone = evaluate_candidate(lm, Edit(c["name"], c["k"], c["rho"]), splits, "calib", null_store())
        assert (alone["accuracy"], alone["log_loss"]) == (c["accuracy"], c["log_loss"])


def test_corrupt_or_foreign_cache_entries_are_recomputed_not_executed(tiny_lm, mc_task, store):
    import pickle
    lm = tiny_lm("llama")
    _, splits = _splits(mc_task)
    run_search(lm, splits, SMALL, store)
    keys = [(cache, k) for cache in (store._cache, store._factors) for k in cache.iterkeys()]
    assert {k.split("/")[0] for _, k in keys} == {"spectra", "spectra_time", "factors", "result", "report"}
    for i, (cache, k) in enumerate(keys):  # truncate half, replace the other half with a pickle
        cache.set(k, cache.get(k)[:7] if i % 2 else pickle.dumps({"evil": 1}))
    again = run_search(lm, splits, SMALL, store)
    read = [k for _, k in keys if not k.startswith("spectra_time/")]  # that one is written over with the spectra
    assert store.counts["corrupt"] >= len(read) - 1
    assert store.get_json(next(k for _, k in keys if k.startswith("spectra_time/")))["gradients"] > 0
    assert again.cache["eval"] == 9


def test_unwritable_cache_dir_runs_without_caching(tiny_lm, mc_task, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    s = Store(blocker / "store")  # parent is a file: cannot be created
    assert not s.enabled and "not usable" in s.disabled_reason
    _, splits = _splits(mc_task)
    assert run_search(tiny_lm("llama"), splits, SMALL, s).best is not None


def test_cancel_keeps_done_candidates_and_restores_weights(tiny_lm, mc_task, store):
    lm = tiny_lm("llama")
    before = weight_hashes(lm.model)
    _, splits = _splits(mc_task)
    token = CancelToken()
    seen = []

    def progress(ev):
        if ev.get("row"):  # a candidate done (a search's events also say which it starts on)
            seen.append(ev)
            if len(seen) == 3:
                token.cancel()
    one_by_one = dataclasses.replace(SMALL, stack=1)  # a stack would finish its candidates (test_stacking)
    report = run_search(lm, splits, one_by_one, store, progress=progress, cancel=token)
    assert report.status == "partial" and len(report.candidates) == 3 and report.best_test is None
    assert weight_hashes(lm.model) == before
    resumed = run_search(lm, splits, one_by_one, store)
    assert sum(c["cached"] for c in resumed.candidates) == 3


def test_a_search_says_what_it_starts_on_before_each_evaluation(tiny_lm, mc_task, store):
    """Its progress said what had finished only: the dashboard's bar stood full on "scores read from cache" while
    the first candidate ran (20 s for the demo on FEVER, building the states entering its layer)."""
    lm = tiny_lm("llama")
    _, splits = _splits(mc_task)
    events = []
    report = run_search(lm, splits, dataclasses.replace(SMALL, stack=1), store, progress=events.append)
    assert events[0] == {"phase": "base", "done": 0, "total": 1, "message": "base model on the calib split"}
    search = [e for e in events if e["phase"] == "search"]
    done = [e for e in search if e.get("row")]
    assert len(done) == len(report.candidates) == 8
    for e in done:  # each candidate evaluated was announced, with the steps done before it
        start = search[search.index(e) - 1]
        assert not start.get("row") and start["done"] == e["done"] - 1 and start["total"] == e["total"]
        assert start["message"] == f"evaluating {e['row']['name']} K={e['row']['k']} rho={e['row']['rho']:g}"


def test_a_rho_with_the_same_block_ranks_as_another_is_not_evaluated_twice(tiny_lm, mc_task, store):
    from laser_core.candidates import evaluate_candidate
    from laser_core.store import null_store

    lm = tiny_lm("llama")
    _, splits = _splits(mc_task)
    report = run_search(lm, splits, SearchConfig("laser", rhos=(0.5, 0.05, 0.01), layers=(1,)), store)
    by = {(c["name"], c["rho"]): c for c in report.candidates}
    same = [c for c in report.candidates if "same_as_rho" in c]
    assert len(same) == len(by) // 3  # every tiny matrix keeps rank 1 at rho 0.05 and 0.01
    assert store.counts["eval"] == len(by) - len(same) + 1  # + the best, on the test split
    for c in same:
        assert c["ranks"] == by[(c["name"], c["same_as_rho"])]["ranks"] and c["rho"] == 0.01
        again = evaluate_candidate(lm, Edit(c["name"], 1, 0.01), splits, "val", store)  # kept under its own key
        assert again["cached"] and again["same_as_rho"] == 0.05
        fresh = evaluate_candidate(lm, Edit(c["name"], 1, 0.01), splits, "val", null_store())  # really run
        assert (fresh["accuracy"], fresh["predictions"]) == (again["accuracy"], again["predictions"])
        assert fresh["log_loss"] == pytest.approx(again["log_loss"], abs=1e-6)


def test_early_stop_finds_the_same_best_candidate(tiny_lm, mc_task, store):
    lm = tiny_lm("llama")
    _, splits = _splits(mc_task, n_calib=40)
    full = run_search(lm, splits, SMALL, None)
    fast = run_search(lm, splits, SearchConfig(q=2, ks=(1, 2), rhos=(0.5, 0.1), early_stop=True), None)
    assert (fast.best["name"], fast.best["k"], fast.best["rho"]) == (full.best["name"], full.best["k"], full.best["rho"])
    assert fast.best["accuracy"] == full.best["accuracy"]


def test_a_candidate_stopped_early_is_reused_only_against_a_best_at_least_as_high(tiny_lm, mc_task, store,
                                                                                   monkeypatch):
    """A stop proves only that the candidate could not reach the best of that time: a search with another grid can
    reach it with a lower best, and must then run it to the end (else it could miss its true best). A candidate
    that falls short only once every example is scored is whole, not stopped (before, it was marked stopped)."""
    from laser_core.candidates import evaluate_candidate
    from laser_core.store import null_store
    lm = tiny_lm("llama")
    _, splits = _splits(mc_task, n_calib=40)
    edit = Edit(lm.matrices[0].name, 1, 0.5)
    whole = evaluate_candidate(lm, edit, splits, "calib", null_store(), beat=(0.99, 0.0))  # 40 examples: one batch
    assert not whole["stopped_early"] and whole["accuracy"] < 0.99
    monkeypatch.setattr("laser_core.sequences.batch_rows", lambda lm: 8)  # five batches: a stop can come mid-way
    stopped = evaluate_candidate(lm, edit, splits, "calib", store, beat=(0.99, 0.0))
    full = evaluate_candidate(lm, edit, splits, "calib", null_store())
    assert full["accuracy"] < 0.99 and stopped["stopped_early"] and stopped["stopped_below"] == 0.99
    assert evaluate_candidate(lm, edit, splits, "calib", store, beat=(1.0, 0.0))["cached"]  # a higher best: reused
    weaker = evaluate_candidate(lm, edit, splits, "calib", store, beat=(0.0, 0.0))  # a lower one: run to the end
    assert not weaker["cached"] and not weaker["stopped_early"] and weaker["accuracy"] == full["accuracy"]
    assert evaluate_candidate(lm, edit, splits, "calib", store, beat=(0.0, 0.0))["cached"]  # and that is kept
    from laser_core.recipe import recipe_metrics
    base = evaluate_candidate(lm, None, splits, "calib", store)
    assert recipe_metrics("calib", base, stopped)["edited"] is None  # a recipe does not carry its partial accuracy
    assert recipe_metrics("calib", base, weaker)["edited"]["accuracy"] == full["accuracy"]


def test_laser_sweep_covers_layers_times_types_times_rhos_on_validation(tiny_lm, mc_task, store):
    lm = tiny_lm("llama")
    _, splits = _splits(mc_task, n_calib=20, n_test=20)
    report = run_search(lm, splits, SearchConfig("laser", rhos=(0.5, 0.1), layers=(1,), types=("up", "down")), store)
    assert report.search_split == "val" and report.base["n"] == len(splits.val) == 12
    assert {(c["layer"], c["type"], c["k"], c["rho"]) for c in report.candidates} == \
        {(1, t, 1, r) for t in ("up", "down") for r in (0.5, 0.1)}
    events = []
    with pytest.raises(ConfigError, match="no matrices match"):
        run_search(lm, splits, SearchConfig("laser", layers=(7,)), store, progress=events.append)
    assert events == []  # refused before the base model is evaluated


def test_a_c2i_config_with_laser_layers_or_types_is_refused_not_silently_ignored():
    for extra in ({"layers": (20, 21)}, {"types": ("down",)}):
        with pytest.raises(ConfigError, match="layers and types choose the matrices of a LASER sweep"):
            SearchConfig("c2i", **extra)
    assert SearchConfig("laser", ks=(1,), layers=(20, 21), types=("down",)).layers == (20, 21)


def test_a_recipes_edits_are_evaluated_together_and_one_edit_through_the_cache(tiny_lm, mc_task, store):
    from laser_core import evaluate
    from laser_core.candidates import cached_combinations, cached_results, evaluate_edits
    lm = tiny_lm("llama")
    _, splits = _splits(mc_task)
    edits = [Edit(lm.matrices[0].name, 1, 0.25), Edit(lm.matrices[-1].name, 2, 0.25)]
    both = evaluate_edits(lm, edits, splits, "test", store)
    with edited(lm, edits):
        direct = evaluate(lm, splits.examples("test"))
    assert (both["accuracy"], both["log_loss"], both["correct"]) == (direct.accuracy, direct.log_loss, direct.correct)
    assert [e["name"] for e in both["edits"]] == [e.name for e in edits] and not both["cached"]
    # cached as a set of edits: in either order, on this split only, and apart from the single edits a search lists
    again = evaluate_edits(lm, edits[::-1], splits, "test", store)
    assert again["cached"] and (again["accuracy"], again["correct"]) == (both["accuracy"], both["correct"])
    assert not evaluate_edits(lm, edits, splits, "calib", store)["cached"]
    assert not evaluate_edits(lm, [edits[0], Edit(edits[1].name, 2, 0.5)], splits, "test", store)["cached"]
    assert [d for d in cached_results(store, lm, splits) if d["split"] == "test"] == []  # no single edit, no base
    listed = cached_combinations(store, lm, splits)  # Results' "Edits applied together": the three evaluated above
    assert sorted((d["split"], len(d["edits"])) for d in listed) == [("calib", 2), ("test", 2), ("test", 2)]
    ts = TaskSpec(str(mc_task), n_calib=20, n_test=20, seed=5)  # other questions of the same task: none of them
    assert cached_combinations(store, lm, make_splits(load_task(ts), ts)) == []
    one = evaluate_edits(lm, edits[:1], splits, "test", store)
    assert one["name"] == edits[0].name and evaluate_edits(lm, edits[:1], splits, "test", store)["cached"]
    assert abs(one["log_loss"] - both["log_loss"]) > 0  # the second edit counts


def test_q_larger_than_matrix_count_is_refused(tiny_lm, mc_task, store):
    _, splits = _splits(mc_task)
    with pytest.raises(ConfigError, match="q=99 is larger than the model's 14 matrices"):
        run_search(tiny_lm("llama"), splits, SearchConfig(q=99), store)


def test_recipe_apply_writes_a_loadable_model_that_reproduces_the_edited_accuracy(tiny_lm, tiny_dirs, mc_task,
                                                                                   store, tmp_path):
    lm = tiny_lm("llama")
    ts, splits = _splits(mc_task)
    report = run_search(lm, splits, SMALL, store)
    path = save_recipe(recipe_from_report(lm, report, ts), tmp_path / "r.yaml")
    recipe = load_recipe(path)
    assert recipe["edits"][0]["name"] == report.best["name"] and recipe["model"]["fingerprint"] == lm.fingerprint
    res = apply_recipe(recipe, tmp_path / "out")
    assert res["check"]["matches"] and res["check"]["accuracy"] == report.best_test["accuracy"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    w = dict(saved.named_parameters())[report.best["name"]]
    assert torch.linalg.matrix_rank(w) <= sum(report.best["ranks"])
    assert (tmp_path / "out" / "laser_recipe.json").exists()
    with pytest.raises(ConfigError, match="already exists"):
        apply_recipe(recipe, tmp_path / "out")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_saved_model_carries_a_model_card_written_from_its_recipe(tiny_lm, mc_task, store, tmp_path):
    import yaml

    from laser_core.card import DEMO_HUB_ID, base_model_id, model_card
    from laser_core.recipe import compose_recipes, make_recipe
    from laser_core.significance import PairedChange
    lm = tiny_lm("llama")
    ts, splits = _splits(mc_task)
    report = run_search(lm, splits, SMALL, store)
    recipe = recipe_from_report(lm, report, ts)
    apply_recipe(recipe, tmp_path / "out", check=False)
    card = (tmp_path / "out" / "README.md").read_text()
    assert card == model_card(recipe)
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "base_model" not in front  # a local folder: its hub id unknown
    e, m = recipe["edits"][0], recipe["metrics"]
    row = next(line for line in card.splitlines() if line.startswith(f"| `{e['name']}` |")).split(" | ")
    assert row[3:6] == [str(e["k"]), "contiguous", f"{e['rho']:g}"] and row[7].startswith(f"{e['params_kept']:,} of")
    held = next(line for line in card.splitlines() if line.startswith("| held-out test (never searched) |"))
    assert held == (f"| held-out test (never searched) | {m['edited_test']['n']} | {m['base_test']['accuracy']:.3f} | "
                    f"{m['edited_test']['accuracy']:.3f} | "
                    f"{m['edited_test']['accuracy'] - m['base_test']['accuracy']:+.3f} |")
    c = m["held_out_change"]
    assert f"Held-out change {PairedChange(**{k: c[k] for k in PairedChange.__dataclass_fields__}).summary()}." in card
    assert "| calibration (the search chose on it) | 20 |" in card and "on the task `" + str(mc_task) + "`" in card
    unmeasured = model_card(compose_recipes([recipe, make_recipe(lm, [Edit(lm.matrices[1].name, 1, 0.5)])]))
    assert "Not measured when it was saved" in unmeasured and "| split |" not in unmeasured
    assert "with 2 weight matrices replaced" in unmeasured
    assert [base_model_id(s) for s in ("demo", "gpt2", "owner/name", str(tmp_path / "out"), "m.gguf", "./gone")] == \
        [DEMO_HUB_ID, "gpt2", "owner/name", None, None, None]
    assert yaml.safe_load(model_card({**recipe, "model": {"source": "demo"}}).split("---")[1])["base_model"] == \
        DEMO_HUB_ID


def test_same_weights_in_another_folder_keep_their_fingerprint_cache_and_recipes(tiny_lm, tiny_dirs, mc_task,
                                                                                  store, tmp_path):
    # the config's _name_or_path (the folder it was loaded from) used to enter the fingerprint: a moved repository
    # or a copied cache lost every cached result, and a recipe refused the same weights loaded from elsewhere
    import shutil

    from conftest import TEST_DEVICE
    from laser_core import ModelSpec, load_model
    from laser_core.models import weights_fingerprint
    from laser_core.recipe import check_recipe_fits

    lm = tiny_lm("llama")
    moved = load_model(ModelSpec(str(shutil.copytree(tiny_dirs["llama"], tmp_path / "moved copy")), device=TEST_DEVICE))
    assert moved.model.config._name_or_path != lm.model.config._name_or_path
    assert moved.fingerprint == lm.fingerprint
    ts, splits = _splits(mc_task)
    report = run_search(lm, splits, SMALL, store)
    again = run_search(moved, splits, SMALL, store)
    assert again.candidates and all(c["cached"] for c in again.candidates)
    check_recipe_fits(moved, recipe_from_report(lm, report, ts))  # no "fingerprint" refusal
    # what the model is still counts: one weight, or one config value, changes the fingerprint
    moved.model.config.rms_norm_eps *= 10
    assert weights_fingerprint(moved.model) != lm.fingerprint
    moved.model.config.rms_norm_eps /= 10
    assert weights_fingerprint(moved.model) == lm.fingerprint
    with torch.no_grad():
        dict(moved.model.named_parameters())[lm.matrices[0].name][0, 0] += 1.0
    assert weights_fingerprint(moved.model) != lm.fingerprint


def test_recipe_for_other_weights_is_refused(tiny_lm, mc_task, tmp_path):
    lm = tiny_lm("llama")
    recipe = {"laser_lab_recipe": 1, "model": {"source": "x", "fingerprint": "0" * 16},
              "edits": [{"name": lm.matrices[0].name, "k": 1, "rho": 0.5}]}
    from laser_core.recipe import check_recipe_fits
    with pytest.raises(ConfigError, match="fingerprint"):
        check_recipe_fits(lm, recipe)
    recipe["edits"][0]["name"] = "model.layers.9.mlp.nope.weight"
    with pytest.raises(ConfigError, match="no block matrix named"):
        check_recipe_fits(lm, recipe, force=True)


def test_two_edits_of_one_matrix_are_refused_everywhere_and_leave_the_model_as_it_was(tiny_lm, mc_task, tmp_path):
    from laser_core.recipe import apply_edits_permanently, make_recipe
    lm = tiny_lm("llama")
    name = "model.layers.1.mlp.up_proj.weight"
    twice = [Edit(name, 1, 0.5), Edit("model.layers.0.mlp.down_proj.weight", 1, 0.5), Edit(name, 2, 0.1)]
    said = f"two edits reduce the same matrix: {name}; keep one edit per matrix"
    before = weight_hashes(lm.model)
    with pytest.raises(ConfigError, match=said):
        with edited(lm, twice):
            pass
    with pytest.raises(ConfigError, match=said):
        apply_edits_permanently(lm, twice)
    path = save_recipe(make_recipe(lm, twice), tmp_path / "twice.json")
    with pytest.raises(ConfigError, match=said):
        load_recipe(path)
    assert weight_hashes(lm.model) == before
    with concurrent.futures.ThreadPoolExecutor(1) as other:  # the lock (re-entrant) is free for another thread
        assert other.submit(lambda: lm.lock.acquire(blocking=False) and (lm.lock.release() or True)).result()


def test_a_cli_search_writes_its_recipe_in_the_cache_it_was_given_or_the_projects(tiny_dirs, mc_task, tmp_path,
                                                                                 monkeypatch, capsys):
    """Before, the recipe went beside the store's folder: with --no-cache to recipes/ in the working directory, with
    --cache-dir DIR to DIR's parent."""
    monkeypatch.setenv("LASER_LAB_CACHE", str(tmp_path / "project"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    args = ["--model", str(tiny_dirs["llama"]), "--device", "cpu", "--task", str(mc_task), "--n-calib", "20",
            "--n-test", "20", "--q", "1", "--ks", "1", "--rhos", "0.5"]
    for flags, folder in ((["--no-cache"], tmp_path / "project" / "recipes"),
                          (["--cache-dir", str(tmp_path / "mine")], tmp_path / "mine" / "recipes")):
        assert main(["search", *args, *flags]) == 0
        said = pathlib.Path(re.search(r"^recipe: (.*)$", capsys.readouterr().out, re.M).group(1))
        assert said.parent == folder and json.loads(said.read_text())["edits"][0]["rho"] == 0.5
    assert not (tmp_path / "elsewhere" / "recipes").exists() and not (tmp_path / "recipes").exists()


def test_a_cli_search_that_replaces_another_searchs_recipe_says_which_and_a_rerun_says_nothing(
        tiny_dirs, mc_task, tmp_path, caplog):
    """A search's recipe has one name per task, method and model: before, a search with other settings replaced the
    recipe of the one before without a word."""
    args = ["search", "--model", str(tiny_dirs["llama"]), "--device", "cpu", "--task", str(mc_task), "--n-calib", "20",
            "--n-test", "20", "--q", "1", "--ks", "1", "--cache-dir", str(tmp_path / "c")]
    said = []
    for rho in ("0.5", "0.25", "0.25"):
        caplog.clear()
        assert main([*args, "--rhos", rho]) == 0
        said.append([r.getMessage() for r in caplog.records if r.name == "laser_core.saving"])
    recipe = next((tmp_path / "c" / "recipes").iterdir())
    assert said[0] == [] and said[2] == [] and len(said[1]) == 1  # the first, and the same search again: nothing
    assert said[1][0].startswith(f"{recipe} held another recipe (model.layers.") and " K=1 rho=0.5, held-out " \
        "accuracy " in said[1][0] and "it is replaced" in said[1][0]
    assert json.loads(recipe.read_text())["edits"][0]["rho"] == 0.25


def test_cli_search_then_apply_and_user_errors_exit_2_with_one_line(tiny_dirs, mc_task, tmp_path, capsys):
    args = ["--model", str(tiny_dirs["gpt2"]), "--device", "cpu", "--task", str(mc_task), "--n-calib", "20",
            "--n-test", "20", "--cache-dir", str(tmp_path / "c")]
    assert main(["scores", *args, "--top", "3"]) == 0
    first = capsys.readouterr().out
    assert "transformer.h." in first and "read from cache" not in first
    took = re.search(r"time: gradients ([\d.]+) s, svd ([\d.]+) s\n", first).groups()
    assert main(["scores", *args, "--top", "3"]) == 0  # again: from the cache, saying what they took when computed
    assert capsys.readouterr().out.endswith(f"time: gradients 0.0 s, svd 0.0 s  (read from cache; they took {took[0]} s "
                                            f"and {took[1]} s when computed)\n")
    recipe = tmp_path / "r.json"
    assert main(["search", *args, "--q", "1", "--ks", "1", "--rhos", "0.5", "--recipe-out", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "best   held-out" in out and "chosen edit: transformer.h." in out and "candidates from cache 0/1" in out
    spent = float(took[0]) + float(took[1])  # the scores computed above: read back, with what they took then
    said = re.search(r"; scores read from cache \(their gradient step and SVDs took ([\d.]+) s when computed\)", out)
    assert abs(float(said.group(1)) - spent) <= 0.15  # each printed to 0.1 s
    from laser_core.cli_args import parser
    said = re.search(r"what it does to the other bundled tasks: python -m laser_core (.*)", out).group(1)
    parsed = parser().parse_args(said.split())  # a command that runs: eval of this recipe on the other tasks
    assert (parsed.cmd, parsed.recipe, parsed.other_tasks, parsed.task, parsed.n_test) == \
        ("eval", str(recipe), "all", str(mc_task), 20)
    base, best = (float(re.search(rf"{who} +held-out +accuracy ([\d.]+)", out).group(1)) for who in ("base", "best"))
    change = re.search(r"held-out change ([+-][\d.]+) \(95% CI .* (\d+) fixed, (\d+) broken of 20; McNemar p", out)
    assert float(change.group(1)) == pytest.approx(best - base, abs=1e-3)
    assert (int(change.group(2)) - int(change.group(3))) / 20 == pytest.approx(best - base, abs=1e-3)
    recorded = json.loads(recipe.read_text())["metrics"]["held_out_change"]
    assert main(["eval", *args, "--recipe", str(recipe)]) == 0  # the recipe on held-out test, against the base
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"test: accuracy {best:.3f}") and lines[1].startswith(f"base: accuracy {base:.3f}")
    assert lines[2].startswith(f"held-out change {recorded['change']:+.3f} (95% CI {recorded['low']:+.3f} to "
                             f"{recorded['high']:+.3f}; {recorded['fixed']} fixed, {recorded['broken']} broken of 20")
    assert "1 candidates on the calibration split (20 examples)" in out and "best   calibration accuracy" in out
    report = tmp_path / "report.json"  # the search's whole report, for a script's own analysis
    assert main(["search", *args, "--q", "1", "--ks", "1", "--rhos", "0.5", "--recipe-out", str(recipe),
                 "--report-out", str(report)]) == 0
    out = capsys.readouterr().out
    assert "candidates from cache 1/1" in out and f"report: {report}" in out
    doc = json.loads(report.read_text())
    assert (doc["status"], doc["config"]["rhos"], len(doc["candidates"])) == ("complete", [0.5], 1)
    assert doc["best_test"]["accuracy"] == pytest.approx(best, abs=5e-4) and doc["base_test"]["n"] == 20
    assert main(["search", *args, "--report-out", str(tmp_path)]) == 2  # a folder: refused before the model loads
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: cannot save to {tmp_path}: it is a folder; " \
                                                                "give a file name"
    assert main(["search", *args, "--q", "1", "--ks", "1", "--rhos", "0.5,0.25", "--recipe-out", str(recipe)]) == 0
    err = capsys.readouterr().err  # priced from the timings now in the cache (a tiny model's: under a second)
    assert re.search(r"estimated run time: (about \d+ s|under a second) \(1 to run, 1 in the cache; one full", err), err
    assert main(["apply", "--recipe", str(recipe), "--out", str(tmp_path / "m")]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["search", *args, "--rhos", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: rho must be in (0, 1], got 1.5"]
    assert main(["eval", "--model", str(tmp_path / "missing"), "--task", str(mc_task), "--n-calib", "20",
                 "--no-cache"]) == 2  # --no-cache: no store opened in the repository's cache/
    assert "model not found" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_dirs["gpt2"]), "--task", str(tmp_path / "missing.json"),
                 "--no-cache"]) == 2
    assert "task not found" in (err := capsys.readouterr().err) and "loading" not in err  # before any model load


def test_compose_makes_one_recipe_whose_edits_eval_measures_together(tiny_lm, tiny_dirs, mc_task, tmp_path, capsys):
    """LASER composes reductions of several matrices; before, a recipe of several edits had to be written by hand."""
    import dataclasses

    from laser_core.candidates import evaluate_edits
    from laser_core.recipe import compose_recipes, make_recipe
    from laser_core.store import null_store
    lm = tiny_lm("gpt2")
    ts, _ = _splits(mc_task, n_calib=20)
    ts = dataclasses.replace(ts, seed=3)  # a task spec off the defaults: the command printed carries it
    splits = make_splits(load_task(ts), ts)
    first, second = Edit(lm.matrices[0].name, 1, 0.5), Edit(lm.matrices[-1].name, 2, 0.25)
    paths = []
    for i, e in enumerate((first, second)):
        paths.append(tmp_path / f"r{i}.json")
        save_recipe(make_recipe(lm, [e], ts, {"edited_test": {"accuracy": 0.5, "log_loss": 1.0, "n": 20}}), paths[-1])
    assert main(["compose", *map(str, paths), "--out", str(tmp_path / "both.yaml")]) == 0
    said = capsys.readouterr().out
    both = load_recipe(tmp_path / "both.yaml")
    assert [(e["name"], e["k"], e["rho"]) for e in both["edits"]] == [(e.name, e.k, e.rho) for e in (first, second)]
    assert both["metrics"] == {} and both["method"] == "composed" and both["task"] == load_recipe(paths[0])["task"]
    assert "recipe: " in said and "(2 edits from 2 recipes)" in said and "--seed 3" in said
    cmd = said.split("evaluate the edits together: python -m laser_core ")[1].split()
    assert main([*cmd, "--cache-dir", str(tmp_path / "c")]) == 0  # the command it prints runs
    out = capsys.readouterr().out
    together = evaluate_edits(lm, [first, second], splits, "test", null_store())
    assert out.startswith(f"test: accuracy {together['accuracy']:.3f}") and "held-out change" in out
    assert main([*cmd, "--cache-dir", str(tmp_path / "c")]) == 0  # asked again: the edits together, from the cache
    assert capsys.readouterr().out.split("\n")[0].endswith("(cached)")
    with pytest.raises(ConfigError, match="two edits reduce the same matrix"):
        compose_recipes([load_recipe(paths[0]), load_recipe(paths[0])])
    other = {**load_recipe(paths[1]), "model": {**load_recipe(paths[1])["model"], "fingerprint": "0" * 16}}
    with pytest.raises(ConfigError, match="models with other weights"):
        compose_recipes([load_recipe(paths[0]), other])
    assert main(["compose", str(paths[0]), "--out", str(tmp_path / "one.json")]) == 2
    assert capsys.readouterr().err.strip() == "error: compose needs at least two recipes"
    elsewhere = {**load_recipe(paths[1]), "task": {**load_recipe(paths[1])["task"], "seed": 4}}
    assert compose_recipes([load_recipe(paths[0]), elsewhere])["task"] is None  # no task in common


def test_cli_writes_a_cancelled_searchs_report_with_the_candidates_it_finished(tiny_dirs, mc_task, tmp_path, capsys,
                                                                             monkeypatch):
    """--report-out is for a script's own analysis: a search stopped by Ctrl-C still leaves what it finished."""
    import laser_core.search as search
    real = search.run_search

    def stopped_after_one(lm, splits, cfg, store, progress=None, cancel=None):
        token = CancelToken()  # as Ctrl-C sets the CLI's token once the first candidate is done
        return real(lm, splits, cfg, store, progress=lambda ev: ev.get("row") and token.cancel(), cancel=token)
    monkeypatch.setattr(search, "run_search", stopped_after_one)
    report = tmp_path / "partial.json"
    assert main(["search", "--model", str(tiny_dirs["llama"]), "--task", str(mc_task), "--n-calib", "20", "--n-test",
                 "20", "--cache-dir", str(tmp_path / "store"), "--q", "1", "--ks", "1", "--rhos", "0.5,0.25",
                 "--stack", "1", "--report-out", str(report)]) == 130
    out = capsys.readouterr().out
    assert f"report: {report}" in out and "cancelled: 1 candidate kept in the cache" in out
    doc = json.loads(report.read_text())
    assert (doc["status"], len(doc["candidates"]), doc["best_test"]) == ("partial", 1, None)


def test_cli_progress_is_one_line_per_phase_in_a_log_and_bars_on_a_terminal():
    import io

    from laser_core.progress import Bars

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    events = [{"phase": "gradients", "done": d, "total": 3, "message": "forward+backward"} for d in range(4)] + \
             [{"phase": "svd", "done": d, "total": 2, "message": "SVD of every matrix"} for d in range(3)] + \
             [{"phase": "test", "done": 0, "total": 2, "message": "held-out test"}]  # its last event comes before the work
    for stream in (io.StringIO(), Terminal()):
        bars = Bars(stream)
        for ev in events:
            bars(ev)
        bars.close()
        if not stream.isatty():
            lines = stream.getvalue().splitlines()
            assert [line.split(" in ")[0] for line in lines] == ["gradients: 3/3", "svd: 2/2", "test:"]
            assert lines[1].endswith("s (SVD of every matrix)")
        else:
            assert "\r" in stream.getvalue() and "gradients: 3/3 in" not in stream.getvalue()


def test_spec_args_give_the_cli_the_same_model_and_task_specs():
    from laser_core import ModelSpec
    from laser_core.cli_args import parser, spec_args, specs_of

    for m, t in [(ModelSpec(), TaskSpec()),
                 (ModelSpec("/m dir", "cpu", "bfloat16"),
                  TaskSpec("x.csv", 50, 80, 30, 7, "q", "opts", "gold", "refs", 40, prompt_template="Q: {q}\\nA:",
                           fixed_choices="no|yes")),
                 (ModelSpec(), TaskSpec("w.jsonl", choices_col="option1,option2", answer_base=1)),
                 (ModelSpec(), TaskSpec("qa_wikidata", match="word")), (ModelSpec(), TaskSpec(shots=3))]:
        args = spec_args(m, t)
        assert specs_of(parser().parse_args(["search", *args])) == (m, t)
    assert spec_args(ModelSpec(), TaskSpec(n_test=200)) == ["--model", "demo", "--task", "fever", "--n-test", "200"]


def test_every_cli_option_says_what_it_does_and_search_settings_reach_the_config(capsys):
    import argparse

    from laser_core.cli_args import parser as make_parser, search_config_of

    parser = make_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{cmd} {opt.option_strings[-1]}" for cmd, sp in subs.items() for opt in sp._actions
               if opt.option_strings and opt.dest != "help" and not opt.help]
    assert missing == []
    cfg = search_config_of(parser.parse_args(["search", "--q", "3", "--ks", "1-2", "--rhos", "0.5,0.1", "--score",
                                              "first_order", "--tail-fraction", "0.5", "--early-stop",
                                              "--prefix-budget-mb", "64"]), "c2i")
    assert cfg == SearchConfig("c2i", "first_order", 3, (1, 2), (0.5, 0.1), 0.5, early_stop=True, prefix_budget_mb=64)
    cfg = search_config_of(parser.parse_args(["laser", "--layers", "0,2", "--types", "up", "--no-prefix-reuse"]), "laser")
    assert cfg == SearchConfig("laser", ks=(1,), layers=(0, 2), types=("up",), prefix_reuse=False)
    with pytest.raises(ConfigError, match="prefix_budget_mb must be >= 0, got -1"):
        search_config_of(parser.parse_args(["laser", "--prefix-budget-mb", "-1"]), "laser")
    assert parser.parse_args(["laser", "--layers", "0-2,5"]).layers == (0, 1, 2, 5)
    with pytest.raises(SystemExit):
        parser.parse_args(["laser", "--layers", "5-2"])
    assert "the range 5-2 is empty" in capsys.readouterr().err


def test_a_searchs_recipe_records_its_settings_and_its_card_the_command_that_reruns_it(tiny_lm, mc_task, store,
                                                                                        tmp_path, capsys):
    """The search settings go into the recipe; the card's command, run, is the same search (its report read back from
    the cache, same best); a recipe without settings (a composition, one from before) has no such section."""
    import shlex

    from laser_core.card import model_card
    from laser_core.cli import main
    from laser_core.recipe import compose_recipes, make_recipe, recipe_search
    lm = tiny_lm("llama")
    ts, splits = _splits(mc_task)
    cfg = SearchConfig(q=2, ks=(1, 2), rhos=(0.5, 0.1), score="first_order")
    recipe = recipe_from_report(lm, run_search(lm, splits, cfg, store), ts)
    path = save_recipe(recipe, tmp_path / "r.json")
    assert recipe_search(load_recipe(path)) == cfg and recipe["search"]["score"] == "first_order"
    lines = model_card(recipe).splitlines()
    command = lines[lines.index("The search that found it (its settings are the recipe's `search`):") + 3]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "laser_core"] and "--score" in argv
    assert main([*argv[3:], "--cache-dir", str(tmp_path / "store"), "--recipe-out", str(tmp_path / "again.json")]) == 0
    again = load_recipe(tmp_path / "again.json")
    assert [e["name"] for e in again["edits"]] == [e["name"] for e in recipe["edits"]] and again["search"] == \
        recipe["search"]
    assert "candidates from cache 8/8" in capsys.readouterr().out
    other = next(r.name for r in lm.matrices if r.name != recipe["edits"][0]["name"])
    assert "The search that found it" not in model_card(compose_recipes([recipe, make_recipe(lm, [Edit(other, 1, .5)])]))
    assert recipe_search({**recipe, "search": {"q": "many"}}) is None


def test_search_args_give_the_cli_the_same_search_settings():
    from laser_core.cli_args import parser, search_args, search_config_of

    for cfg in [SearchConfig(), SearchConfig("laser", ks=(1,)),
                SearchConfig("c2i", "first_order", 3, (1, 4), (0.5, 0.01), 0.3, early_stop=True, prefix_budget_mb=64),
                SearchConfig("c2i", ks=(2, 8), grouping="clustered"),
                SearchConfig("laser", ks=(1,), rhos=(0.25,), layers=(0, 2), types=("up", "down"), prefix_reuse=False)]:
        args = search_args(cfg)
        assert search_config_of(parser().parse_args(args), cfg.method) == cfg, args
    assert search_args(SearchConfig(q=2, rhos=(0.1, 0.005))) == ["search", "--q", "2", "--rhos", "0.1,0.005"]


def test_cached_results_lists_only_evaluations_on_the_current_splits(tiny_lm, mc_task, store):
    from laser_core.candidates import cached_results
    lm = tiny_lm("llama")
    ts_a = TaskSpec(str(mc_task), n_calib=20, n_test=20, seed=0)
    ts_b = TaskSpec(str(mc_task), n_calib=20, n_test=20, seed=1)
    a = make_splits(load_task(ts_a), ts_a)
    b = make_splits(load_task(ts_b), ts_b)
    run_search(lm, a, SearchConfig(q=1, ks=(1,), rhos=(0.5,)), store)
    run_search(lm, b, SearchConfig(q=1, ks=(1,), rhos=(0.5, 0.1)), store)
    assert len(cached_results(store, lm, a)) == 1 + 1 + 2  # base + 1 candidate on calib; base + best on test
    assert len(cached_results(store, lm, b)) == 1 + 2 + 2


def test_a_generation_tasks_report_is_cached_per_decoding_length_and_a_multiple_choice_ones_as_before(
        tiny_lm, mc_task, store, tmp_path):
    """The dashboard shows a cached report for its settings; with a longer max_new_tokens, a generation task's
    report (every result in it decoded to the old length) is not that report."""
    import dataclasses

    from conftest import write_jsonl
    from laser_core.config import to_dict
    from laser_core.search import report_key
    lm = tiny_lm("llama")
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": f"Say {i}:", "targets": [f" {i}"]} for i in range(40)])
    cfg = SearchConfig(q=1, ks=(1,), rhos=(0.5,))
    for source, differs in ((str(gen), True), (str(mc_task), False)):
        ts = TaskSpec(source, n_calib=10, n_test=10)
        short, longer = (make_splits(load_task(t), t) for t in (ts, dataclasses.replace(ts, max_new_tokens=20)))
        assert (report_key(store, lm, short, cfg) != report_key(store, lm, longer, cfg)) == differs
    ts = TaskSpec(str(mc_task), n_calib=10, n_test=10)  # the key a multiple-choice report was cached under before
    splits = make_splits(load_task(ts), ts)
    assert report_key(store, lm, splits, cfg) == store.key("report", lm.fingerprint, splits.task.digest, {
        "cfg": to_dict(cfg), "split": splits.key("calib"), "status": "complete"})


def test_a_search_run_with_other_speed_settings_is_found_as_the_same_search(tiny_lm, mc_task, store):
    """Stack size, prefix budget and prefix reuse change how fast a search runs, not what it finds: its report is
    cached under the key of the same search with the defaults (which the dashboard looks up), so a search run from
    the CLI with --stack 2 shows on Explore without running again. Early stop and the grids stay apart."""
    from laser_core.search import report_key
    lm = tiny_lm("llama")
    _, splits = _splits(mc_task)
    fast = SearchConfig(q=1, ks=(1, 2), rhos=(0.5, 0.1), stack=2, prefix_budget_mb=1, prefix_reuse=False)
    report = run_search(lm, splits, fast, store)
    plain = SearchConfig(q=1, ks=(1, 2), rhos=(0.5, 0.1))
    found = store.get_json(report_key(store, lm, splits, plain))
    assert found is not None and found["config"]["stack"] == 2 and found["config"]["prefix_reuse"] is False
    assert [(c["name"], c["k"], c["rho"]) for c in found["candidates"]] == \
        [(c["name"], c["k"], c["rho"]) for c in report.candidates]
    for other in (dataclasses.replace(plain, early_stop=True), dataclasses.replace(plain, rhos=(0.5,))):
        assert store.get_json(report_key(store, lm, splits, other)) is None


def test_a_search_reports_the_most_its_cached_states_held_at_once_and_its_time_line_says_so(tiny_lm, mc_task, store):
    """The states of both swept layers at once under the default budget, one layer's at a time under a budget of 0,
    none without prefix reuse or when every candidate comes from the cache; the CLI's time line and the dashboard's
    caption (search.time_summary) say it, so that a budget can be set knowing what the states take."""
    from laser_core.prefix_states import PrefixStates
    from laser_core.search import time_summary
    lm = tiny_lm("llama")
    _, splits = _splits(mc_task)
    sweep = SearchConfig("laser", ks=(1,), rhos=(0.5, 0.1), layers=(0, 1), types=("down",))
    roomy = run_search(lm, splits, sweep, None)
    one = PrefixStates(lm, splits.examples("val"), 1).nbytes  # layer 1's states, the larger share of the two
    assert roomy.states["layers"] == 2 and roomy.states["device"] == "cpu" and roomy.states["mb"] * 2**20 > one
    tight = run_search(lm, splits, dataclasses.replace(sweep, prefix_budget_mb=0), None)
    assert tight.states["layers"] == 1 and tight.states["mb"] < roomy.states["mb"]
    line = time_summary(tight.to_dict())
    assert line.startswith("search ") and line.endswith(f"; candidates from cache 0/4; cached states up to "
                                                        f"{tight.states['mb']:g} MB on cpu (1 layer at once)"), line
    assert run_search(lm, splits, dataclasses.replace(sweep, prefix_reuse=False), None).states == {}
    run_search(lm, splits, sweep, store)
    again = run_search(lm, splits, sweep, store)  # every candidate from the cache: no states built
    took = sum(c["seconds"] for c in again.candidates)  # what they took when the run before evaluated them
    assert again.states == {} and time_summary(again.to_dict()).endswith(
        f"; candidates from cache 4/4 (their evaluations took {took:.1f} s when they ran)")
    read_back = {"timings": {"gradients": 1, "scores": 0, "search": 2, "svd": 1, "test": 1, "total": 5}}  # sorted
    assert time_summary(read_back) == ("gradients 1.0 s, svd 1.0 s, scores 0.0 s, search 2.0 s, test 1.0 s, "
                                       "total 5.0 s; candidates from cache 0/0")  # in the order they ran


def test_a_generation_task_is_scored_by_its_answer_match_rule_and_each_rule_cached_apart(tiny_lm, tiny_dirs, store,
                                                                                         tmp_path, capsys):
    """LASER's rule (an accepted answer occurs in the generated line) credits "5" in "555": the stricter rules do
    not. The same generations are scored by each rule; a rule's results are cached under their own key, and
    LASER's keep the key they had before there was a choice."""
    import dataclasses

    from conftest import write_jsonl
    from laser_core.candidates import evaluate_candidate, result_key
    from laser_core.answers import MATCH_RULES, answer_matches
    lm = tiny_lm("llama")
    prompts = [f"Say {i}:" for i in range(30)]
    ts = TaskSpec(str(write_jsonl(tmp_path / "say.jsonl", [{"prompt": p, "targets": [" x"]} for p in prompts])),
                  n_calib=10, n_test=10, max_new_tokens=6)
    said = evaluate_candidate(lm, None, make_splits(load_task(ts), ts), "calib", store)["predictions"]
    assert all(len(p.strip()) > 1 for p in said)  # random weights: a few bytes each
    generated = dict(zip([e.prompt for e in make_splits(load_task(ts), ts).examples("calib")], said))
    # every accepted answer is the first character of what the model says to its prompt (greedy: the same again)
    path = write_jsonl(tmp_path / "first.jsonl", [{"prompt": p, "targets": [generated.get(p, "x ").strip()[0]]}
                                                  for p in prompts])
    docs = {}
    for rule in MATCH_RULES:
        spec = dataclasses.replace(ts, source=str(path), match=rule)
        splits = make_splits(load_task(spec), spec)
        docs[rule] = evaluate_candidate(lm, None, splits, "calib", store)
        assert not docs[rule]["cached"] and evaluate_candidate(lm, None, splits, "calib", store)["cached"]
        assert docs[rule]["predictions"] == said
        assert docs[rule]["correct"] == [answer_matches(p, e.targets, rule)
                                         for p, e in zip(said, splits.examples("calib"))]
        if rule == "contains":
            assert result_key(store, lm, splits, "calib", None) == store.key(
                "result", lm.fingerprint, splits.task.digest,
                {"split": splits.key("calib"), "edit": None, "max_new_tokens": 6})
    assert docs["contains"]["accuracy"] == 1.0 and docs["exact"]["accuracy"] == 0.0
    for rule, said in (("exact", "0.000"), ("contains", "1.000")):  # the CLI says which rule it scored by
        assert main(["eval", "--model", str(tiny_dirs["llama"]), "--task", str(path), "--n-calib", "10", "--n-test", "10",
                     "--max-new-tokens", "6", "--split", "calib", "--match", rule, "--cache-dir", str(tmp_path / "c")]) == 0
        out = capsys.readouterr().out
        assert f"calib: accuracy {said}" in out and f"(answers matched by the '{rule}' rule)" in out, out


def test_a_search_without_held_out_results_is_not_cached_as_a_complete_report(tiny_lm, mc_task, store):
    from laser_core.search import report_key
    lm = tiny_lm("llama")
    _, splits = _splits(mc_task)
    cfg = SearchConfig(q=1, ks=(1,), rhos=(0.5,))
    rep = run_search(lm, splits, cfg, store, held_out=False)
    assert rep.status == "complete" and rep.base_test is None and rep.best_test is None
    assert store.get_json(report_key(store, lm, splits, cfg)) is None  # the Explore page reads base_test from it
    rep = run_search(lm, splits, cfg, store)
    assert store.get_json(report_key(store, lm, splits, cfg))["base_test"]["n"] == 20


def test_report_builds_the_paper_table_with_every_method(tiny_dirs, tmp_path, monkeypatch):
    from laser_core import ModelSpec, report, search
    from laser_core.report import paper_table
    from laser_core.report_table import table_markdown
    from conftest import write_mc_jsonl
    task = write_mc_jsonl(tmp_path / "even.jsonl", 200)
    seen, on_test = [], []
    real = search.evaluate_candidate

    def counted(lm, edit, splits, split, *args, **kwargs):
        if split == "test":
            on_test.append(edit)
        return real(lm, edit, splits, split, *args, **kwargs)

    configs, real_search = [], report.run_search
    monkeypatch.setattr(search, "evaluate_candidate", counted)
    monkeypatch.setattr(report, "evaluate_candidate", counted)
    monkeypatch.setattr(report, "run_search", lambda lm, splits, cfg, *a, **kw: configs.append(cfg)
                        or real_search(lm, splits, cfg, *a, **kw))
    result = paper_table(ModelSpec(str(tiny_dirs["llama"]), "cpu"), [str(task)], quick=True, n_calib=30, n_test=30,
                         on_row=seen.append, grouping="clustered")
    row = result["rows"][0]
    assert len(seen) == 1 and row["n_val"] == 40 and row["n_test"] == 30
    assert len(on_test) == 5 and on_test.count(None) == 1  # the base once, then each method's best once
    for k in ("base_test", "laser_test", "c2i_k1_test", "c2i_kgrid_test", "c2i_kgrid_clustered_test"):
        assert 0.0 <= row[k] <= 1.0
    assert [(c.method, c.ks, c.grouping) for c in configs] == [
        ("laser", (1,), "contiguous"), ("c2i", (1,), "contiguous"), ("c2i", (1, 4), "contiguous"),
        ("c2i", (1, 4), "clustered")]  # the paper's columns as before, then the K grid with clustered rows
    assert row["laser_s"] > row["laser_measured_s"] > 0  # one of two layers measured: the rest extrapolated
    for label in ("laser", "c2i_k1", "c2i_kgrid", "c2i_kgrid_clustered"):  # each paired with the base on the same 30
        change = row[f"{label}_change"]
        assert change["n"] == 30 and change["change"] == pytest.approx(row[f"{label}_test"] - row["base_test"])
        assert change["low"] <= change["change"] <= change["high"] and 0 < change["p_value"] <= 1
    text = table_markdown(result)
    assert text.startswith("| task | base | LASER | C2I K=1 | C2I K grid | C2I K grid clustered | LASER time (s) | "
                           "C2I K=1 time (s) / speedup | C2I K grid time (s) / speedup | C2I K grid clustered time (s) / "
                           "speedup |\n|---|---|---|---|---|---|---|---|---|---|\n") and "quick mode" in text
    assert f"| {row['c2i_kgrid_clustered_s']:.0f} / {row['c2i_kgrid_clustered_speedup']:.1f}x |" in text
    assert "†: differs from the base beyond noise" in text and f"{row['task']}: LASER " in text
    assert "Read together, as 4 tests" in text and "C2I K grid clustered L" in text


def test_report_speed_flags_reach_every_search_and_change_no_edit_found(tiny_dirs, tmp_path, monkeypatch, capsys):
    from conftest import write_mc_jsonl
    from laser_core import report
    task = str(write_mc_jsonl(tmp_path / "even.jsonl", 200))
    configs, pools, real_search, real_pool = [], [], report.run_search, report.PrefixPool
    monkeypatch.setattr(report, "run_search", lambda lm, splits, cfg, *a, **kw: configs.append(cfg)
                        or real_search(lm, splits, cfg, *a, **kw))
    monkeypatch.setattr(report, "PrefixPool", lambda *a: pools.append(a) or real_pool(*a))  # quick LASER's probes
    flags = ["report", "--model", str(tiny_dirs["llama"]), "--device", "cpu", "--tasks", task, "--quick",
             "--n-calib", "30", "--n-test", "30"]
    rows = {}
    for name, extra in (("default", []), ("speed", ["--no-prefix-reuse", "--stack", "2", "--prefix-budget-mb", "64"])):
        out = tmp_path / f"{name}.json"
        assert main([*flags, *extra, "--json-out", str(out)]) == 0
        rows[name] = json.loads(out.read_text())
        rows[name]["text"] = capsys.readouterr().out
    assert [(c.prefix_reuse, c.stack, c.prefix_budget_mb) for c in configs] == [(True, 0, 2048)] * 3 + [(False, 2, 64)] * 3
    assert len(pools) == 1 and pools[0][1] == 2048 * 2**20  # the default run's probe only: none without prefix reuse
    assert {k: rows["speed"]["settings"][k] for k in ("prefix_reuse", "stack", "prefix_budget_mb")} == \
        {"prefix_reuse": False, "stack": 2, "prefix_budget_mb": 64}
    for label in ("laser", "c2i_k1", "c2i_kgrid"):  # exact: the same edits and held-out accuracies, other times
        assert rows["speed"]["rows"][0][f"{label}_best"] == rows["default"]["rows"][0][f"{label}_best"]
        assert rows["speed"]["rows"][0][f"{label}_test"] == rows["default"]["rows"][0][f"{label}_test"]
    assert "Speed settings of every method (they change the times, not the edits found): prefix reuse off; " \
        "cached states up to 64 MB; stack 2 (candidates of one matrix evaluated together)." in rows["speed"]["text"]
    assert "Speed settings" not in rows["default"]["text"]
    assert main([*flags, "--stack", "-1"]) == 2 and "stack must be >= 0" in capsys.readouterr().err
    assert len(configs) == 6  # refused before any task ran


def test_an_interrupted_report_prints_the_table_of_the_tasks_that_finished(tiny_dirs, tmp_path, monkeypatch, capsys):
    from conftest import write_mc_jsonl
    from laser_core import report
    one, two = (str(write_mc_jsonl(tmp_path / f"{n}.jsonl", 200, seed=i)) for i, n in enumerate(("one", "two")))
    real, sweeps = report.laser_baseline, []

    def ctrl_c_on_the_second_task(*a, **kw):
        sweeps.append(1)
        if len(sweeps) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(report, "laser_baseline", ctrl_c_on_the_second_task)
    out = tmp_path / "r.json"
    flags = ["report", "--model", str(tiny_dirs["llama"]), "--device", "cpu", "--quick", "--n-calib", "30",
             "--n-test", "30", "--json-out", str(out)]
    assert main([*flags, "--tasks", f"{one},{two}"]) == 130
    printed = capsys.readouterr()
    assert [r["task"] for r in json.loads(out.read_text())["rows"]] == [one]
    assert printed.out.startswith("| task | base | LASER |") and f"| {one} | " in printed.out and two not in printed.out
    assert printed.err.strip().endswith(f"interrupted: the table holds the 1 of 2 tasks that finished (also in {out}); "
                                        "the task running then is not in it")
    sweeps.clear()
    monkeypatch.setattr(report, "laser_baseline", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main([*flags, "--tasks", one]) == 130  # none finished: the CLI's usual line, no table
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.strip().splitlines()[-1] == \
        "interrupted: stopped here; no partial model or recipe was written"


def test_searches_lists_this_splits_c2i_searches_and_laser_sweeps_side_by_side(tiny_dirs, mc_task, tmp_path, capsys):
    """``searches``: every complete search in the cache for the model and the task's splits, of any settings, with the
    time its candidates took as they ran, its best and that best's paired held-out change; other seeds' are not."""
    from laser_core import ModelSpec, Store, TaskSpec, load_model, load_task, make_splits, run_search
    from laser_core.searches import cached_reports, full_sweep_of, search_rows, searches_markdown
    cache = tmp_path / "cache"
    spec = TaskSpec(str(mc_task), n_calib=20, n_test=20)
    lm, splits = load_model(ModelSpec(str(tiny_dirs["llama"]), "cpu")), make_splits(load_task(spec), spec)
    flags = ["--model", str(tiny_dirs["llama"]), "--device", "cpu", "--task", str(mc_task), "--n-calib", "20",
             "--n-test", "20", "--cache-dir", str(cache)]
    assert main(["searches", *flags]) == 0
    assert capsys.readouterr().out.startswith("no search in the cache for this model on ")
    assert main(["searches", *flags, "--no-cache"]) == 2
    assert capsys.readouterr().err.strip() == "error: searches lists what the cache holds: run it without --no-cache"
    c2i = run_search(lm, splits, SearchConfig(q=2, ks=(1, 2), rhos=(0.5, 0.1)), Store(cache)).to_dict()
    laser = run_search(lm, splits, SearchConfig("laser", ks=(1,), rhos=(0.5,), layers=(1,)), Store(cache)).to_dict()
    other = TaskSpec(str(mc_task), n_calib=20, n_test=20, seed=3)
    run_search(lm, make_splits(load_task(other), other), SearchConfig(q=1, ks=(1,), rhos=(0.3,)), Store(cache))
    reports = cached_reports(Store(cache), lm, splits)
    assert sorted(r["method"] for r in reports) == ["c2i", "laser"]  # not the other seed's
    rows = search_rows(reports, full_sweep_of(lm, splits, Store(cache)))  # as the CLI lists them
    c, sweep = rows  # C2I first
    assert (c["method"], c["settings"], c["candidates"], c["split"]) == ("C2I", "q=2, K 1,2, ρ 0.5, 0.1", 8, "calib")
    assert (sweep["method"], sweep["settings"], sweep["split"]) == ("LASER", "layers 1–1, all types, ρ 0.5", "val")
    assert c2i["spectra_s"] > 0 and c["spectra_s"] == c2i["spectra_s"]  # its gradient step and SVDs count too
    assert c["time_s"] == pytest.approx(sum(x["seconds"] for x in c2i["candidates"]) + c2i["spectra_s"])
    assert c["less_than_laser"] == pytest.approx(sweep["time_s"] / c["time_s"]) and sweep["less_than_laser"] is None
    assert c["best"] == c2i["best"] and c["accuracy"] == c2i["best_test"]["accuracy"]
    assert c["change"].change == pytest.approx(c2i["best_test"]["accuracy"] - c2i["base_test"]["accuracy"])
    assert sweep["best_on_split"] == laser["best"]["accuracy"]
    assert main(["searches", *flags]) == 0
    out = capsys.readouterr().out
    b = c2i["best"]
    assert out.startswith(f"2 searches in the cache for this model on {splits.task.name} (calibration 20, ")
    assert searches_markdown(rows) in out and "| x less than LASER |" in out
    assert (f"x less than LASER: the time of LASER sweep #2 (layers 1–1, all types, ρ 0.5; {sweep['candidates']} "
            f"candidates, {sweep['time_s']:.1f} s), the largest in the cache, over each C2I search's") in out
    # and with LASER's full sweep of its rho grid, estimated from the timings in the cache
    from laser_core.estimate import full_sweep_seconds, full_sweep_unit
    unit, basis = full_sweep_unit(lm, splits, Store(cache))
    assert c["less_than_full_laser"] == pytest.approx(full_sweep_seconds(lm, splits, (0.5, 0.1), unit) / c["time_s"])
    assert sweep["less_than_full_laser"] is None
    assert "| x less than LASER | x less than full LASER (est.) |" in out
    assert (f"x less than full LASER (est.): the time LASER's sweep of every matrix (all layers and types, "
            f"K=1, on the validation split) over the C2I search's ρ grid would take here, estimated from the cache's "
            f"timings as Explore estimates a run (one full evaluation of that split about {unit:.1f} s, from {basis})") \
        in out
    assert f"| L{b['layer']}.{b['type']} K={b['k']} rho={b['rho']:g} | {b['accuracy']:.3f} (calib) | " in out
    assert f"| {c['time_s']:.1f} (of which gradient + SVD {c2i['spectra_s']:.1f}) |" in out


def test_searches_forget_takes_one_search_off_the_list_and_keeps_its_candidates(tiny_dirs, mc_task, tmp_path, capsys,
                                                                                 monkeypatch):
    """``searches --forget N`` deletes the report of search N (numbered as listed) and nothing else: its candidates'
    results stay, so running it again lists it again with every evaluation read from the cache. A number beyond the
    list is refused, the cache untouched; so is a delete the cache folder does not take."""
    from laser_core import ModelSpec, Store, TaskSpec, load_model, load_task, make_splits, run_search
    from laser_core.candidates import cached_results
    from laser_core.searches import cached_reports
    cache = tmp_path / "cache"
    spec = TaskSpec(str(mc_task), n_calib=20, n_test=20)
    lm, splits = load_model(ModelSpec(str(tiny_dirs["llama"]), "cpu")), make_splits(load_task(spec), spec)
    flags = ["--model", str(tiny_dirs["llama"]), "--device", "cpu", "--task", str(mc_task), "--n-calib", "20",
             "--n-test", "20", "--cache-dir", str(cache)]
    cfg = SearchConfig(q=2, ks=(1,), rhos=(0.5, 0.1))
    run_search(lm, splits, cfg, Store(cache))
    run_search(lm, splits, SearchConfig("laser", ks=(1,), rhos=(0.5,), layers=(1,)), Store(cache))
    results = cached_results(Store(cache), lm, splits)
    assert main(["searches", *flags, "--forget", "3"]) == 2
    assert "error: no search 3: the cache holds 2 for this model on " in capsys.readouterr().err
    assert len(cached_reports(Store(cache), lm, splits)) == 2
    with monkeypatch.context() as m:  # a folder that takes no writes: the report stays, and the CLI says so
        m.setattr(Store, "delete", lambda self, key: self._disable("cache write failed (OSError: read-only)") or False)
        assert main(["searches", *flags, "--forget", "1"]) == 2
    assert capsys.readouterr().err.strip().endswith("error: search 1 was not deleted: cache write failed (OSError: "
                                                     "read-only)")
    assert len(cached_reports(Store(cache), lm, splits)) == 2
    assert main(["searches", *flags, "--forget", "1"]) == 0  # C2I first
    out = capsys.readouterr().out
    assert out.startswith("forgot search 1: C2I · q=2, K 1, ρ 0.5, 0.1 (its 4 candidates' results stay in the cache")
    assert "1 search in the cache for this model on " in out and "| 1 | LASER | layers 1–1, all types, ρ 0.5 |" in out
    assert [r["method"] for r in cached_reports(Store(cache), lm, splits)] == ["laser"]
    assert len(cached_results(Store(cache), lm, splits)) == len(results)  # the candidates stay
    again = Store(cache)
    run_search(lm, splits, cfg, again)
    assert again.counts["eval"] == 0 and sorted(r["method"] for r in cached_reports(again, lm, splits)) == \
        ["c2i", "laser"]  # listed again, nothing evaluated


def test_a_c2i_search_from_the_cache_keeps_the_time_its_gradient_took_when_it_ran(tiny_dirs, mc_task, tmp_path):
    """The searches table's time of a C2I search counts the gradient step and SVDs behind its scores as they took when
    computed: a search that read them from the cache (as Explore does after Layer scores) keeps that time, not 0.
    Spectra cached before their seconds were kept leave it unknown, and the table says so, until the time of the same
    spectra is known."""
    from laser_core import ModelSpec, Store, TaskSpec, load_model, load_task, make_splits, run_search
    from laser_core.scores import SPECTRA_TIME, _record_spectra_time, _spectra_key, load_spectra
    from laser_core.searches import cached_reports, search_rows, time_text
    spec = TaskSpec(str(mc_task), n_calib=20, n_test=20)
    lm, splits, store = load_model(ModelSpec(str(tiny_dirs["llama"]), "cpu")), make_splits(load_task(spec), spec), \
        Store(tmp_path / "cache")
    timings, spent = {}, {}
    load_spectra(lm, splits, store, timings=timings, spent=spent)  # Layer scores' step, before any search
    assert spent == timings and spent["gradients"] > 0 and spent["svd"] > 0
    cfg = SearchConfig(q=1, ks=(1,), rhos=(0.5,))
    rep = run_search(lm, splits, cfg, store)
    assert rep.timings["gradients"] == 0.0  # this run read them
    assert rep.spectra_s == pytest.approx(spent["gradients"] + spent["svd"])  # they took this when they ran
    key = _spectra_key(store, lm, splits, (1,), "contiguous")
    older = {k: v for k, v in store.get_tensors(key).items() if k != "seconds"}  # as an earlier version cached them
    store.put_tensors(key, older)
    store.delete(_spectra_key(store, lm, splits, (1,), "contiguous", SPECTRA_TIME))  # nor was their time listed
    assert run_search(lm, splits, cfg, store).spectra_s is None
    row, = search_rows(cached_reports(store, lm, splits))
    assert row["spectra_s"] is None and row["time_s"] == pytest.approx(sum(c["seconds"] for c in rep.candidates))
    assert time_text(row) == f"{row['time_s']:.1f} (gradient + SVD not recorded)"
    # the same spectra computed again since (evicted, say): the report's row takes the time they took then
    _record_spectra_time(store, lm, splits, (1,), "contiguous", [3.0, 2.0])
    row, = search_rows(cached_reports(store, lm, splits))
    assert row["spectra_s"] == 5.0 and time_text(row).endswith("(of which gradient + SVD 5.0)")


def test_report_table_marks_only_the_changes_beyond_noise_and_reads_rows_without_them():
    from laser_core.report_table import row_line, table_markdown
    from laser_core.significance import paired_change
    base = [True] * 60 + [False] * 140
    gain = paired_change(base, [True] * 90 + [False] * 110).to_dict()  # 30 fixed, none broken
    noise = paired_change(base, [True] * 58 + [False] * 2 + [True] * 3 + [False] * 137).to_dict()  # 3 fixed, 2 broken
    settings = {"model": "demo", "device": "cpu", "seed": 0, "n_calib": 100, "n_test": 200, "q": 3, "ks": [1, 4],
                "rhos": [0.1], "quick": False, "laser_layers": "all"}
    row = {"task": "t", "n_test": 200, "base_test": 0.3, "laser_test": 0.45, "c2i_k1_test": 0.305,
           "c2i_kgrid_test": 0.305, "laser_s": 100.0, "c2i_k1_s": 10.0, "c2i_k1_speedup": 10.0, "c2i_kgrid_s": 20.0,
           "c2i_kgrid_speedup": 5.0, "laser_best": "a", "c2i_k1_best": "b", "c2i_kgrid_best": "c"}
    marked = {**row, "laser_change": gain, "c2i_k1_change": noise, "c2i_kgrid_change": noise}
    text = table_markdown({"settings": settings, "rows": [marked]})
    assert "| t | 0.300 | 0.450† | 0.305 | 0.305 |" in text
    assert row_line(marked) == "t: base 0.300, LASER 0.450†, C2I K=1 0.305, C2I K grid 0.305"  # the progress line
    assert "LASER +0.150 [" in text and "C2I K=1 +0.005 [" in text and "p < 0.001" in text
    assert "Read together, as 3 tests (Holm's correction: at most a 5% chance that any of them is called real by " \
        "chance): t LASER stays beyond noise." in text
    old = table_markdown({"settings": settings, "rows": [row]})  # a JSON saved before: no marks, no such line
    assert "| t | 0.300 | 0.450 | 0.305 | 0.305 |" in old and "†" not in old


def test_report_other_tasks_pairs_each_tasks_edit_with_every_other_tasks_base(tiny_dirs, tmp_path, capsys):
    from conftest import write_mc_jsonl
    from laser_core import ModelSpec, TaskSpec, load_model
    from laser_core.candidates import evaluate_candidate
    from laser_core.store import null_store
    one, two = (str(write_mc_jsonl(tmp_path / f"{n}.jsonl", 200, seed=i)) for i, n in enumerate(("one", "two")))
    out = tmp_path / "report.json"
    assert main(["report", "--model", str(tiny_dirs["llama"]), "--device", "cpu", "--tasks", f"{one},{two}",
                 "--quick", "--n-calib", "30", "--n-test", "30", "--other-tasks", "--json-out", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())  # written again at the end, with the table of the other tasks
    rows = {r["task"]: r for r in result["rows"]}
    assert [(t["from"], t["to"]) for t in result["transfer"]] == [(one, two), (two, one)]
    lm = load_model(ModelSpec(str(tiny_dirs["llama"]), "cpu"))
    for t in result["transfer"]:  # evaluated here again, on the other task's held-out split, against its base
        assert t["edit"] == rows[t["from"]]["c2i_kgrid_best"]
        spec = TaskSpec(t["to"], n_calib=30, n_test=30)
        doc = evaluate_candidate(lm, Edit.of(t), make_splits(load_task(spec), spec), "test", null_store())
        assert t["test"] == doc["accuracy"] and t["change"]["n"] == 30
        assert t["change"]["change"] == pytest.approx(doc["accuracy"] - rows[t["to"]]["base_test"])
    assert f"| edit found on | {one} | {two} |\n|---|---|---|" in text
    own, other = rows[one]["c2i_kgrid_change"], result["transfer"][0]["change"]
    assert (f"| {one} ({rows[one]['c2i_kgrid_best']}) | {own['change']:+.3f}" + "†" * own["significant"] + " own | "
            f"{other['change']:+.3f}" + "†" * other["significant"] + " |") in text
    assert "Read together, as 2 tests (Holm's correction" in text.split("| edit found on |")[1]


def test_an_edit_several_searches_chose_is_evaluated_once_per_task_and_tested_once(monkeypatch):
    from types import SimpleNamespace

    from laser_core import report
    from laser_core.report import transfer_rows
    from laser_core.report_table import transfer_markdown
    from laser_core.significance import paired_change

    def search_of(name, layer):  # a search report whose best edit is ``name`` (a down matrix), K=1, rho=0.5
        return SimpleNamespace(best_edit=lambda: Edit(name, 1, 0.5), best={"layer": layer, "type": "down", "k": 1,
                                                                            "rho": 0.5})
    base = {"accuracy": 0.5, "correct": [True] * 10 + [False] * 10}
    finals = [("a", "splits a", base, search_of("m", 1)), ("b", "splits b", base, search_of("m", 1)),
              ("c", "splits c", base, search_of("other", 2))]
    runs = []
    monkeypatch.setattr(report, "held_out_result", lambda lm, splits, rep: runs.append((splits, rep.best_edit().name))
                        or {"accuracy": 0.6, "correct": [True] * 12 + [False] * 8})
    rows = transfer_rows(None, finals)
    assert [(r["from"], r["to"]) for r in rows] == [("a", "b"), ("a", "c"), ("b", "a"), ("b", "c"), ("c", "a"),
                                                    ("c", "b")]
    assert sorted(runs) == sorted([("splits b", "m"), ("splits c", "m"), ("splits a", "m"), ("splits a", "other"),
                                   ("splits b", "other")])  # "m" on c once, though a's and b's searches chose it
    change = paired_change(base["correct"], [True] * 12 + [False] * 8).to_dict()
    table = {"rows": [{"task": t, "c2i_kgrid_best": "L1.down K=1 rho=0.5", "c2i_kgrid_change": change} for t in "abc"],
             "transfer": rows}
    assert "Read together, as 5 tests" in "\n".join(transfer_markdown(table))  # (m, c) once, not twice


def test_quick_report_caps_laser_validation_and_scales_its_time_back(tiny_dirs, tmp_path, monkeypatch):
    from laser_core import ModelSpec, report
    from laser_core.report import paper_table
    from conftest import write_mc_jsonl
    sweeps, real = [], report.laser_baseline
    monkeypatch.setattr(report, "laser_baseline", lambda *a, **kw: sweeps.append(real(*a, **kw)) or sweeps[-1])
    task = write_mc_jsonl(tmp_path / "even.jsonl", 1250)  # 20% validation = 250 examples, over the quick cap of 200
    row = paper_table(ModelSpec(str(tiny_dirs["llama"]), "cpu"), [str(task)], quick=True, n_calib=30, n_test=30)["rows"][0]
    assert (row["n_val"], row["n_val_full"], row["n_calib"], row["n_test"]) == (200, 250, 30, 30)
    assert sweeps[0].report.candidates[0]["n"] == 200
    assert row["laser_s"] == pytest.approx(sweeps[0].seconds * 250 / 200)  # scaled back to the full split


def test_report_reads_every_task_before_loading_the_model_or_running_any(tmp_path, monkeypatch, capsys):
    import laser_core.models as models
    loads = []
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: loads.append(a) or pytest.fail("model loaded"))
    assert main(["report", "--model", str(tmp_path / "m"), "--tasks", "fever,nope", "--quick"]) == 2
    assert "error: task not found: 'nope' is not a bundled task" in capsys.readouterr().err
    assert main(["report", "--model", str(tmp_path / "m"), "--tasks", ","]) == 2
    assert "error: no task given: name at least one, e.g. fever" in capsys.readouterr().err
    assert not loads


def test_apply_says_where_it_cannot_save_before_loading_and_leaves_nothing_when_a_write_fails(tiny_lm, tmp_path,
                                                                                            monkeypatch):
    import laser_core.recipe as recipe_mod
    lm = tiny_lm("llama")
    recipe = recipe_mod.make_recipe(lm, [Edit("model.layers.1.mlp.up_proj.weight", 1, 0.5)])
    (tmp_path / "a-file").write_text("")
    loads = []
    monkeypatch.setattr(recipe_mod, "load_model", lambda *a, **kw: loads.append(a) or lm)
    with pytest.raises(ConfigError, match=f"cannot save to {tmp_path}/a-file/edited: {tmp_path}/a-file is a file"):
        apply_recipe(recipe, tmp_path / "a-file" / "edited", check=False)
    assert not loads  # refused before the model load

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    before = weight_hashes(lm.model)
    monkeypatch.setattr(lm.model, "save_pretrained", full_disk)
    with pytest.raises(ConfigError, match=f"could not save the edited model to {tmp_path}/out \\(nothing was left "
                                          "there\\): No space left on device"):
        with edited(lm, recipe_mod.recipe_edits(recipe)):
            save_model_atomic(lm, tmp_path / "out", recipe)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and weight_hashes(lm.model) == before
