"""Running out of memory: telling it from other failures, giving back what the allocator holds, and the message a
user reads instead of a traceback.

A GPU's allocator raises ``torch.OutOfMemoryError``; the CPU's a ``RuntimeError`` naming the bytes it could not
allocate (``... can't allocate memory ...``). Either way the model was not left edited (every edit restores its weights on the way out) and what a
search had cached stays, so the message only says what to change.
"""
from __future__ import annotations

import contextlib
import gc
import logging
from typing import Callable, Iterator, TypeVar

import torch

from .errors import OutOfMemory

log = logging.getLogger(__name__)
T = TypeVar("T")
ALLOCATOR_FAILED = ("can't allocate memory", "out of memory")  # a RuntimeError's text: the CPU's allocator, older GPU ones
ADVICE = ("Nothing was left edited and what was cached stays. Free memory (another job or program), or use a smaller "
          "model, bfloat16 on a GPU, or another device (CLI: --dtype, --device; dashboard: Model & task)")
SEARCH_ADVICE = ("A search also keeps hidden states beside the model, to run each candidate from its layer on: give "
                 "them less memory (CLI: --prefix-budget-mb; dashboard: Explore's Speed settings)")


def out_of_memory(e: BaseException) -> bool:
    """Is ``e`` an allocator's failure to find memory (on any device)?"""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and any(
        text in str(e) for text in ALLOCATOR_FAILED))


def free_memory() -> None:
    """Collect what nothing refers to any more and give the GPU allocator's unused blocks back, so that a retry (or the
    next job) starts from what is really in use."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def halving(run: Callable[[int], T], size: int, floor: int, smaller: Callable[[int], None]) -> T:
    """``run(size)``; where it runs out of memory, ``smaller(size // 2)`` (drop what the failed run left, say so),
    give memory back and ``run(size // 2)``, and so on down to ``floor``, below which the allocator's error is
    raised. How a stack of candidates, the gradient step's batches and an evaluation's batches shrink to fit."""
    while True:
        try:
            return run(size)
        except Exception as e:
            if not out_of_memory(e) or size // 2 < floor:
                raise
        size //= 2  # out of the except clause: the failed run's tensors are released with its traceback
        smaller(size)
        free_memory()


def room_made(run: Callable[[], T], give: Callable[[], str | None], doing: str, device: torch.device) -> T:
    """``run()``; where it runs out of memory and ``give()`` frees something (it returns what, in words), give memory
    back, warn (naming what was being done, ``doing``) and run again, until ``give`` has nothing left (None): then
    the allocator's error is raised. How a search's cached states make room for an evaluation or a stack."""
    while True:
        try:
            return run()
        except Exception as e:
            done = give() if out_of_memory(e) else None
            if done is None:
                raise
        free_memory()  # out of the except clause: what the failed run held is no longer referred to
        log.warning("%s ran out of memory on %s: %s", doing, device, done)


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a GPU's memory now; None for a CPU (or another device torch cannot ask)."""
    return torch.cuda.mem_get_info(device) if device.type == "cuda" else None


def human_bytes(n: int) -> str:
    """A size as people read it: 540.8 MiB, 15.21 GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def allocator_says(e: BaseException) -> str:
    """The first sentences of an allocator's message: what it tried to allocate and what was free (torch's CUDA
    message goes on with tuning advice that does not apply here)."""
    text = " ".join(str(e).split())
    return ". ".join(text.split(". ")[:3]).rstrip(".")[:300]


@contextlib.contextmanager
def memory_explained(doing: str, search: bool = False) -> Iterator[None]:
    """Run the block; where it runs out of memory, give back what the allocator caches and raise :class:`OutOfMemory`
    saying what was being done (``doing``), what the allocator said, and what to change (``search``: the block runs a
    search, whose cached states can be given less memory too). Other errors pass unchanged."""
    said = None
    try:
        yield
    except Exception as e:
        if not out_of_memory(e):
            raise
        said = allocator_says(e)
    if said is None:
        return
    free_memory()  # what the failed work held and nothing refers to any more: for the next job
    raise OutOfMemory(f"ran out of memory {doing}: {said}. {ADVICE}." + (f" {SEARCH_ADVICE}." if search else ""))
