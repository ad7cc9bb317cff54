"""Bad input, faults and concurrency: one clear message, nothing half-written, weights bit-exact."""
from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from laser_core import (CancelToken, ConfigError, Edit, JobBusy, ModelLoadError, ModelSpec, NumericsError,
                        SearchConfig, Store, TaskSpec, edited, load_model, load_task, make_splits, run_search)
from laser_core.models import weight_hashes
from laser_core.store import _MAGIC_JSON

from conftest import write_mc_jsonl

SMALL = SearchConfig(q=2, ks=(1, 2), rhos=(0.5, 0.1))


def _splits(path, n_calib=20, n_test=20):
    ts = TaskSpec(str(path), n_calib=n_calib, n_test=n_test)
    return make_splits(load_task(ts), ts)


# ---- models

def test_a_non_language_model_is_refused_by_name(tmp_path):
    from transformers import ViTConfig, ViTModel
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=8, patch_size=4)).save_pretrained(tmp_path / "vit")
    with pytest.raises(ModelLoadError, match="not a language model"):
        load_model(ModelSpec(str(tmp_path / "vit"), "cpu"))


def test_corrupt_safetensors_and_gguf_files_are_reported(tiny_dirs, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dirs["llama"], bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelLoadError, match="could not load the weights"):
        load_model(ModelSpec(str(bad), "cpu"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="cannot read the GGUF file"):
        load_model(ModelSpec(str(gguf), "cpu"))


def test_a_model_folder_without_its_tokenizer_is_reported_as_such(tiny_dirs, tmp_path):
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dirs["llama"], bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    with pytest.raises(ModelLoadError) as err:
        load_model(ModelSpec(str(bare), "cpu"))
    said = str(err.value)
    assert said.startswith(f"could not load the tokenizer of {bare} (a model folder needs its tokenizer files, "
                           "e.g. tokenizer.json): ") and "\n" not in said  # one line, not "not a language model"


def test_a_device_this_machine_lacks_is_named(monkeypatch):
    from laser_core.models import resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    for device, said in (("gpu", "unknown device 'gpu'"), ("meta", "unknown device 'meta'"),
                         ("mps", r"no Apple GPU \(MPS\) is available")):
        if device == "mps" and torch.backends.mps.is_available():
            continue
        with pytest.raises(ModelLoadError, match=said):
            resolve_device(device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="device 'cuda:0' asked for, but no CUDA GPU is available"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ModelLoadError, match=r"device 'cuda:7' asked for, but this machine has 1 CUDA GPU\(s\): "
                                             "cuda:0 to cuda:0"):
        resolve_device("cuda:7")


# ---- tasks

def test_duplicate_examples_never_land_in_two_splits(tmp_path):
    rows = [{"prompt": f"Is {i % 30} even? Answer:", "choices": ["yes", "no"], "answer": i % 2} for i in range(90)]
    p = tmp_path / "dups.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    s = _splits(p, n_calib=10, n_test=10)
    prompts = [[s.task.examples[i].prompt for i in part] for part in (s.calib, s.val, s.test)]
    flat = [x for part in prompts for x in part]
    assert len(flat) == len(set(flat)) == 26  # 30 distinct prompts: 10 + 10 test/calib, val 6 (20%)


def test_dropped_duplicates_are_said_once_per_split_asked_to_warn(tmp_path, caplog):
    from laser_core import make_splits

    rows = [{"prompt": f"Is {i % 30} even? Answer:", "choices": ["yes", "no"], "answer": i % 2} for i in range(90)]
    p = tmp_path / "dups.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    spec = TaskSpec(str(p), n_calib=10, n_test=10)
    task = load_task(spec)
    with caplog.at_level("WARNING", logger="laser_core.tasks"):
        first = make_splits(task, spec)
        again = make_splits(task, spec, warn=False)  # the report re-splits with LASER's validation capped
    assert [r.getMessage() for r in caplog.records] == ["task dups: 60 duplicate examples dropped before splitting"]
    assert again == first


def test_a_task_too_small_for_the_sizes_asked_says_what_it_cut(tmp_path, caplog):
    from laser_core import make_splits

    spec = TaskSpec(str(write_mc_jsonl(tmp_path / "small.jsonl", 200)), n_calib=20, n_test=20, n_val=1000)
    with caplog.at_level("WARNING", logger="laser_core.tasks"):
        s = make_splits(load_task(spec), spec)
    assert (len(s.calib), len(s.val), len(s.test)) == (20, 179, 1)
    assert [r.getMessage() for r in caplog.records] == [
        "task small has 200 distinct examples: calibration 20, validation 179 (1000 asked), held-out test 1 (20 asked)"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="laser_core.tasks"):
        make_splits(load_task(spec), TaskSpec(spec.source, n_calib=20, n_test=20))  # 20% validation: all fits
    assert not caplog.records


def test_malformed_csv_row_names_its_line(tmp_path):
    p = tmp_path / "t.csv"
    from laser_core import TaskFormatError
    p.write_text('prompt,choices,answer\n"a","x|y",0\n"b","x|y",0,extra\n')
    with pytest.raises(TaskFormatError, match="line 3 has 4 fields but the header has 3"):
        load_task(TaskSpec(str(p)))
    p.write_text('prompt,choices,answer\n"a","x|y"\n')
    with pytest.raises(TaskFormatError, match="line 2 has 2 fields but the header has 3"):
        load_task(TaskSpec(str(p)))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_task_files_with_a_byte_order_mark_load_and_non_utf8_ones_are_named(tmp_path, suffix):
    from laser_core import TaskFormatError
    rows = [{"prompt": f"Is {i} even? Answer:", "choices": ["yes", "no"], "answer": i % 2} for i in range(6)]
    text = {".csv": "prompt,choices,answer\n" + "".join(f'"{r["prompt"]}","yes|no",{r["answer"]}\n' for r in rows),
            ".jsonl": "".join(json.dumps(r) + "\n" for r in rows),
            ".json": json.dumps({"examples": [{"input": r["prompt"], "target_scores": {"yes": 1 - r["answer"],
                                                                                     "no": r["answer"]}} for r in rows]})}[suffix]
    p = tmp_path / f"t{suffix}"
    p.write_bytes(b"\xef\xbb\xbf" + text.encode())  # as a spreadsheet's "CSV UTF-8" export writes it
    task = load_task(TaskSpec(str(p)))
    assert len(task) == 6 and "Is 0 even? Answer:" in task.examples[0].prompt
    p.write_bytes(text.replace("Is 3", "Is \xe9").encode("latin-1"))
    with pytest.raises(TaskFormatError, match=rf"t\{suffix} is not UTF-8 text \(byte 0xe9 at offset \d+\); save it as UTF-8"):
        load_task(TaskSpec(str(p)))


def test_a_recipe_that_is_not_utf8_or_has_a_text_version_is_refused_by_name(tmp_path):
    from laser_core.recipe import load_recipe
    p = tmp_path / "r.json"
    p.write_bytes(b'{"laser_lab_recipe": 1, "note": "\xe9"}')
    with pytest.raises(ConfigError, match=r"r\.json is not UTF-8 text \(byte 0xe9"):
        load_recipe(p)
    p.write_text('{"laser_lab_recipe": "1", "edits": []}')
    with pytest.raises(ConfigError, match="the recipe version must be a whole number, got '1'"):
        load_recipe(p)


@pytest.mark.parametrize("model", [None, {"fingerprint": "0" * 16}, "demo"])
def test_a_recipe_that_names_no_model_is_refused_by_name_also_by_apply(tmp_path, capsys, model):
    from laser_core.cli import main
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"laser_lab_recipe": 1, "edits": [{"name": "m.layers.0.w", "k": 1, "rho": 0.5}],
                             **({"model": model} if model else {})}))
    assert main(["apply", "--recipe", str(p), "--out", str(tmp_path / "out")]) == 2  # was a KeyError's traceback
    assert capsys.readouterr().err.strip() == (f"error: {p} names no model: it needs a 'model' with the 'source' its "
                                               "edits were found on")
    assert not (tmp_path / "out").exists()


# ---- settings and numerics

@pytest.mark.parametrize("kwargs,match", [({"q": 0}, "q \\(matrices to try\\) must be >= 1, got 0"),
                                          ({"ks": ()}, "the K grid is empty"),
                                          ({"rhos": ()}, "the rho grid is empty"),
                                          ({"ks": (0,)}, "positive integer, got 0")])
def test_bad_search_settings_name_the_bad_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SearchConfig(**kwargs)


def test_a_value_repeated_in_a_grid_is_searched_once():
    from laser_core.config import to_dict
    cfg = SearchConfig(ks=(1, 4, 1), rhos=(0.5, 0.1, 0.5))
    assert (cfg.ks, cfg.rhos) == ((1, 4), (0.5, 0.1))
    assert cfg == SearchConfig(ks=(1, 4), rhos=(0.5, 0.1))  # the same cache keys
    cfg = SearchConfig("laser", ks=(1,), layers=(3, 2, 3), types=("up", "down", "up"))
    assert (cfg.layers, cfg.types) == ((2, 3), ("down", "up"))  # in any order, one sweep: one configuration
    assert to_dict(cfg) == to_dict(SearchConfig("laser", ks=(1,), layers=(2, 3), types=("down", "up")))


@pytest.mark.parametrize("cmd,flag,value,said", [
    ("search", "--ks", "1,x", "argument --ks: 'x' is not a whole number"),
    ("search", "--rhos", "0.5,b", "argument --rhos: '0.5,b' is not a list of numbers"),
    ("scores", "--top", "0", "argument --top: '0' is not a whole number >= 1")])
def test_cli_names_a_setting_that_is_not_a_number_it_takes(cmd, flag, value, said, capsys):
    from laser_core.cli import main
    with pytest.raises(SystemExit) as stop:
        main([cmd, "--model", "demo", "--task", "fever", flag, value])
    assert stop.value.code == 2 and said in capsys.readouterr().err


def test_cli_eval_reads_the_recipe_before_loading_the_model(tmp_path, capsys):
    from laser_core.cli import main
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"laser_lab_recipe": 1, "edits": [{"name": "m.layers.0.w", "k": 1, "rho": 2}]}))
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--task", "fever", "--recipe", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == "error: rho must be in (0, 1], got 2.0"  # not "model not found"


@pytest.mark.parametrize("cmd,flag", [("search", "--recipe-out"), ("laser", "--recipe-out"), ("report", "--json-out")])
def test_cli_refuses_an_output_file_it_could_not_write_before_the_run(cmd, flag, tmp_path, capsys):
    # these files are written at the end of a run (a report's after its first task): a bad path used to
    # end minutes or hours of work in a traceback
    from laser_core.cli import main
    (tmp_path / "a file").write_text("x")
    model = ["--model", str(tmp_path / "no-model")]  # never reached: the path is refused first
    cases = [(tmp_path, "it is a folder; give a file name"), (tmp_path / "a file" / "r.json", "a file is a file, not a folder")]
    if Path("/proc").is_dir():  # no file can be made there, though os.access says yes to root
        cases.append((Path("/proc/laser-lab/r.json"), "/proc is not writable; choose another folder"))
    for path, said in cases:
        assert main([cmd, *model, flag, str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: cannot save to {path}") and "model not found" not in err, err
        assert err.endswith(said), err


def test_ctrl_c_outside_a_search_ends_the_cli_with_one_line_not_a_traceback(monkeypatch, capsys):
    from laser_core import cli

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_setup", interrupted)  # Ctrl-C while the model loads
    assert cli.main(["eval", "--model", "demo", "--task", "fever"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted: stopped here; no partial model or recipe was written"


def test_a_recipe_that_cannot_be_written_is_one_error_line_and_no_temp_file(tmp_path, monkeypatch):
    from laser_core.saving import save_recipe

    def full_disk(self, *a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(type(tmp_path), "write_text", full_disk)
    with pytest.raises(ConfigError, match="could not write the recipe to .*r.json: No space left on device"):
        save_recipe({"laser_lab_recipe": 1}, tmp_path / "r.json")
    assert list(tmp_path.iterdir()) == []


def test_k_larger_than_some_chosen_matrices_is_left_out_for_those_and_listed(tiny_lm, mc_task):
    lm = tiny_lm("llama")
    report = run_search(lm, _splits(mc_task), SearchConfig(q=14, ks=(1, 32), rhos=(0.5,)), None)
    small = {r.name for r in lm.matrices if r.shape[0] < 32}
    assert small and small == {r.name for r in lm.matrices if r.type in ("k", "v")}  # 16 rows each
    tried = {(c["name"], c["k"]) for c in report.candidates}
    assert tried == {(r.name, k) for r in lm.matrices for k in (1, 32) if (r.name not in small or k == 1)}
    assert sorted((s["name"], s["k"]) for s in report.skipped) == sorted((n, 32) for n in small)
    assert all(s["error"] == "K=32 is larger than its 16 rows: not tried (K <= 16 fits it)" and s["rho"] is None
               for s in report.skipped)
    assert report.status == "complete" and report.best_test is not None


def test_a_k_grid_that_fits_no_chosen_matrix_is_refused_by_name(tiny_lm, mc_task):
    from laser_core.scores import c2i_plan, load_spectra, score_table
    from laser_core.store import null_store

    lm, splits = tiny_lm("llama"), _splits(mc_task)
    cfg = SearchConfig(q=2, ks=(32,), rhos=(0.5,))
    spectra, _ = load_spectra(lm, splits, null_store(), (1,))
    table = score_table(lm, spectra, cfg.score, cfg)
    for row in table:  # the k and v matrices of layer 0 (16 rows each) come first
        row["score"] = 1.0 if row["layer"] == 0 and row["type"] in ("k", "v") else 0.0
    with pytest.raises(ConfigError) as e:
        c2i_plan(lm, cfg, spectra, table)
    assert str(e.value) in [f"no K of the grid (32) fits the chosen matrices, each has fewer rows (16 rows: "
                            f"model.layers.0.self_attn.{a}_proj.weight, model.layers.0.self_attn.{b}_proj.weight); "
                            "add a K of at most 16, which fits them all (K=1 fits every matrix)" for a, b in ("kv", "vk")]


def test_k_larger_than_every_matrix_is_refused_before_the_gradient_step(tiny_lm, mc_task):
    events = []
    with pytest.raises(ConfigError, match=r"K=4096 is larger than the rows of every matrix of this model \(at most 64\)"):
        run_search(tiny_lm("llama"), _splits(mc_task), SearchConfig(q=1, ks=(1, 4096), rhos=(0.5,)), None,
                   progress=events.append)
    assert events == []


def test_nan_gradient_matrix_is_skipped_and_reported(tiny_lm, mc_task, monkeypatch):
    import laser_core.scores as scores
    real = scores.calibration_gradients
    poisoned = "model.layers.0.mlp.up_proj.weight"

    def fake(lm, examples, cancel=None, progress=None):
        grads, loss = real(lm, examples, cancel, progress)
        grads[poisoned] = grads[poisoned] * float("nan")
        return grads, loss
    monkeypatch.setattr(scores, "calibration_gradients", fake)
    report = run_search(tiny_lm("llama"), _splits(mc_task), SearchConfig(q=13, ks=(1,), rhos=(0.5,)), None)
    assert poisoned not in {c["name"] for c in report.candidates}
    assert any(s["name"] == poisoned and "NaN" in s["error"] for s in report.skipped)


def test_candidate_that_produces_nan_is_skipped_not_a_crash(tiny_lm, mc_task, monkeypatch):
    import laser_core.reduction as reduction
    real = reduction.block_truncate
    monkeypatch.setattr(reduction, "block_truncate",
                        lambda f, rho: real(f, rho) * (float("inf") if rho == 0.1 else 1.0))
    lm = tiny_lm("llama")
    before = weight_hashes(lm.model)
    report = run_search(lm, _splits(mc_task), SMALL, None)
    assert len(report.candidates) == 4 and len(report.skipped) == 4
    assert all(s["rho"] == 0.1 and "NaN or infinite" in s["error"] for s in report.skipped)
    assert weight_hashes(lm.model) == before


def test_a_candidate_that_broke_the_numerics_is_cached_and_skipped_again_without_a_model_run(tiny_lm, mc_task, store,
                                                                                              monkeypatch):
    """Before, only edits applied together cached their overflow: a search met each failed candidate afresh."""
    import laser_core.candidates as candidates
    import laser_core.reduction as reduction
    from laser_core.candidates import cached_results
    from laser_core.estimate import estimate_search
    real = reduction.block_truncate
    monkeypatch.setattr(reduction, "block_truncate",
                        lambda f, rho: real(f, rho) * (float("inf") if rho == 0.1 else 1.0))
    lm, splits = tiny_lm("llama"), _splits(mc_task)
    first = run_search(lm, splits, SMALL, store)
    assert len(first.skipped) == 4 and len(first.candidates) == 4
    runs = []
    real_eval = candidates.evaluate_split
    monkeypatch.setattr(candidates, "evaluate_split", lambda *a, **kw: runs.append(kw) or real_eval(*a, **kw))
    again = run_search(lm, splits, SMALL, store)
    assert runs == []  # every candidate, the failed ones included, came from the cache
    assert [(s["name"], s["k"], s["rho"], s["error"]) for s in again.skipped] == \
        [(s["name"], s["k"], s["rho"], s["error"]) for s in first.skipped]
    with pytest.raises(NumericsError, match="NaN or infinite"):
        candidates.evaluate_candidate(lm, Edit(first.skipped[0]["name"], first.skipped[0]["k"], 0.1), splits, "calib",
                                      store)
    listed = cached_results(store, lm, splits)
    assert all("accuracy" in d for d in listed) and not any(d.get("rho") == 0.1 for d in listed)
    assert len([d for d in cached_results(store, lm, splits, failed=True) if d.get("error")]) == 4
    est = estimate_search(lm, splits, SMALL, store)
    assert est.to_run == 0 and est.cached + est.same_ranks == est.candidates  # failed ones are not counted as to run


def test_cli_search_lists_what_it_left_out_and_fails_clearly_when_nothing_finished(tiny_dirs, mc_task, tmp_path,
                                                                                   capsys, monkeypatch):
    from laser_core.cli import main
    args = ["search", "--model", str(tiny_dirs["llama"]), "--device", "cpu", "--task", str(mc_task), "--n-calib", "20",
            "--n-test", "20", "--no-cache", "--q", "14", "--rhos", "0.5", "--recipe-out", str(tmp_path / "r.json")]
    assert main([*args, "--ks", "1,32"]) == 0
    out = capsys.readouterr().out.splitlines()
    left = [line for line in out if line.startswith("skipped: ")]
    assert sorted(left) == sorted(f"skipped: model.layers.{i}.self_attn.{m}_proj.weight K=32: K=32 is larger than "
                                  f"its 16 rows: not tried (K <= 16 fits it)" for i in (0, 1) for m in "kv")
    assert any(line.startswith("chosen edit: model.layers.") for line in out)
    import laser_core.reduction as reduction
    real = reduction.block_truncate
    monkeypatch.setattr(reduction, "block_truncate", lambda f, rho: real(f, rho) * float("inf"))
    assert main([*args, "--q", "1", "--ks", "1", "--recipe-out", str(tmp_path / "none.json")]) == 1
    captured = capsys.readouterr()
    assert "skipped: model.layers." in captured.out and "rho=0.5: " in captured.out
    assert "no candidate finished (each was skipped, see above): no edit to export" in captured.err
    assert not (tmp_path / "none.json").exists()


def test_nan_calibration_loss_is_reported_clearly(tiny_lm, mc_task):
    lm = tiny_lm("llama")
    with torch.no_grad():
        lm.model.model.norm.weight.fill_(float("nan"))
    from laser_core.gradients import calibration_gradients
    with pytest.raises(NumericsError, match="calibration loss is NaN or infinite"):
        calibration_gradients(lm, _splits(mc_task).examples("calib"))
    assert all(not p.requires_grad and p.grad is None for p in lm.model.parameters())


# ---- faults

def test_cancel_during_gradient_computation_restores_everything(tiny_lm, mc_task, store):
    lm = tiny_lm("llama")
    before = weight_hashes(lm.model)
    token = CancelToken()

    def progress(ev):
        if ev.get("phase") == "gradients":
            token.cancel()
    report = run_search(lm, _splits(mc_task), SMALL, store, progress=progress, cancel=token)
    assert report.status == "partial" and report.candidates == []
    assert weight_hashes(lm.model) == before
    assert all(not p.requires_grad and p.grad is None for p in lm.model.parameters())


def test_overwrite_replaces_only_a_model_laser_lab_saved_and_never_the_model_being_edited(tiny_dirs, tmp_path):
    import shutil

    from conftest import TEST_DEVICE
    from laser_core import load_model
    from laser_core.recipe import make_recipe
    from laser_core.saving import save_model_atomic
    models = tmp_path / "models"
    lm = load_model(ModelSpec(str(shutil.copytree(tiny_dirs["llama"], models / "llama")), device=TEST_DEVICE))
    recipe = make_recipe(lm, [Edit(lm.matrices[0].name, 1, 0.5)])
    before = sorted(p.name for p in (models / "llama").iterdir())
    for out in (models / "llama", models):  # the model's own folder, or one that holds it: the original would go
        with pytest.raises(ConfigError, match="holds the model being edited"):
            save_model_atomic(lm, out, recipe, overwrite=True)
    assert sorted(p.name for p in (models / "llama").iterdir()) == before
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match="is not a model folder saved by LASER Lab .*overwrite leaves it as it is"):
        save_model_atomic(lm, notes, recipe, overwrite=True)
    assert (notes / "thesis.tex").read_text() == "years of work"
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "empty"):  # an empty folder, then the model saved there before
        save_model_atomic(lm, out, recipe, overwrite=True)
        assert (out / "laser_recipe.json").is_file()


def test_a_demo_conversion_finishing_second_keeps_the_first_ones_folder(tmp_path):
    # the dashboard and the CLI started together on a fresh machine both convert the demo model: the one that
    # finished second used to delete the first one's folder, which the first may have been loading from
    from laser_core.demo import _install

    def converted(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(name)
        (d / "model.safetensors").write_text(name)
        return d

    target = tmp_path / "demo"
    _install(converted("first"), target)
    _install(converted("second"), target)
    assert (target / "config.json").read_text() == "first" and (tmp_path / "second").exists()
    (target / "model.safetensors").unlink()  # an interrupted copy is replaced
    _install(converted("third"), target)
    assert (target / "config.json").read_text() == "third" and not (tmp_path / "third").exists()


def test_interrupted_save_leaves_no_half_model_and_no_temp_files(tiny_lm, tmp_path, monkeypatch):
    from laser_core.recipe import make_recipe
    from laser_core.saving import save_model_atomic
    lm = tiny_lm("llama")
    before = weight_hashes(lm.model)
    recipe = make_recipe(lm, [Edit(lm.matrices[0].name, 1, 0.5)])

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(type(lm.model), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with edited(lm, recipe_edits := [Edit(lm.matrices[0].name, 1, 0.5)]):
            save_model_atomic(lm, tmp_path / "out", recipe)
    assert recipe_edits and list(tmp_path.iterdir()) == []
    assert weight_hashes(lm.model) == before


def test_cache_entry_from_another_version_is_recomputed(tiny_lm, mc_task, store):
    lm = tiny_lm("llama")
    splits = _splits(mc_task)
    run_search(lm, splits, SMALL, store)
    for key in list(store._cache.iterkeys()):
        if key.startswith("result/"):
            store._cache.set(key, _MAGIC_JSON + json.dumps({"v": 999, "data": {"accuracy": 1.0}}).encode())
    again = run_search(lm, splits, SMALL, store)
    assert again.cache["eval"] == 9 and store.counts["corrupt"] >= 9
    assert all(c["accuracy"] < 1.0 or not c["cached"] for c in again.candidates)


def test_svd_factors_filling_the_cache_never_push_out_results_or_reports(tmp_path):
    """Before, one bounded cache dropped what was stored first: a few searches on a large model, whose factors come
    by the gigabyte, pushed out the earlier searches' results and reports."""
    s = Store(tmp_path / "store", size_limit=3 * 2**20)
    s.put_json("result/m/t/1", {"accuracy": 0.5})
    s.put_json("report/m/t/1", {"best": 1})
    for i in range(6):  # 1 MiB each: twice the bound
        s.put_tensors(f"factors/m/-/{i}", {"U": torch.zeros(512, 512)})
        assert s.get_tensors("factors/m/-/0") is not None  # the one in use stays: least recently used goes first
    assert s.get_json("result/m/t/1") == {"accuracy": 0.5} and s.get_json("report/m/t/1") == {"best": 1}
    assert len(s._factors) == 2 and s._factors.volume() < 3 * 2**20


def test_a_cache_folder_from_before_the_split_keeps_its_results_and_drops_its_factors(tmp_path):
    import diskcache

    old = diskcache.Cache(str(tmp_path / "store"))  # one bounded cache, as earlier versions wrote it
    keep = Store(tmp_path / "elsewhere")
    keep.put_json("result/m/t/1", {"accuracy": 0.5})
    keep.put_tensors("factors/m/-/1", {"U": torch.ones(2, 2)})
    old.set("result/m/t/1", keep._cache.get("result/m/t/1"))
    old.set("factors/m/-/1", keep._factors.get("factors/m/-/1"))
    old.close()
    s = Store(tmp_path / "store")
    assert s.get_json("result/m/t/1") == {"accuracy": 0.5}
    assert list(s._cache.iterkeys()) == ["result/m/t/1"] and s._cache.eviction_policy == "none"
    assert s.get_tensors("factors/m/-/1") is None  # recomputed on use, then kept in the bounded part


def test_disk_full_mid_run_continues_without_cache_and_says_so(tiny_lm, mc_task, tmp_path, monkeypatch):
    s = Store(tmp_path / "store")

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(s._cache, "set", full)
    report = run_search(tiny_lm("llama"), _splits(mc_task), SMALL, s)
    assert report.best_test is not None and not s.enabled
    assert "No space left on device" in s.disabled_reason and "without a cache" in s.disabled_reason


# ---- concurrency

def test_threads_never_edit_the_same_model_at_once(tiny_lm):
    lm = tiny_lm("llama")
    before = weight_hashes(lm.model)
    inside, peak, errors = [0], [0], []
    guard = threading.Lock()

    def worker(i):
        try:
            for j in range(5):
                with edited(lm, [Edit(lm.matrices[(i + j) % len(lm.matrices)].name, 1, 0.5)]):
                    with guard:
                        inside[0] += 1
                        peak[0] = max(peak[0], inside[0])
                    time.sleep(0.002)
                    with guard:
                        inside[0] -= 1
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and peak[0] == 1
    assert weight_hashes(lm.model) == before


def test_job_manager_refuses_a_second_job_on_the_same_device():
    from laser_ui import JobManager
    jm = JobManager()
    release = threading.Event()
    first = jm.submit("search", "first", "cpu", lambda job: release.wait(5))
    with pytest.raises(JobBusy, match="'first' is still running on cpu"):
        jm.submit("search", "second", "cpu", lambda job: None)
    other = jm.submit("search", "elsewhere", "cuda:0", lambda job: 42)
    release.set()
    for job in (first, other):
        for _ in range(100):
            if job.status != "running":
                break
            time.sleep(0.05)
    assert first.status == "done" and other.result == 42
    assert jm.submit("search", "third", "cpu", lambda job: 1) is not None


def test_random_cancellation_points_never_corrupt_weights_or_cache(tiny_lm, mc_task, tmp_path):
    lm = tiny_lm("gpt2")
    before = weight_hashes(lm.model)
    splits = _splits(mc_task)
    rng = random.Random(1234)
    s = Store(tmp_path / "store")
    statuses = []
    for _ in range(8):
        token, stop_at, seen = CancelToken(), rng.randrange(1, 14), [0]

        def progress(ev, token=token, stop_at=stop_at, seen=seen):
            seen[0] += 1
            if seen[0] == stop_at:
                token.cancel()
        report = run_search(lm, splits, SMALL, s, progress=progress, cancel=token)
        statuses.append(report.status)
        assert weight_hashes(lm.model) == before
        for key in [*s._cache.iterkeys(), *s._factors.iterkeys()]:  # every entry decodes: nothing half-written
            json_entry = key.startswith(("result/", "report/", "spectra_time/"))
            assert (s.get_json(key) if json_entry else s.get_tensors(key)) is not None
    assert "partial" in statuses
    final = run_search(lm, splits, SMALL, s)
    assert final.status == "complete" and final.cache.get("corrupt", 0) == 0


# ---- running out of memory

CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.6 GiB of which 1.1 GiB "
            "is free. Including non-PyTorch memory, this process has 22.4 GiB memory in use. If reserved but "
            "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")


def _oom_once_edited(monkeypatch):
    """Make the first evaluation of a candidate, one under its edit, run out of GPU memory (the base model's runs)."""
    import laser_core.candidates as candidates
    real, calls = candidates.evaluate, []

    def evaluate(lm, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # the first is the base model's
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real(lm, *args, **kwargs)
    monkeypatch.setattr(candidates, "evaluate", evaluate)


def test_running_out_of_memory_in_the_cli_is_one_line_naming_the_allocation_and_the_fixes(tiny_dirs, mc_task,
                                                                                          tmp_path, capsys, monkeypatch):
    from laser_core.cli import main
    _oom_once_edited(monkeypatch)
    rc = main(["search", "--model", str(tiny_dirs["llama"]), "--device", "cpu", "--task", str(mc_task), "--n-calib",
               "20", "--n-test", "20", "--no-cache", "--q", "1", "--ks", "1", "--rhos", "0.5", "--stack", "1",
               "--recipe-out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1] == (
        "error: ran out of memory in search: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
        "capacity of 23.6 GiB of which 1.1 GiB is free. Nothing was left edited and what was cached stays. Free "
        "memory (another job or program), or use a smaller model, bfloat16 on a GPU, or another device (CLI: --dtype, "
        "--device; dashboard: Model & task). A search also keeps hidden states beside the model, to run each candidate "
        "from its layer on: give them less memory (CLI: --prefix-budget-mb; dashboard: Explore's Speed settings).")
    assert not any("Traceback" in line for line in err) and not (tmp_path / "r.json").exists()


def test_a_dashboard_job_that_runs_out_of_memory_ends_with_the_message_and_the_model_as_it_was(tiny_lm, mc_task,
                                                                                              monkeypatch):
    from laser_ui import JobManager
    _oom_once_edited(monkeypatch)
    lm = tiny_lm("llama")
    before = weight_hashes(lm.model)
    job = JobManager().submit("search", "C2I on mc", "cpu", lambda job: run_search(lm, _splits(mc_task), SMALL, None))
    for _ in range(400):
        if job.status != "running":
            break
        time.sleep(0.05)
    assert job.status == "error" and job.error.startswith(
        "ran out of memory in 'C2I on mc': CUDA out of memory. Tried to allocate 2.00 GiB. ")
    assert "Traceback" not in job.error and "PYTORCH_CUDA_ALLOC_CONF" not in job.error
    assert job.error.endswith("give them less memory (CLI: --prefix-budget-mb; dashboard: Explore's Speed settings).")
    assert weight_hashes(lm.model) == before and lm.lock.acquire(blocking=False)  # the job's edit let go of it
    lm.lock.release()


@pytest.mark.parametrize("room", ["one layer", "none"])
def test_a_search_whose_device_cannot_hold_its_cached_states_gives_them_back_and_finds_the_same(
        tiny_lm, mc_task, monkeypatch, caplog, room, search_pools):
    """A device that cannot hold the hidden states of two layers beside an evaluation ("one layer"), or any ("none"):
    the search drops them and keeps one layer's at a time, or switches prefix reuse off, with a warning, and finds
    what it finds with room to spare (prefix reuse is exact). Before, the search stopped at the first such failure."""
    import laser_core.candidates as candidates
    lm = tiny_lm("llama")
    splits = _splits(mc_task)
    cfg = SearchConfig("laser", ks=(1,), rhos=(0.5, 0.1), layers=(0, 1), types=("down",), stack=1)
    roomy = run_search(lm, splits, cfg, None)
    search_pools.clear()  # the pool to watch is the next search's
    pools, real = search_pools, candidates.evaluate

    def evaluate(lm_, *args, prefix=None, **kwargs):
        if prefix is not None and (room == "none" or len(pools[0].items) > 1):
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real(lm_, *args, prefix=prefix, **kwargs)
    monkeypatch.setattr(candidates, "evaluate", evaluate)
    with caplog.at_level(logging.WARNING, logger="laser_core.memory"):
        tight = run_search(lm, splits, cfg, None)
    said = [r.getMessage() for r in caplog.records if "ran out of memory" in r.getMessage()]
    first = "evaluating model.layers.1.mlp.down_proj.weight" if room == "one layer" else \
        "evaluating model.layers.0.mlp.down_proj.weight"
    assert len(said) == 1 and said[0].startswith(f"{first} K=1 rho=0.5 ran out of memory on cpu: "), said
    if room == "one layer":
        assert re.search(r"MB of hidden states cached for 2 layers dropped: one layer's \(.* MB\) at a time from here on$",
                         said[0]) and len(pools[0].items) == 1 and not pools[0].off
    else:
        assert said[0].endswith("prefix reuse off from here on (each candidate runs the whole model, with no hidden "
                                "states cached)") and pools[0].off and not pools[0].items
    assert [(c["name"], c["rho"], c["accuracy"]) for c in tight.candidates] == \
        [(c["name"], c["rho"], c["accuracy"]) for c in roomy.candidates]
    assert [c["log_loss"] for c in tight.candidates] == pytest.approx([c["log_loss"] for c in roomy.candidates], abs=1e-5)
    assert tight.best_test["accuracy"] == roomy.best_test["accuracy"]


@pytest.mark.parametrize("kind", ["mc", "gen"])
def test_an_evaluation_that_runs_out_of_memory_runs_again_in_smaller_batches_and_later_ones_start_there(
        tiny_lm, mc_task, tmp_path, monkeypatch, caplog, kind):
    """A device that cannot run more than 5 rows at once (a multiple-choice forward, or a generation's decoding): the
    evaluation halves its batches until they fit, with a warning per halving, and gives the result of one with room
    to spare; the model's next evaluation starts at the size that fit (no failed try), and where no batch fits the
    allocator's error stands. Before, any such failure ended the evaluation (the base model's, a held-out test's)."""
    import sys

    from conftest import write_jsonl
    from laser_core import evaluate
    lm = tiny_lm("llama")
    monkeypatch.setattr(lm, "eval_tokens", None)  # put back for the other tests after this one
    if kind == "mc":
        examples = _splits(mc_task).examples("calib")
        owner, name = sys.modules["laser_core.evaluate"], "scored_rows"  # the package's `evaluate` is the function
        rows = lambda args, kwargs: len(args[1])  # noqa: E731
    else:
        ts = TaskSpec(str(write_jsonl(tmp_path / "say.jsonl", [{"prompt": f"Say {i}:", "targets": [f" {i}"]}
                                                                 for i in range(30)])), n_calib=20, n_test=10)
        examples = make_splits(load_task(ts), ts).examples("calib")
        owner, name, rows = lm.model, "generate", lambda args, kwargs: len(kwargs["input_ids"])
    roomy = evaluate(lm, examples)
    real, failed = getattr(owner, name), []

    def fits_5_rows(*args, **kwargs):
        if rows(args, kwargs) > 5:
            failed.append(rows(args, kwargs))
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, fits_5_rows)
    with caplog.at_level(logging.WARNING, logger="laser_core.evaluate"):
        tight = evaluate(lm, examples)
    said = [r.getMessage() for r in caplog.records if "ran out of memory" in r.getMessage()]
    assert failed and len(said) == len(failed) and lm.eval_tokens < 8192
    assert said[0] == "an evaluation ran out of memory on cpu in batches of 8192 tokens: batches of 4096 from here on"
    assert (tight.correct, tight.predictions) == (roomy.correct, roomy.predictions)
    assert tight.log_loss == pytest.approx(roomy.log_loss, abs=1e-5)
    tries = len(failed)
    assert evaluate(lm, examples).correct == roomy.correct and len(failed) == tries  # starts where it fit
    monkeypatch.setattr(owner, name, lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError(CUDA_OOM)))
    with pytest.raises(torch.OutOfMemoryError):
        evaluate(lm, examples)
    assert lm.eval_tokens == 16  # the floor


def test_the_cpu_allocator_failing_is_told_apart_from_other_errors():
    from laser_core.errors import OutOfMemory
    from laser_core.memory import memory_explained, out_of_memory
    with pytest.raises(OutOfMemory, match=r"ran out of memory making a tensor: .*can't allocate memory: you tried to "
                                          r"allocate \d+ bytes") as failed:
        with memory_explained("making a tensor"):
            torch.empty(2**48)  # a pebibyte: more than any address space
    assert "prefix-budget" not in str(failed.value)  # not a search: its cached states are not what to change
    with pytest.raises(RuntimeError, match="a bug"):
        with memory_explained("making a tensor"):
            raise RuntimeError("a bug")
    assert out_of_memory(torch.OutOfMemoryError(CUDA_OOM)) and not out_of_memory(ValueError("can't allocate memory"))
    with memory_explained("nothing"):
        pass


def test_a_gradient_step_that_runs_out_of_memory_is_run_again_in_smaller_batches_with_the_same_gradients(
        tiny_lm, mc_task, monkeypatch, caplog):
    """A device that cannot hold a batch of more than 9 rows, nor (by the fake's whim) one of 7: the gradient step
    halves its batches until they fit, dropping what the batches that did fit had accumulated (at 64 tokens, batches
    of 9 and 4 rows run before one of 7 fails), and gives the gradients and loss of one run in a single batch. Where no
    batch fits, the CLI's one line. Requires-grad and .grad are reset either way."""
    import laser_core.gradients as gradients
    from laser_core.errors import OutOfMemory
    from laser_core.memory import memory_explained
    lm = tiny_lm("llama")
    examples = _splits(mc_task).examples("calib")
    want, want_loss = gradients.calibration_gradients(lm, examples)
    real, sizes = gradients.scored_logprobs, []

    def holds(fits):
        def scored_logprobs(lm, batch, **kwargs):
            sizes.append(len(batch))
            if not fits(len(batch)):
                raise torch.OutOfMemoryError(CUDA_OOM)
            return real(lm, batch, **kwargs)
        return scored_logprobs
    monkeypatch.setattr(gradients, "scored_logprobs", holds(lambda rows: rows <= 9 and rows != 7))
    got, loss = gradients.calibration_gradients(lm, examples)
    assert sizes == [20] * 5 + [13, 9, 4, 7, 4, 4, 4, 3, 5]  # batches of 4096 tokens ... 256, then 128, 64, 32
    assert loss == pytest.approx(want_loss, abs=1e-5)
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)
    said = [r.getMessage() for r in caplog.records if "gradient step ran out of memory" in r.getMessage()]
    assert said[0] == "the gradient step ran out of memory on cpu in batches of 4096 tokens: again in batches of 2048"
    assert len(said) == 7 and said[-1].endswith("in batches of 64 tokens: again in batches of 32")
    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())
    monkeypatch.setattr(gradients, "scored_logprobs", holds(lambda rows: False))  # not even one row
    with pytest.raises(OutOfMemory, match="ran out of memory in the gradient step: CUDA out of memory"):
        with memory_explained("in the gradient step"):
            gradients.calibration_gradients(lm, examples)
    assert all(p.grad is None and not p.requires_grad for p in lm.model.parameters())
