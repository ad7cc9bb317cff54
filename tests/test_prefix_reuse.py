"""Prefix reuse equals the full forward (within 1e-4 in log-prob) on every supported tiny architecture."""
from __future__ import annotations

import pytest

from laser_core import Edit, edited
from laser_core.evaluate import PrefixStates, evaluate
from laser_core.models import weight_hashes
from laser_core.tasks import Example

ONE_TOKEN = [Example("Is the number 4 even? Answer:", (" yes", " no"), 0),
             Example("The capital of France is Paris. Is the number 13 even? Answer:", (" yes", " no"), 1),
             Example("Q: What colour is the sky? A:", (" blue", " red"), 0)]
MULTI = [Example("Is the number 4 even? Answer:", (" yes", " no", " true false claim"), 0),
         Example("Q: What colour is the sky? A: the sky is", (" blue green", " red"), 0),
         Example("premise hypothesis", (" entailment", " non-entailment"), 1)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta"])
@pytest.mark.parametrize("examples", [ONE_TOKEN, MULTI], ids=["one-token", "multi-token"])
def test_prefix_reuse_equals_full_forward_under_an_edit(tiny_lm, arch, examples):
    lm = tiny_lm(arch)
    if lm.kind == "masked" and examples is MULTI:
        examples = ONE_TOKEN  # masked LMs score one mask position
    before = weight_hashes(lm.model)
    for layer in (0, 1):
        width = max(len(s.ids) for s in PrefixStates(lm, examples, layer).seqs)
        prefix = PrefixStates(lm, examples, layer, max_tokens=2 * width)  # batches of two: padding inside
        lengths = [{len(prefix.seqs[i].ids) for i in idx} for idx in prefix.batches]
        assert len(prefix.batches) >= 2 and any(len(ls) > 1 for ls in lengths) and prefix.nbytes > 0
        edit_name = next(r.name for r in lm.matrices if r.layer == layer and r.type in ("up", "qkv", "v"))
        with edited(lm, [Edit(edit_name, 2, 0.25)]):
            full = evaluate(lm, examples)
            fast = evaluate(lm, examples, prefix=prefix)
        for a, b in zip(full.choice_logprobs, fast.choice_logprobs):
            assert a == pytest.approx(b, abs=1e-4)
        assert full.predictions == fast.predictions
        assert fast.log_loss == pytest.approx(full.log_loss, abs=1e-4)
        base = evaluate(lm, examples)
        assert base.choice_logprobs != full.choice_logprobs  # the edit really changed the outputs
    assert weight_hashes(lm.model) == before
    assert len([n for n, _ in lm.model.named_parameters()]) == len(before) - len(list(lm.model.named_buffers()))


def test_search_with_prefix_reuse_gives_the_same_candidates_as_without(tiny_lm, mc_task):
    from laser_core import SearchConfig, TaskSpec, load_task, make_splits, run_search

    lm = tiny_lm("gpt2")
    ts = TaskSpec(str(mc_task), n_calib=20, n_test=20)
    splits = make_splits(load_task(ts), ts)
    on = run_search(lm, splits, SearchConfig(q=3, ks=(1, 2), rhos=(0.5, 0.1)), None)
    off = run_search(lm, splits, SearchConfig(q=3, ks=(1, 2), rhos=(0.5, 0.1), prefix_reuse=False), None)
    assert any(c["layer"] > 0 for c in on.candidates)
    for a, b in zip(on.candidates, off.candidates):
        assert (a["name"], a["k"], a["rho"], a["accuracy"], a["predictions"] if "predictions" in a else None) == \
               (b["name"], b["k"], b["rho"], b["accuracy"], b["predictions"] if "predictions" in b else None)
        assert a["log_loss"] == pytest.approx(b["log_loss"], abs=1e-4)
