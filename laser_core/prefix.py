"""Prefix reuse plumbing: find a model's block list, capture the input of one block, run from one block on.

An edit at layer l cannot change the hidden states entering block l, so they are captured once from the
unedited model and a candidate is evaluated by running blocks l..L only. The earlier blocks are removed
from the ModuleList for the call; masks and positions are still built by the model's own forward.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

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
    fed to block ``layer`` in place of its computed input. Masks and positions are still made by the model."""
    parent, attr, blocks = block_list(lm)
    handle = blocks[layer].register_forward_pre_hook(_replace_first_arg(states), with_kwargs=True)
    setattr(parent, attr, torch.nn.ModuleList(list(blocks)[layer:]))
    try:
        yield
    finally:
        setattr(parent, attr, blocks)
        handle.remove()
