"""Row groupings of a multi-subspace reduction: contiguous blocks (the paper's) and clustered rows."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from laser_core import ConfigError, Edit, SearchConfig, TaskSpec, load_task, make_splits
from laser_core.candidates import edits_key, result_key
from laser_core.cli import main
from laser_core.config import to_dict
from laser_core.grouping import block_sizes, row_order
from laser_core.recipe import load_recipe
from laser_core.reduction import block_ranks, block_svd, block_truncate


def _lines(rows: int, cols: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix whose rows lie, up to a little noise, on ``k`` lines through 0 (each row a multiple of one of ``k``
    directions, of either sign), shuffled; and the line of each row."""
    g = torch.Generator().manual_seed(seed)
    line = (torch.arange(rows) % k)[torch.randperm(rows, generator=g)]
    directions = torch.randn(k, cols, generator=g)
    w = torch.randn(rows, 1, generator=g) * directions[line] + 1e-3 * torch.randn(rows, cols, generator=g)
    return w, line


def _relative_error(w: torch.Tensor, reduced: torch.Tensor) -> float:
    return float((w - reduced).norm() / w.norm())


def test_clustered_blocks_find_rows_on_k_lines_that_contiguous_blocks_mix():
    w, line = _lines(64, 24, 4)
    order = row_order(w, 4, "clustered")
    blocks = [order[a:a + n] for a, n in zip([0, 16, 32, 48], block_sizes(64, 4))]
    assert [len(set(line[b].tolist())) for b in blocks] == [1, 1, 1, 1]  # one line per block
    rank1 = 1 / 16  # rho keeping rank 1 of each 16 x 24 block
    assert block_ranks((64, 24), 4, rank1) == [1, 1, 1, 1]
    assert _relative_error(w, block_truncate(block_svd(w, 4, "clustered"), rank1)) < 1e-2
    assert _relative_error(w, block_truncate(block_svd(w, 4), rank1)) > 0.3


def test_clustered_blocks_are_a_deterministic_permutation_with_the_contiguous_sizes():
    torch.manual_seed(3)
    w = torch.randn(37, 12)
    for k in (2, 5, 37):
        order = row_order(w, k, "clustered")
        assert sorted(order.tolist()) == list(range(37))
        assert torch.equal(order, row_order(w.clone(), k, "clustered"))
        f = block_svd(w, k, "clustered")
        assert [len(s) for s in f.S] == [min(n, 12) for n in block_sizes(37, k)]
        torch.testing.assert_close(block_truncate(f, 1.0), w, atol=1e-5, rtol=1e-5)  # rho = 1 keeps every row
        reduced = block_truncate(f, 0.3)
        for (a, b), r in zip(zip([0, *torch.tensor(block_sizes(37, k)).cumsum(0).tolist()[:-1]],
                                 torch.tensor(block_sizes(37, k)).cumsum(0).tolist()), block_ranks((37, 12), k, 0.3)):
            rows = order[a:b]  # each block of grouped rows keeps its own best rank-r approximation
            u, s, vh = torch.linalg.svd(w[rows], full_matrices=False)
            torch.testing.assert_close(reduced[rows], (u[:, :r] * s[:r]) @ vh[:r], atol=1e-5, rtol=1e-5)
    assert row_order(w, 1, "clustered") is None and row_order(w, 4) is None


def test_a_contiguous_edit_keeps_its_cache_key_and_k1_is_one_edit_under_any_grouping(tiny_lm, mc_task, store):
    name = "model.layers.1.mlp.up_proj.weight"
    assert to_dict(Edit(name, 2, 0.5)) == {"name": name, "k": 2, "rho": 0.5}  # as every cached result was keyed
    assert to_dict(Edit(name, 2, 0.5, "clustered"))["grouping"] == "clustered"
    assert Edit(name, 1, 0.5, "clustered") == Edit(name, 1, 0.5)
    assert Edit.of({"name": name, "k": 2, "rho": 0.5, "grouping": "clustered"}) == Edit(name, 2, 0.5, "clustered")
    lm = tiny_lm("llama")
    ts = TaskSpec(str(mc_task), n_calib=20, n_test=20)
    splits = make_splits(load_task(ts), ts)
    keys = {result_key(store, lm, splits, "calib", e) for e in (Edit(name, 2, 0.5), Edit(name, 2, 0.5, "clustered"))}
    assert len(keys) == 2
    other = Edit("model.layers.0.mlp.up_proj.weight", 2, 0.5)
    assert edits_key(store, lm, splits, "calib", [Edit(name, 2, 0.5), other]) != \
        edits_key(store, lm, splits, "calib", [Edit(name, 2, 0.5, "clustered"), other])
    with pytest.raises(ConfigError, match="unknown row grouping 'kmeans'; known groupings: contiguous, clustered"):
        Edit(name, 2, 0.5, "kmeans")
    with pytest.raises(ConfigError, match="LASER sweep reduces whole matrices"):
        SearchConfig("laser", ks=(1,), grouping="clustered")
    assert SearchConfig(ks=(1,), grouping="clustered") == SearchConfig(ks=(1,))


def test_a_clustered_search_writes_its_own_recipe_that_apply_and_eval_reproduce(tiny_dirs, mc_task, tmp_path, capsys):
    args = ["--model", str(tiny_dirs["llama"]), "--device", "cpu", "--task", str(mc_task), "--n-calib", "20",
            "--n-test", "20", "--cache-dir", str(tmp_path / "c")]
    grid = ["--q", "1", "--ks", "4", "--rhos", "0.25"]
    assert main(["search", *args, *grid, "--grouping", "clustered"]) == 0
    out = capsys.readouterr().out
    assert "K=4 rho=0.25 (clustered rows) ranks=" in out
    path = next((tmp_path / "c" / "recipes").glob("*-c2i-clustered-*.json"))
    recipe = json.loads(path.read_text())
    (edit,) = recipe["edits"]
    assert edit["grouping"] == "clustered" and edit["k"] == 4
    assert recipe["laser_lab_recipe"] == 2  # a LASER Lab from before groupings refuses it, not reduce other blocks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("laser_core.recipe.RECIPE_VERSION", 1)
        with pytest.raises(ConfigError, match="written by a newer LASER Lab"):
            load_recipe(path)
    assert main(["search", *args, *grid]) == 0  # contiguous: its own candidates and recipe, beside the clustered one
    plain = capsys.readouterr().out
    assert "candidates from cache 0/1" in plain and "(clustered rows)" not in plain
    recipes = sorted((tmp_path / "c" / "recipes").glob("*.json"))
    assert len(recipes) == 2 and [json.loads(r.read_text())["laser_lab_recipe"] for r in recipes] == [1, 2]
    assert main(["search", *args, *grid, "--grouping", "clustered"]) == 0
    assert "candidates from cache 1/1" in capsys.readouterr().out
    assert main(["apply", "--recipe", str(path), "--out", str(tmp_path / "m")]) == 0
    assert "OK" in capsys.readouterr().out
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"]).named_parameters())[edit["name"]].detach()
    saved = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "m").named_parameters())[edit["name"]].detach()
    torch.testing.assert_close(saved, block_truncate(block_svd(base, 4, "clustered"), 0.25))
    assert main(["eval", *args, "--recipe", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"test: accuracy {recipe['metrics']['edited_test']['accuracy']:.3f}")
    with pytest.raises(SystemExit) as exit_:
        main(["search", *args, *grid, "--grouping", "kmeans"])
    assert exit_.value.code == 2
    assert "invalid choice: 'kmeans'" in capsys.readouterr().err


def test_apply_reduces_the_recorded_blocks_and_eval_refuses_blocks_grouped_otherwise_here(tiny_lm, tmp_path, caplog):
    from laser_core.recipe import apply_recipe, check_recipe_fits, make_recipe
    from laser_core.saving import save_recipe
    lm = tiny_lm("llama")
    name = "model.layers.1.mlp.up_proj.weight"
    base = lm.model.get_parameter(name).detach().clone()
    recipe = make_recipe(lm, [Edit(name, 4, 0.25, "clustered")])
    here = row_order(base, 4, "clustered")
    assert recipe["edits"][0]["row_order"] == here.tolist()
    line = next(t for t in save_recipe(recipe, tmp_path / "r.json").read_text().splitlines() if "row_order" in t)
    assert json.loads("{" + line.rstrip(",") + "}")["row_order"] == here.tolist()  # one line, not one row per line
    assert check_recipe_fits(lm, recipe) == [Edit(name, 4, 0.25, "clustered")]

    n = len(here) // 4  # another device rounding a tie otherwise: the first row of block 0 and of block 1 swapped
    other = here.clone()
    other[0], other[n] = here[n], here[0]
    moved = json.loads(json.dumps(recipe))
    moved["edits"][0]["row_order"] = other.tolist()
    with pytest.raises(ConfigError, match=f"clustered blocks of {name} are not those this machine groups"):
        check_recipe_fits(lm, moved)
    apply_recipe(moved, tmp_path / "m", check=False)
    saved = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "m").named_parameters())[name].detach().to(base.device)
    torch.testing.assert_close(saved, block_truncate(block_svd(base, 4, "clustered", rows=other), 0.25))
    assert (saved - block_truncate(block_svd(base, 4, "clustered"), 0.25)).abs().max() > 1e-3
    del moved["edits"][0]["row_order"]  # a recipe from before row orders were recorded: clustered here, and said so
    apply_recipe(moved, tmp_path / "old", check=False)
    saved = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "old").named_parameters())[name].detach().to(base.device)
    torch.testing.assert_close(saved, block_truncate(block_svd(base, 4, "clustered"), 0.25))
    assert f"the recipe records no row order for {name}" in caplog.text

    for order, why in (([0] * len(here), "list each of the matrix's"), (list(range(len(here) - 1)), f"{len(here)} rows"),
                       ("0 1 2", "list of row numbers")):
        moved["edits"][0]["row_order"] = order
        with pytest.raises(ConfigError, match=why):
            save_recipe(moved, tmp_path / "bad.json")
            load_recipe(tmp_path / "bad.json")
            check_recipe_fits(lm, moved)
    moved["edits"][0].update(row_order=here.tolist(), grouping="contiguous")
    with pytest.raises(ConfigError, match="gives a row order, but its K=4 blocks are contiguous"):
        check_recipe_fits(lm, moved)


def test_a_recipe_records_the_blocks_a_search_reduced_without_waiting_for_the_model_a_job_is_editing(tiny_lm, store):
    import threading

    from laser_core.reduction import edit_row_order, get_factors
    lm = tiny_lm("llama")
    name = "model.layers.0.mlp.down_proj.weight"
    f = get_factors(lm, name, 2, store, grouping="clustered")  # as a search's candidate reads them
    held, done, got = threading.Event(), threading.Event(), []

    def job():  # a background evaluation holding the model (its weights edited) until the recipe is made
        with lm.lock:
            held.set()
            done.wait(10)
    threading.Thread(target=job, daemon=True).start()
    held.wait(5)
    maker = threading.Thread(target=lambda: got.append(edit_row_order(lm, Edit(name, 2, 0.5, "clustered"))))
    maker.start()
    maker.join(5)
    done.set()
    assert got == [f.rows.tolist()]  # before the job let the model go
