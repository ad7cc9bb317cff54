"""Prefix reuse equals the full forward (within 1e-4 in log-prob) on every supported tiny architecture."""
from __future__ import annotations

import pytest
import torch

from laser_core import Edit, edited
from laser_core.evaluate import evaluate
from laser_core.prefix_states import PrefixStates
from laser_core.models import weight_hashes
from laser_core.tasks import Example

from conftest import OTHER_ARCHS, build_other

ONE_TOKEN = [Example("Is the number 4 even? Answer:", (" yes", " no"), 0),
             Example("The capital of France is Paris. Is the number 13 even? Answer:", (" yes", " no"), 1),
             Example("Q: What colour is the sky? A:", (" blue", " red"), 0)]
MULTI = [Example("Is the number 4 even? Answer:", (" yes", " no", " true false claim"), 0),
         Example("Q: What colour is the sky? A: the sky is", (" blue green", " red"), 0),
         Example("premise hypothesis", (" entailment", " non-entailment"), 1)]
_LEAD = "Answer with yes or no, then stop.\nQ: "  # a shared lead: run once, not in every row
LEAD_ONE = [Example(_LEAD + "Is the number 4 even?\nA:", (" yes", " no"), 0),
            Example(_LEAD + "Is 13 even?\nA:", (" yes", " no"), 1),
            Example(_LEAD + "Is the sky blue on a clear day, seen from Paris?\nA:", (" yes", " no"), 0)]
LEAD_MULTI = [Example(_LEAD + "Is the number 4 even?\nA:", (" yes", " no", " true false claim"), 0),
              Example(_LEAD + "What colour is the sky?\nA: the sky is", (" blue green", " red"), 0),
              Example(_LEAD + "premise hypothesis", (" entailment", " non-entailment"), 1)]


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


def _reference(lm, examples, fast_path: str):
    """Reference: ``evaluate`` with one fast path of this model (``lean_block``: the last block's MLP at the
    scored positions only; ``prompt_sharing``: a question's choices packed in one row) switched off."""
    setattr(lm, fast_path, False)
    try:
        return evaluate(lm, examples)
    finally:
        setattr(lm, fast_path, None)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta"])
def test_matrix_entry_equals_the_full_forward_for_every_matrix_of_a_block(tiny_lm, arch):
    lm = tiny_lm(arch)
    examples = ONE_TOKEN if lm.kind == "masked" else MULTI
    before = weight_hashes(lm.model)
    skipped = {}
    for layer in (0, 1):  # 1 is the last block: with the lean MLP there too
        width = max(len(s.ids) for s in PrefixStates(lm, examples, layer).seqs)
        prefix = PrefixStates(lm, examples, layer, max_tokens=2 * width)
        assert lm.lean_block is (arch != "roberta")  # probed before the capture, not inside it
        assert [s.shape[:2] for s in prefix.states] == [(len(i), max(len(prefix.seqs[j].ids) for j in i))
                                                        for i in prefix.batches]
        for ref in (r for r in lm.matrices if r.layer == layer):
            entry = prefix.at_matrix(lm, ref.name)
            if entry is not prefix:
                assert len(entry.stubs) == len(prefix.batches)
                skipped[ref.type] = sorted(entry.stubs[0])
            with edited(lm, [Edit(ref.name, 2, 0.25)]):
                full = _reference(lm, examples, "lean_block")
                fast = evaluate(lm, examples, prefix=entry)
            for a, b in zip(full.choice_logprobs, fast.choice_logprobs):
                assert a == pytest.approx(b, abs=1e-4), (ref.name, a, b)
            assert fast.predictions == full.predictions
            assert fast.log_loss == pytest.approx(full.log_loss, abs=1e-4)
        assert prefix.nbytes > sum(t.numel() * t.element_size() for t in prefix.states)  # entries are counted
    assert weight_hashes(lm.model) == before
    assert not any("forward" in m.__dict__ for m in lm.model.modules())  # every stub was taken out again
    # an MLP matrix skips the attention of its block; the last MLP matrix also the MLP's earlier layers
    mlp_last = "down"  # the MLP's output matrix
    attention = {"llama": "self_attn", "gpt2": "attn", "roberta": "attention"}[arch]
    assert attention in skipped[mlp_last] and len(skipped[mlp_last]) >= 2, skipped
    assert not any("norm" in n or n.startswith("ln") for n in skipped[mlp_last])  # cheaper to recompute than keep
    down = next(r.name for r in lm.matrices if r.layer == 1 and r.type == mlp_last)
    fresh = PrefixStates(lm, examples, 1)
    assert fresh.at_matrix(lm, down, max_bytes=1) is fresh and fresh.stubs is None  # over the RAM limit: block only


def _plain(lm, examples):
    """Reference: ``evaluate`` with every fast path off (no packed choices, no shared lead, the last block whole)."""
    flags = lm.prompt_sharing, lm.lead_sharing, lm.lean_block
    lm.prompt_sharing = lm.lead_sharing = lm.lean_block = False
    try:
        return evaluate(lm, examples)
    finally:
        lm.prompt_sharing, lm.lead_sharing, lm.lean_block = flags


def _assert_same(a, b, what):
    for x, y in zip(a.choice_logprobs, b.choice_logprobs):
        assert x == pytest.approx(y, abs=1e-4), (what, x, y)
    assert a.predictions == b.predictions, what


@pytest.mark.parametrize("arch", OTHER_ARCHS)
def test_every_other_named_architecture_gives_the_plain_log_probs_with_fast_paths_and_prefix_reuse(tokenizer, arch):
    """Each matrix of each block edited in turn, its candidate evaluated from cached states (block entry and matrix
    entry) against a plain evaluation of the edited model ("gemma3": the vision-language model, text only).
    Gemma 2 and 3 and Qwen 2 with sliding layers took block i's attention kind from ``config.layer_types[i]``
    counted along the cut list, so a candidate at a later block ran with block 0's mask and rotary table:
    log-probs off by up to 0.32."""
    from laser_core.models import from_module

    lm = from_module(build_other(arch, tokenizer), tokenizer)
    before = weight_hashes(lm.model)
    kinds = getattr(lm.model.config, "layer_types", None)
    for examples in ([ONE_TOKEN] if lm.kind == "masked" else [ONE_TOKEN, MULTI, LEAD_MULTI]):
        _assert_same(evaluate(lm, examples), _plain(lm, examples), "base")
        for layer in sorted({r.layer for r in lm.matrices}):
            prefix = PrefixStates(lm, examples, layer)
            for ref in (r for r in lm.matrices if r.layer == layer):
                with edited(lm, [Edit(ref.name, 2, 0.25)]):
                    plain = _plain(lm, examples)
                    _assert_same(evaluate(lm, examples, prefix=prefix), plain, ref.name)
                    _assert_same(evaluate(lm, examples, prefix=prefix.at_matrix(lm, ref.name)), plain, ref.name)
    assert weight_hashes(lm.model) == before and getattr(lm.model.config, "layer_types", None) == kinds


_THRICE = "Answer with yes or no, then stop. " * 3
LONG = [Example(_THRICE + "Q: Is the number 4 even? The capital of France is Paris.\nA:",
                (" yes", " no", " true false claim"), 0),
        Example(_THRICE + "Q: What colour is the sky?\nA: the sky is", (" blue green", " red"), 0)]
# rows of 81 to 90 tokens, 92 with a question's choices packed


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3_text"])
@pytest.mark.parametrize("window", [48, 64, 92])
def test_rows_longer_than_a_sliding_window_are_scored_as_the_window_sees_them(tokenizer, arch, window):
    """Packed choices and a shared lead hand the model a custom mask that sliding layers do not cut to their window;
    the probes (short rows) pass. Before, 40- and 48-token windows moved log-probs by up to 0.1, and 64 failed in the
    lead's cache. They are used only where every row fits (92: all do)."""
    from laser_core.models import from_module

    lm = from_module(build_other(arch, tokenizer, window=window), tokenizer)
    _assert_same(evaluate(lm, LONG), _plain(lm, LONG), window)
    assert (lm.prompt_sharing, lm.lead_sharing) == ((True, True) if window == 92 else (None, None))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lean_last_block_gives_the_same_log_probs_and_gradients(tiny_lm, arch):
    from laser_core.gradients import loss_backward
    from laser_core.forward import lean_block_ok

    lm = tiny_lm(arch)
    assert lean_block_ok(lm)
    full = _reference(lm, MULTI, "lean_block")
    lean = evaluate(lm, MULTI)
    for a, b in zip(full.choice_logprobs, lean.choice_logprobs):
        assert a == pytest.approx(b, abs=1e-4)
    grads = []
    for p in lm.model.parameters():
        p.requires_grad_(True)
    for flag in (False, True):
        lm.model.zero_grad()
        lm.lean_block = flag
        loss_backward(lm, MULTI, max_tokens=16)  # batches with padding
        grads.append({n: p.grad.clone() for n, p in lm.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    last_mlp = [n for n in grads[0] if ".1.mlp." in n and n.endswith("weight")]
    assert last_mlp and all(grads[0][n].abs().sum() > 0 for n in last_mlp)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n


def test_a_model_whose_lean_block_differs_runs_the_last_block_whole(tiny_lm, monkeypatch):
    from laser_core import forward as fw

    lm = tiny_lm("llama")
    mlp = fw.block_list(lm)[2][-1].mlp
    monkeypatch.setattr(type(mlp), "forward", lambda self, x: x.cumsum(1) * 0.01)  # mixes positions
    assert not fw.lean_block_ok(lm)
    ref = _reference(lm, MULTI, "lean_block").choice_logprobs
    assert not fw.lean_block_ok(lm) and evaluate(lm, MULTI).choice_logprobs == ref


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


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_prompt_rows_equal_one_row_per_choice_with_padding_and_prefix(tiny_lm, arch):
    from laser_core.forward import build_sequences, prompt_sharing_ok

    lm = tiny_lm(arch)
    assert prompt_sharing_ok(lm)
    packed, _ = build_sequences(lm, MULTI, share_prompt=True)
    plain, _ = build_sequences(lm, MULTI, share_prompt=False)
    assert len(packed) == len(MULTI) and len(plain) == sum(len(e.choices) for e in MULTI)
    assert sum(len(s.ids) for s in packed) < sum(len(s.ids) for s in plain)  # each prompt runs once
    edit_name = next(r.name for r in lm.matrices if r.layer == 1 and r.type in ("up", "qkv", "v"))
    with edited(lm, [Edit(edit_name, 2, 0.25)]):
        ref = _reference(lm, MULTI, "prompt_sharing")
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
    from laser_core import forward as fw

    lm = tiny_lm("llama")
    ref = _reference(lm, MULTI, "prompt_sharing")

    def causal_only(batch, width, dtype, lead=0):  # what an architecture ignoring the tree mask would compute
        mask, pos = real(batch, width, dtype, lead)
        n = len(batch)
        return torch.zeros_like(mask).masked_fill_(~torch.ones(width, width, dtype=torch.bool).tril(),
                                                   torch.finfo(dtype).min).expand(n, 1, width, width), pos
    real = fw.tree_mask
    monkeypatch.setattr(fw, "tree_mask", causal_only)
    assert not fw.prompt_sharing_ok(lm)
    res = evaluate(lm, MULTI)
    assert res.choice_logprobs == ref.choice_logprobs  # same rows as the reference: bit-identical
    assert fw.build_sequences(lm, MULTI)[0][0].spans is None  # left to the probe: not packed


def test_one_token_choices_never_run_the_sharing_probe(tiny_lm):
    lm = tiny_lm("llama")
    evaluate(lm, ONE_TOKEN)
    assert lm.prompt_sharing is None  # nothing to pack: the fast path scores the choice logits at the prompt's end
    evaluate(lm, MULTI)
    assert lm.prompt_sharing is True


@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta"])
@pytest.mark.parametrize("examples", [ONE_TOKEN, MULTI], ids=["one-token", "multi-token"])
def test_the_head_runs_once_over_many_batches_with_the_same_log_probs(tiny_lm, arch, examples):
    from laser_core.forward import body_and_head

    lm = tiny_lm(arch)
    if lm.kind == "masked" and examples is MULTI:
        examples = ONE_TOKEN
    prefix = PrefixStates(lm, examples, 1, max_tokens=1)  # one sequence a batch (and the model's probes run)
    calls = []
    handle = body_and_head(lm.model, lm.kind)[1].register_forward_hook(lambda m, args, out: calls.append(len(args[0])))
    try:
        pooled = evaluate(lm, examples, prefix=prefix)
        assert len(prefix.batches) == len(prefix.seqs) > 1 and len(calls) == 1
        per_batch = evaluate(lm, examples, prefix=prefix, head_rows=1)
        assert len(calls) == 1 + len(prefix.batches)
        early = evaluate(lm, examples, prefix=prefix, beat=(0.0, 0.0))  # may stop after any batch: head each time
        assert len(calls) == 1 + 2 * len(prefix.batches)
    finally:
        handle.remove()
    for a, b in zip(pooled.choice_logprobs, per_batch.choice_logprobs):
        assert a == pytest.approx(b, abs=1e-5)  # one matmul over all rows vs one per batch: rounding only
    assert pooled.predictions == per_batch.predictions and pooled.log_loss == pytest.approx(per_batch.log_loss, abs=1e-5)
    assert early.predictions == pooled.predictions and not early.stopped_early


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("examples", [LEAD_ONE, LEAD_MULTI], ids=["one-token", "multi-token"])
def test_a_shared_lead_run_once_equals_running_it_in_every_row(tiny_lm, arch, examples):
    from laser_core.forward import build_sequences, split_lead

    lm = tiny_lm(arch)
    seqs = build_sequences(lm, examples)[0]
    lead, rest = split_lead(lm, seqs)
    assert lm.lead_sharing is True and len(lead) >= 8
    assert sum(len(s.ids) for s in rest) == sum(len(s.ids) for s in seqs) - len(lead) * len(seqs)
    assert (lm.prompt_sharing is True) == (examples is LEAD_MULTI)  # with packed choices too
    before = weight_hashes(lm.model)
    skipped = set()
    for layer in (0, 1):
        prefix = PrefixStates(lm, examples, layer, max_tokens=2 * max(len(s.ids) for s in rest))  # padded pairs
        assert prefix.lead == lead and prefix.lead_state.shape[1] == len(lead) and len(prefix.batches) >= 2
        for ref in (r for r in lm.matrices if r.layer == layer):
            entry = prefix.at_matrix(lm, ref.name)
            with edited(lm, [Edit(ref.name, 2, 0.25)]):
                full = _reference(lm, examples, "lead_sharing")
                shared = evaluate(lm, examples, max_tokens=16)
                fast = evaluate(lm, examples, prefix=entry)
            for res in (shared, fast):
                for a, b in zip(full.choice_logprobs, res.choice_logprobs):
                    assert a == pytest.approx(b, abs=1e-4), (ref.name, a, b)
                assert res.predictions == full.predictions
                assert res.log_loss == pytest.approx(full.log_loss, abs=1e-4)
            if entry is not prefix:
                skipped.add(ref.type)
    assert skipped  # matrix entries (the rows skip modules the lead still runs) were among them
    assert weight_hashes(lm.model) == before


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradients_through_a_shared_lead_equal_those_without(tiny_lm, arch):
    from laser_core.gradients import loss_backward

    lm = tiny_lm(arch)
    for p in lm.model.parameters():
        p.requires_grad_(True)
    grads, losses = [], []
    for flag in (False, None):
        lm.model.zero_grad()
        lm.lead_sharing = flag
        losses.append(loss_backward(lm, LEAD_MULTI, max_tokens=16))  # several batches, each with the lead
        grads.append({n: p.grad.clone() for n, p in lm.model.named_parameters() if p.grad is not None})
    assert lm.lead_sharing is True and losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n


def test_a_model_that_fails_the_lead_probe_runs_the_lead_in_every_row(tiny_lm, monkeypatch):
    from laser_core import forward as fw
    from laser_core.prefix import LeadCache

    lm = tiny_lm("llama")
    ref = _reference(lm, LEAD_ONE, "lead_sharing")
    monkeypatch.setattr(LeadCache, "past", lambda self, model, rows: None)  # a model that drops the past
    assert not fw.lead_sharing_ok(lm)
    assert fw.split_lead(lm, fw.build_sequences(lm, LEAD_ONE)[0])[0] == []
    assert evaluate(lm, LEAD_ONE).choice_logprobs == ref.choice_logprobs  # the same rows: bit-identical


def test_no_lead_is_split_off_where_it_saves_little_or_the_model_is_masked(tiny_lm):
    from laser_core.forward import build_sequences, split_lead

    lm = tiny_lm("llama")
    assert split_lead(lm, build_sequences(lm, MULTI)[0])[0] == []  # no common start
    assert lm.lead_sharing is None  # and so no probe
    seqs = build_sequences(lm, LEAD_ONE)[0]
    assert split_lead(lm, seqs, min_share=0.9)[0] == [] and split_lead(lm, seqs)[0]
    masked = tiny_lm("roberta")
    assert split_lead(masked, build_sequences(masked, LEAD_ONE)[0])[0] == []
