"""Prefix reuse equals the full forward (within 1e-4 in log-prob) on every supported tiny architecture."""
from __future__ import annotations

import pytest
import torch

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


def _per_choice(lm, examples):
    """Reference: every choice in its own row (sharing switched off for this model)."""
    lm.prompt_sharing = False
    try:
        return evaluate(lm, examples)
    finally:
        lm.prompt_sharing = None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prompt_rows_equal_one_row_per_choice_with_padding_and_prefix(tiny_lm, arch):
    from laser_core.evaluate import build_sequences, prompt_sharing_ok

    lm = tiny_lm(arch)
    assert prompt_sharing_ok(lm)
    packed, _ = build_sequences(lm, MULTI, share_prompt=True)
    plain, _ = build_sequences(lm, MULTI, share_prompt=False)
    assert len(packed) == len(MULTI) and len(plain) == sum(len(e.choices) for e in MULTI)
    assert sum(len(s.ids) for s in packed) < sum(len(s.ids) for s in plain)  # each prompt runs once
    edit_name = next(r.name for r in lm.matrices if r.layer == 1 and r.type in ("up", "qkv", "v"))
    with edited(lm, [Edit(edit_name, 2, 0.25)]):
        ref = _per_choice(lm, MULTI)
        shared = evaluate(lm, MULTI, max_tokens=2 * max(len(s.ids) for s in packed))  # padded batches of two
        prefix = PrefixStates(lm, MULTI, 1)
        assert all(s.spans for s in prefix.seqs)
        from_prefix = evaluate(lm, MULTI, prefix=prefix)
    for res in (shared, from_prefix):
        for a, b in zip(ref.choice_logprobs, res.choice_logprobs):
            assert a == pytest.approx(b, abs=1e-4)
        assert res.predictions == ref.predictions
        assert res.log_loss == pytest.approx(ref.log_loss, abs=1e-4)


def test_a_model_that_fails_the_sharing_probe_runs_one_row_per_choice(tiny_lm, monkeypatch):
    import importlib

    ev = importlib.import_module("laser_core.evaluate")  # the package re-exports a function of that name
    lm = tiny_lm("llama")
    ref = _per_choice(lm, MULTI)

    def causal_only(batch, width, dtype):  # what an architecture ignoring the tree mask would compute
        mask, pos = real(batch, width, dtype)
        n = len(batch)
        return torch.zeros_like(mask).masked_fill_(~torch.ones(width, width, dtype=torch.bool).tril(),
                                                   torch.finfo(dtype).min).expand(n, 1, width, width), pos
    real = ev._attention
    monkeypatch.setattr(ev, "_attention", causal_only)
    assert not ev.prompt_sharing_ok(lm)
    res = evaluate(lm, MULTI)
    assert res.choice_logprobs == ref.choice_logprobs  # same rows as the reference: bit-identical
    assert ev.build_sequences(lm, MULTI)[0][0].spans is None  # left to the probe: not packed


def test_one_token_choices_never_run_the_sharing_probe(tiny_lm):
    lm = tiny_lm("llama")
    evaluate(lm, ONE_TOKEN)
    assert lm.prompt_sharing is None  # nothing to pack: the fast path scores the choice logits at the prompt's end
    evaluate(lm, MULTI)
    assert lm.prompt_sharing is True
