"""End to end on the embedded SmolLM2-135M-Instruct and a bundled BIG-bench task (the real thing)."""
from __future__ import annotations

import math

import pytest

from laser_core import ModelSpec, SearchConfig, Store, TaskSpec, load_model, load_task, make_splits, run_search
from laser_core.models import weight_hashes


@pytest.fixture(scope="module")
def demo():
    return load_model(ModelSpec("demo", "cpu"))


def test_demo_model_is_smollm2_with_210_located_matrices(demo):
    facts = demo.facts()
    assert facts["model_type"] == "llama" and facts["layers"] == 30 and facts["matrices"] == 210
    assert facts["matrix_types"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert demo.ref("model.layers.0.self_attn.k_proj.weight").shape == (192, 576)


def test_scores_and_small_c2i_search_on_fever_end_to_end(demo, tmp_path):
    ts = TaskSpec("fever", n_calib=100, n_test=100, seed=0)
    splits = make_splits(load_task(ts), ts)
    before = weight_hashes(demo.model)
    store = Store(tmp_path / "store")
    cfg = SearchConfig(q=2, ks=(1, 4), rhos=(0.1,))
    report = run_search(demo, splits, cfg, store)
    assert weight_hashes(demo.model) == before
    scores = {m["name"]: m["score"] for m in report.matrices}
    assert len(scores) == 210 and all(math.isfinite(s) for s in scores.values())
    assert sum(1 for s in scores.values() if s > 0) > 0  # some tails are pushed toward zero
    assert len(report.candidates) == 4
    top2 = {m["name"] for m in report.matrices if m["rank"] in (0, 1)}
    assert {c["name"] for c in report.candidates} == top2
    for part in (report.base, report.best, report.base_test, report.best_test):
        assert 0.0 <= part["accuracy"] <= 1.0 and part["log_loss"] > 0
    assert report.base_test["n"] == 100 and report.timings["gradients"] > 0
    again = run_search(demo, splits, cfg, store)
    assert again.cache.get("eval", 0) == 0 and again.timings["gradients"] == 0.0
    assert again.best_test["accuracy"] == report.best_test["accuracy"]
