"""Prefix reuse's cached states: the hidden states entering one block for every batch of an evaluation's examples,
taken once from the unedited model, so that a candidate at that layer or later runs only the blocks from there on
(and, for one matrix, only what of its block follows that matrix). The hooks that capture and replay them are
:mod:`laser_core.prefix`; :class:`PrefixPool` keeps them for the layers a search edits, within a memory budget."""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Callable, Sequence

import torch

from .config import Edit
from .errors import ConfigError
from .forward import lead_cache, rows_and_batches, scored_logprobs
from .models import LoadedModel
from .prefix import (LeadCache, StopForward, block_list, capture_first_arg, record_until, repeated, stubbable,
                     tensor_bytes)
from .tasks import Example, Splits


class PrefixStates:
    """Hidden states entering block ``layer`` for every batch of ``examples``, from the base weights.

    An edit at layer >= ``layer`` cannot change them, so a candidate there is evaluated by running blocks
    ``layer..L`` only (see :func:`laser_core.evaluate.evaluate`'s ``prefix``). Build them with the model unedited.
    :meth:`at_matrix` goes further inside block ``layer``. The sequences' shared lead (see
    :func:`~laser_core.forward.split_lead`) has its own states (``lead_state``); it runs once per evaluation,
    block ``layer`` whole (one row).
    """

    def __init__(self, lm: LoadedModel, examples: Sequence[Example], layer: int, max_tokens: int = 8192) -> None:
        found = block_list(lm)
        if found is None:
            raise ConfigError("prefix reuse needs a model whose blocks sit in one ModuleList")
        blocks = found[2]
        self.layer = layer
        self.seqs, self.fast, self.lead, self.batches = rows_and_batches(lm, examples, max_tokens)
        self.stubs: list[dict] | None = None  # per batch: recorded outputs of block ``layer``'s early modules
        self.lead_state: torch.Tensor | None = None  # the lead's hidden states entering block ``layer``
        self.matrices: dict[str, PrefixStates] = {}

        def captured(run: Callable):
            """(the input of block ``layer``, what ``run`` returned, None where the capture stopped it)."""
            got: list[torch.Tensor] = []
            handle = blocks[layer].register_forward_pre_hook(capture_first_arg(got), with_kwargs=True)
            try:
                out = run()
            except StopForward:
                out = None
            finally:
                handle.remove()
            return got[0], out

        with torch.no_grad():
            lead = None
            if self.lead:  # first: the batches attend to its keys and values in the blocks before ``layer``
                self.lead_state, lead = captured(lambda: lead_cache(lm, self.lead))
            self.states = [captured(lambda: scored_logprobs(lm, [self.seqs[i] for i in idx], lead=lead))[0]
                           for idx in self.batches]

    @property
    def nbytes(self) -> int:
        """Memory held (on the model's device): the states, and the recorded outputs of every matrix entry made
        from them."""
        return tensor_bytes([self.states, self.stubs, self.lead_state]) + sum(tensor_bytes(p.stubs) for p in self.matrices.values())

    def lead_past(self, lm: LoadedModel, copies: int = 1) -> LeadCache | None:
        """The lead's keys and values under the model's current weights, run from its states at block ``layer``
        (None where the sequences have no shared lead); ``copies``: one row per stacked candidate."""
        return lead_cache(lm, self.lead, (self.layer, repeated(self.lead_state, copies), None), copies)

    def at_matrix(self, lm: LoadedModel, name: str, min_share: float = 0.1,
                  max_bytes: int | None = None) -> "PrefixStates":
        """These states plus, for an edit of matrix ``name`` (in block ``layer``), the outputs of the modules of
        that block that return before the matrix is first called: they run no more (e.g. the attention, for
        an MLP matrix). Built from the unedited model on the first call, then kept.

        Returns ``self`` where those modules hold under ``min_share`` of the block's parameters (too little
        to be worth the RAM), share a parameter with the matrix, or their outputs would take more than
        ``max_bytes`` (estimated from the first batch).
        """
        if name in self.matrices:
            return self.matrices[name]
        block = block_list(lm)[2][self.layer]
        target = lm.model.get_submodule(name.rsplit(".", 1)[0])
        weight = lm.model.get_parameter(name)
        total = sum(p.numel() for p in block.parameters())
        tokens = [len(idx) * max(len(self.seqs[i].ids) for i in idx) for idx in self.batches]
        stubs: list[dict] = []
        entry = self
        with torch.no_grad():
            lead = self.lead_past(lm)
            for bn, idx in enumerate(self.batches):
                record: dict = {}
                with record_until(block, target, record):
                    try:
                        scored_logprobs(lm, [self.seqs[i] for i in idx], (self.layer, self.states[bn], None), lead=lead)
                    except StopForward:
                        pass
                if bn == 0:
                    names = stubbable(block, record, min_params=total // 100)
                    params = [p for n in names for p in block.get_submodule(n).parameters()]
                    size = tensor_bytes([record[n]["out"] for n in names]) * sum(tokens) / tokens[0]
                    if (sum(p.numel() for p in params) < min_share * total or any(p is weight for p in params)
                            or (max_bytes is not None and size > max_bytes)):
                        break
                stubs.append({n: record[n]["out"] for n in names})
            else:
                entry = copy.copy(self)
                entry.stubs, entry.matrices = stubs, {}
        self.matrices[name] = entry
        return entry


def prefix_reuse_applies(lm: LoadedModel, splits: Splits) -> bool:
    """Can candidates on ``splits`` start from cached hidden states? Only where the model's blocks are found and
    the task is scored by forward passes (generation decodes with its own cache)."""
    return block_list(lm) is not None and splits.task.kind == "mc"


class PrefixPool:
    """Hidden states entering each edited layer (and, per edited matrix, the outputs of its block's modules that
    run before it), per split, kept on the model's device up to ``budget_bytes`` (LRU by layer).

    Built from the unedited model under its lock; valid for one model's base weights only.
    """

    def __init__(self, lm: LoadedModel, budget_bytes: int) -> None:
        self.lm, self.budget = lm, budget_bytes
        self.items: OrderedDict[tuple[str, int], PrefixStates] = OrderedDict()
        self.off = False  # switched off by make_room: every evaluation runs the whole model
        self.peak = (0, 0)  # the most the pool held at once: (bytes, layers)

    def get(self, splits: Splits, split: str, layer: int, matrix: str | None = None) -> PrefixStates | None:
        """States entering block ``layer`` for ``split``; with ``matrix``, also what of that block precedes it."""
        if self.off or (layer == 0 and matrix is None) or not prefix_reuse_applies(self.lm, splits):
            return None  # nothing to skip
        key = (split, layer)
        if key in self.items:
            self.items.move_to_end(key)
        else:
            with self.lm.lock:
                self.items[key] = PrefixStates(self.lm, splits.examples(split), layer)
        states = self.items[key]
        if matrix is not None:
            with self.lm.lock:  # the outputs a matrix adds must fit beside this layer's states
                states = states.at_matrix(self.lm, matrix, max_bytes=self.budget - states.nbytes)
        while len(self.items) > 1 and sum(p.nbytes for p in self.items.values()) > self.budget:
            self.items.popitem(last=False)
        held = sum(p.nbytes for p in self.items.values())
        if held > self.peak[0]:
            self.peak = (held, len(self.items))
        return states

    def peak_held(self) -> dict:
        """The most this pool held at once, for a report: ``{"mb", "layers", "device"}``; empty where it held none."""
        size, layers = self.peak
        return {"mb": round(size / 2**20, 1), "layers": layers, "device": str(self.lm.device)} if size else {}

    def drop_others(self, layer: int) -> str | None:
        """Drop the states of every layer but ``layer`` (those an evaluation runs from), the budget becoming what
        that one holds: one layer's at a time from here on. Returns what was done, in words; None where no other
        layer's were held."""
        others = [key for key in self.items if key[1] != layer]
        if not others:
            return None
        freed = sum(self.items.pop(key).nbytes for key in others)
        self.budget = sum(p.nbytes for p in self.items.values())
        return self._dropped(freed, len(others), "other ")

    def _dropped(self, freed: int, layers: int, which: str = "") -> str:
        """What :meth:`drop_others` and :meth:`make_room` did, in words, the budget already set to one layer's."""
        return (f"{freed / 2**20:.3g} MB of hidden states cached for {layers} {which}layer{'s' * (layers != 1)} "
                f"dropped: one layer's ({self.budget / 2**20:.3g} MB) at a time from here on")

    def make_room(self) -> str | None:
        """After an evaluation ran out of memory: give back what the pool holds, so that it can run again. Where it
        holds more than one layer's states, all are dropped and the budget becomes the largest one's (one layer at a
        time from here on, built again as candidates move between layers); else prefix reuse goes off (candidates
        run the whole model, with nothing cached). Returns what was done, in words; None where it was off already."""
        if self.off:
            return None
        sizes = [p.nbytes for p in self.items.values()]
        self.items.clear()
        if len(sizes) > 1:
            self.budget = max(sizes)
            return self._dropped(sum(sizes), len(sizes))
        self.off = True
        return "prefix reuse off from here on (each candidate runs the whole model, with no hidden states cached)"

    def for_edits(self, splits: Splits, split: str, edits: list[Edit]) -> PrefixStates | None:
        """What an evaluation of ``edits`` (applied together) on ``split`` starts from: the states entering the lowest
        layer they edit, and, where one edit alone sits there, what of that block precedes its matrix."""
        layers = [self.lm.ref(e.name).layer for e in edits]
        lowest = [e.name for e, layer in zip(edits, layers) if layer == min(layers)]
        return self.get(splits, split, min(layers), lowest[0] if len(lowest) == 1 else None)
