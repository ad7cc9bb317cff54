"""Prefix reuse plumbing: find a model's block list, capture the input of one block, run from one block on.

An edit at layer l cannot change the hidden states entering block l, so they are captured once from the
unedited model and a candidate is evaluated by running blocks l..L only. The earlier blocks are removed
from the ModuleList for the call; masks and positions are still built by the model's own forward.

Inside block l, the modules that return before the edited matrix is first called cannot see the edit either:
their outputs are recorded once (``record_until``, ``stubbable``) and returned in place of running them
(``stubbed``). After the last block only the scored positions are read, so its MLP runs at those alone
(``lean_last_block``).

The tokens every sequence of an evaluation starts with (its lead: an instruction, a few-shot preamble) are
run once, alone; each batch then attends to their keys and values (``LeadCache``) instead of re-running them.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from .models import LoadedModel


class StopForward(Exception):
    """Raised by the capture hook: the layers after the captured one need not run."""


def block_list(lm: "LoadedModel") -> tuple[torch.nn.Module, str, torch.nn.ModuleList] | None:
    """(parent module, attribute, ModuleList) holding the transformer blocks, found from the matrix names."""
    ref = lm.matrices[0]
    head, sep, _ = ref.name.partition(f".{ref.layer}.")
    if not sep or "." not in head:
        return None
    parent_path, attr = head.rsplit(".", 1)
    try:
        parent = lm.model.get_submodule(parent_path)
    except AttributeError:
        return None
    blocks = getattr(parent, attr, None)
    return (parent, attr, blocks) if isinstance(blocks, torch.nn.ModuleList) else None


def _replace_first_arg(value: torch.Tensor):
    def hook(module, args, kwargs):
        if args:
            return (value,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": value}
    return hook


def capture_first_arg(store: list):
    def hook(module, args, kwargs):
        store.append((args[0] if args else kwargs["hidden_states"]).detach().clone())
        raise StopForward
    return hook


@contextlib.contextmanager
def from_layer(lm: "LoadedModel", layer: int, states: torch.Tensor):
    """Run the body from block ``layer`` on: earlier blocks are removed for the call and ``states`` are
    fed to block ``layer`` in place of its computed input. Masks and positions are still made by the model.

    Models that mix attention kinds (Gemma 2 and 3, Qwen 2 with sliding layers, ...) pick block i's mask and
    rotary table by ``config.layer_types[i]``, i counted along the list they run: that list is cut at ``layer``
    for the call too, or block ``layer`` would get block 0's kind (on tiny models log-probs moved by up to 0.32).
    """
    parent, attr, blocks = block_list(lm)
    config = getattr(parent, "config", None)
    kinds = getattr(config, "layer_types", None)
    per_block = isinstance(kinds, (list, tuple)) and len(kinds) == len(blocks)
    handle = blocks[layer].register_forward_pre_hook(_replace_first_arg(states), with_kwargs=True)
    setattr(parent, attr, torch.nn.ModuleList(list(blocks)[layer:]))
    if per_block:
        config.layer_types = list(kinds)[layer:]
    try:
        yield
    finally:
        if per_block:
            config.layer_types = kinds
        setattr(parent, attr, blocks)
        handle.remove()


def empty_cache(model: torch.nn.Module):
    """An empty transformers cache of the kind this model's layers fill (one per layer type of its config)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


class LeadCache:
    """Keys and values of the lead, per layer that ran, from one forward of the lead alone (one row)."""

    def __init__(self, length: int, cache) -> None:
        self.length = length
        self.layers = [(i, layer.keys, layer.values) for i, layer in enumerate(cache.layers)
                       if getattr(layer, "is_initialized", False) and layer.keys.numel()]

    def past(self, model: torch.nn.Module, rows: int):
        """A fresh cache holding the lead once per row, as the past of a batch of ``rows`` rows. A lead run as C rows
        (one per stacked candidate, see :mod:`laser_core.stacking`) serves C equal runs of rows, in that order."""
        cache = empty_cache(model)
        for i, keys, values in self.layers:
            if keys.shape[0] > 1:
                keys, values = (x.repeat_interleave(rows // x.shape[0], dim=0) for x in (keys, values))
            cache.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1), i)
        return cache


def tensor_bytes(obj) -> int:
    """Bytes held by the tensors in ``obj`` (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(x) for x in obj.values())
    return 0


def repeated(obj, copies: int):
    """``obj`` (a tensor, or tuples and lists of them, batch first) with its batch ``copies`` times over, one run
    after another: the states of a batch for as many stacked candidates."""
    if copies == 1 or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.repeat(copies, *([1] * (obj.dim() - 1)))
    if isinstance(obj, (tuple, list)):
        return type(obj)(repeated(x, copies) for x in obj)
    if isinstance(obj, dict):
        return {k: repeated(v, copies) for k, v in obj.items()}
    return obj


def _detached(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detached(x) for x in obj)
    return obj


@contextlib.contextmanager
def record_until(block: torch.nn.Module, target: torch.nn.Module, record: dict):
    """While active, a forward through ``block`` fills ``record[submodule name]`` with its call count and,
    once it returned, its output; the first call of ``target`` raises ``StopForward``."""
    names = {m: n for n, m in block.named_modules() if n}

    def pre(module, args, kwargs):
        if module is target:
            raise StopForward
        record.setdefault(names[module], {"calls": 0})["calls"] += 1

    def post(module, args, kwargs, output):
        record[names[module]]["out"] = _detached(output)

    handles = [h for m in names for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
                                           m.register_forward_hook(post, with_kwargs=True))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def stubbable(block: torch.nn.Module, record: dict, min_params: int = 1) -> list[str]:
    """Largest submodules of ``block`` that returned, once, before the target was called (see ``record_until``),
    and hold at least ``min_params`` parameters (lighter ones, such as norms and activations, are cheaper to
    recompute than to keep).

    Their outputs cannot depend on the target's output; modules that were still running (the target's
    ancestors) are searched inside, modules called twice are left alone.
    """
    chosen: list[str] = []

    def walk(module: torch.nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            rec = record.get(name)
            if rec is None:
                continue  # not called before the target
            if "out" not in rec:
                walk(child, name)  # still running when the target was called: it holds the target
            elif rec["calls"] == 1 and sum(p.numel() for p in child.parameters()) >= min_params:
                chosen.append(name)

    walk(block, "")
    return chosen


@contextlib.contextmanager
def forwards_replaced(replacements: list[tuple[torch.nn.Module, Callable]]):
    """Each module runs its given function in place of its forward while active (hooks still run); restored
    afterwards, an instance-level forward (e.g. one a library installed) included."""
    saved = [(module, module.__dict__.get("forward")) for module, _ in replacements]
    for module, forward in replacements:
        module.forward = forward
    try:
        yield
    finally:
        for module, own in reversed(saved):
            if own is None:
                del module.forward
            else:
                module.forward = own


def stubbed(block: torch.nn.Module, outputs: dict):
    """Submodules of ``block`` named in ``outputs`` return their recorded output instead of computing it."""
    return forwards_replaced([(block.get_submodule(name), (lambda value: lambda *args, **kwargs: value)(out))
                              for name, out in outputs.items()])


def last_mlp(lm: "LoadedModel") -> torch.nn.Module | None:
    """The ``mlp`` module of the last block, where blocks have one."""
    found = block_list(lm)
    mlp = getattr(found[2][-1], "mlp", None) if found else None
    return mlp if isinstance(mlp, torch.nn.Module) else None


@contextlib.contextmanager
def lean_last_block(lm: "LoadedModel", flat: torch.Tensor):
    """The last block's MLP runs only at the rows ``flat`` of the flattened (batch * width) positions.

    Only the scored positions of the last block's output are read (by the lean head), and an MLP works per
    position, so the others are left as the residual alone. Models whose blocks have no ``mlp`` run as is.
    """
    mlp = last_mlp(lm)
    if mlp is None:
        yield
        return
    inner = mlp.forward

    def forward(x, *args, **kwargs):
        if x.dim() != 3:
            return inner(x, *args, **kwargs)
        rows = inner(x.reshape(-1, x.shape[-1])[flat], *args, **kwargs)
        out = x.new_zeros((x.shape[0] * x.shape[1], rows.shape[-1]), dtype=rows.dtype).index_copy(0, flat, rows)
        return out.view(x.shape[0], x.shape[1], -1)

    with forwards_replaced([(mlp, forward)]):
        yield
