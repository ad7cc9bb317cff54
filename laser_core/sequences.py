"""Token rows for scoring: examples are tokenised (each choice as it follows its prompt) and become sequences (a
prompt with its choices packed behind it, or one row per choice), a shared lead is cut off, rows are grouped into
least-padded batches, and the tree-shaped attention mask and position ids of a batch are built. Pure bookkeeping on
token ids: no model runs here (see forward).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from .models import LoadedModel
    from .tasks import Example


@dataclass
class Seq:
    """One row to score: its token ids and which positions' outputs are scored, against what."""

    ids: list[int]
    pos: list[int]  # positions whose output is scored
    tgt: list[int]  # token scored at each position (empty when ``rows`` is used)
    rows: list[int] | None = None  # single-token fast path: compare these vocabulary rows at pos[0]
    example: int = 0
    choice: int = 0
    spans: list[int] | None = None  # shared prompt: scored positions of each packed choice, in order
    groups: list[int] | None = None  # shared prompt: 0 for prompt tokens, j + 1 for choice j's tokens
    positions: list[int] | None = None  # shared prompt or lead: position ids (each choice continues the prompt)


def packed_row(prompt: list[int], choices: list[list[int]], example: int) -> Seq:
    """One row holding the prompt once and every choice after it (see ``tree_mask``)."""
    ids, groups, positions, pos, tgt = list(prompt), [0] * len(prompt), list(range(len(prompt))), [], []
    for j, c in enumerate(choices):
        start = len(ids)
        ids += c
        groups += [j + 1] * len(c)
        positions += range(len(prompt), len(prompt) + len(c))
        pos += [len(prompt) - 1] + list(range(start, start + len(c) - 1))
        tgt += c
    return Seq(ids, pos, tgt, None, example, spans=[len(c) for c in choices], groups=groups, positions=positions)


def encode(tok, text: str, special: bool = False) -> list[int]:
    """Token ids of ``text`` (with the tokenizer's special tokens only when ``special``)."""
    return list(tok(text, add_special_tokens=special).input_ids)


def prompt_ids(lm: LoadedModel, prompt: str) -> list[int]:
    """Token ids of a prompt, special tokens included, without a trailing EOS (the answer follows directly)."""
    ids = encode(lm.tokenizer, prompt, special=True)
    eos = lm.tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos and lm.tokenizer.bos_token_id != eos and len(ids) > 1:
        ids = ids[:-1]  # some tokenizers append EOS; the answer must follow the prompt directly
    return ids


def tokenised(lm: LoadedModel, examples: Sequence[Example]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """For a causal LM: each example's prompt ids, and the ids of each of its choices as they follow the prompt (a
    generation example: of its first accepted answer, which its log-loss scores)."""
    prompts = [prompt_ids(lm, e.prompt) for e in examples]
    return prompts, [[choice_ids(lm, p, e.prompt, c) for c in (e.choices or e.targets[:1])]
                     for e, p in zip(examples, prompts)]


def masked_ids(lm: LoadedModel, e: Example) -> list[int]:
    """For a masked LM: the row of ``e``, its prompt and then the <mask> its choices are scored at."""
    return encode(lm.tokenizer, e.prompt + " " + lm.tokenizer.mask_token, special=True)


def masked_choice_tokens(lm: LoadedModel, e: Example) -> list[int]:
    """The token a masked LM scores each choice of ``e`` by: the choice's first token after the prompt."""
    p = prompt_ids(lm, e.prompt)
    return [(choice_ids(lm, p, e.prompt, c) or [lm.tokenizer.unk_token_id])[0] for c in e.choices]


def choice_ids(lm: LoadedModel, prompt: list[int], prompt_text: str, choice: str) -> list[int]:
    """Token ids of ``choice`` as it follows the prompt: the tail of the tokens of prompt and choice together where
    they start with ``prompt`` (the prompt's ids), else the choice's tokens alone.

    Tokenised alone, a choice can start with a token it never has after the prompt: a SentencePiece tokenizer
    with a dummy prefix (Llama 2, Mistral 7B v0.1) reads " yes" as ['▁', '▁yes'] but "Answer: yes" ends in
    ['▁yes'], so every choice was scored one stray token longer. Byte-level BPE (GPT-2, Llama 3, SmolLM2, Qwen)
    gives the same tokens both ways.
    """
    joint = prompt_ids(lm, prompt_text + choice)
    if len(joint) > len(prompt) and joint[:len(prompt)] == prompt:
        return joint[len(prompt):]
    return encode(lm.tokenizer, choice)


def lead_length(seqs: list[Seq]) -> int:
    """How many tokens every sequence starts with, short of the first scored position of any."""
    return min(len(os.path.commonprefix([s.ids for s in seqs])), min(min(s.pos) for s in seqs))


def without_lead(s: Seq, n: int) -> Seq:
    """``s`` without its first ``n`` tokens, its positions and scored positions kept as they were."""
    return replace(s, ids=s.ids[n:], pos=[p - n for p in s.pos], groups=s.groups[n:] if s.groups else None,
                   positions=(s.positions or list(range(len(s.ids))))[n:])


def batch_rows(lm: LoadedModel) -> int:
    """The most rows a batch holds by default: 64 on a CPU, 256 on an accelerator (see :func:`least_padded_batches`)."""
    return 64 if lm.device.type == "cpu" else 256


def least_padded_batches(lm: LoadedModel, seqs: list[Seq], max_tokens: int, max_batch: int | None = None,
                         lead: int = 0) -> list[list[int]]:
    """Batches of sequence indices, sorted by length, cut where the padded tokens plus a per-batch overhead are
    least (dynamic programming over the cut points); a batch holds at most ``max_tokens`` padded tokens (or one
    longer sequence) and ``max_batch`` rows. Rows that follow a cached lead of ``lead`` tokens each hold a copy
    of its keys and values: a batch holds at most ``2 * max_tokens`` of rows x (lead + width), which bounds its
    memory where the lead is long (a long few-shot preamble on a large model).

    The overhead of one more batch, in tokens, is small on a CPU (compute-bound: padding costs as much as real
    tokens) and large on a GPU (a forward's launch cost is worth thousands of tokens), so a GPU gets few
    full batches and a CPU gets batches of near-equal lengths. ``max_batch`` (rows) is 64 on a CPU and 256 on an
    accelerator by default: on an H100, FEVER's 1305 validation examples ran in 6 batches instead of 21 and
    took 0.61 s instead of 0.80 (0.37 s instead of 0.60 from layer 2's cached states); 1024 rows gave no more.
    """
    if max_batch is None:
        max_batch = batch_rows(lm)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i].ids))
    lengths = [len(seqs[i].ids) for i in order]
    overhead = 32 if lm.device.type == "cpu" else max_tokens // 2
    n = len(order)
    cost, cut = [0.0] + [math.inf] * n, [0] * (n + 1)  # cost[j]: least cost of the j longest; cut[j]: its last batch's start
    for j in range(1, n + 1):
        for i in range(j - 1, max(-1, j - 1 - max_batch), -1):  # last batch = order[i:j], width lengths[i]
            padded = lengths[i] * (j - i)
            if j - i > 1 and (padded > max_tokens or (j - i) * (lengths[i] + lead) > 2 * max_tokens):
                break  # a longer batch only gets wider
            if cost[i] + padded + overhead < cost[j]:
                cost[j], cut[j] = cost[i] + padded + overhead, i
    batches, j = [], n
    while j > 0:
        batches.append(order[cut[j]:j])
        j = cut[j]
    return batches[::-1]


def tree_mask(batch: list[Seq], width: int, dtype: torch.dtype, lead: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive 4-D mask (batch, 1, width, lead + width) and position ids for rows that may hold packed choices
    and follow a cached lead of ``lead`` tokens.

    Token i sees the lead, and token k <= i when k is in the prompt or in i's own choice; a padding token sees
    the lead and itself only.
    """
    n = len(batch)
    groups = torch.full((n, width), -1, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    for b, s in enumerate(batch):
        m = len(s.ids)
        groups[b, :m] = torch.tensor(s.groups) if s.groups is not None else 0
        positions[b, :m] = torch.tensor(s.positions) if s.positions is not None else torch.arange(lead, lead + m)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    gq, gk = groups[:, :, None], groups[:, None, :]
    allowed = causal & (gk >= 0) & ((gk == 0) | (gk == gq))
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows: no row may be fully masked
    allowed = torch.cat([torch.ones((n, width, lead), dtype=torch.bool), allowed], dim=2)
    mask = torch.zeros((n, 1, width, lead + width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return mask, positions
