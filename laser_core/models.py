"""Load models (demo, local folder, .gguf, cached hub id) as a ``LoadedModel``: the model, its tokenizer, its block
matrices (located by :mod:`laser_core.matrices`) and its fingerprint."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .config import ModelSpec, canonical_json
from .errors import ModelLoadError
from .hub import hub_unreachable
from .matrices import TYPE_ORDER, MatrixRef, locate_matrices
from .memory import memory_explained

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """The project cache folder (``$LASER_LAB_CACHE`` or ``<repo>/cache``)."""
    return Path(os.environ.get("LASER_LAB_CACHE", Path(__file__).resolve().parent.parent / "cache"))


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(device: str) -> torch.device:
    """Map "auto" to cuda, then mps, then cpu; check that an explicit device exists."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                             f"GPU(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if dev.type == "mps" and not _mps_available():
        raise ModelLoadError(f"device {device!r} asked for, but no Apple GPU (MPS) is available; use --device cpu")
    return dev


@dataclass
class LoadedModel:
    """A model with its tokenizer, matrices, fingerprint and the lock that serialises edits."""

    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    kind: str  # "causal" or "masked"
    matrices: list[MatrixRef]
    fingerprint: str
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    prompt_sharing: bool | None = field(default=None, repr=False)  # probed once by forward.prompt_sharing_ok
    lean_block: bool | None = field(default=None, repr=False)  # probed once by forward.lean_block_ok
    lead_sharing: bool | None = field(default=None, repr=False)  # probed once by forward.lead_sharing_ok
    eval_tokens: int | None = field(default=None, repr=False)  # an evaluation's batch size once one ran out of memory

    def batch_tokens(self, max_tokens: int) -> int:
        """``max_tokens``, or fewer where an evaluation of this model ran out of memory in larger batches
        (``eval_tokens``, set by :func:`~laser_core.evaluate.evaluate`): every batching of its examples after it."""
        return min(max_tokens, self.eval_tokens or max_tokens)

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks (highest located layer index + 1)."""
        return max(r.layer for r in self.matrices) + 1

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_limit(self) -> int | None:
        """The most token positions the model has (None where its config names no limit): past it, learned position
        embeddings (GPT-2, BERT) fail with an index error, and rotary ones run where the model was never trained."""
        cfg = self.model.config
        n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        if n and getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            n -= (cfg.pad_token_id or 0) + 1  # their positions are numbered from after the padding index
        return n

    @property
    def pad_id(self) -> int:
        """The token id that fills padded positions (masked out, so any id would do; the tokenizer's if it has one)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else 0

    @property
    def machine(self) -> str:
        """The device in words, for benchmark and report output: the GPU's name, or the CPU and its threads."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        import platform

        return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"

    def ref(self, name: str) -> MatrixRef:
        """The ``MatrixRef`` of parameter ``name`` (ConfigError if the model has no such matrix)."""
        for r in self.matrices:
            if r.name == name:
                return r
        from .errors import ConfigError
        raise ConfigError(f"the model has no block matrix named {name!r} "
                          f"(e.g. {self.matrices[0].name!r}); is the recipe for another model?")

    def facts(self) -> dict:
        """Architecture, layer/matrix/parameter counts, device and dtype, for display."""
        cfg = self.model.config
        return {
            "architecture": type(self.model).__name__,
            "model_type": getattr(cfg, "model_type", "?"),
            "layers": self.n_layers,
            "matrices": len(self.matrices),
            "matrix_types": sorted({r.type for r in self.matrices}, key=lambda t: (TYPE_ORDER + [t]).index(t)),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "weights_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters()),
            "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "fingerprint": self.fingerprint,
        }


def weight_hashes(model: torch.nn.Module) -> dict[str, str]:
    """sha256 of every parameter and buffer, by name (bit-exact identity of the weights)."""
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        data = t.detach().contiguous().cpu().reshape(-1)  # a 0-d tensor (Gemma's scale) cannot be viewed as bytes
        out[name] = hashlib.sha256(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"").hexdigest()
    return out


# Where a model was loaded from and which transformers version wrote its config are not what the model is: the
# same weights in another folder (a moved or re-cloned repository, a copied cache, a recipe applied on another
# machine) keep their cached results and recipes.
_NOT_IDENTITY = frozenset({"_name_or_path", "transformers_version", "_commit_hash"})


def _identity_config(d):
    """A config dict without the ``_NOT_IDENTITY`` keys, nested configs (e.g. a ``text_config``) included."""
    if isinstance(d, dict):
        return {k: _identity_config(v) for k, v in d.items() if k not in _NOT_IDENTITY}
    return d


def weights_fingerprint(model: torch.nn.Module) -> str:
    """One short hash over the config (less where it was loaded from) and every weight: the model's identity for
    caches and recipes."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    text = canonical_json(_identity_config(json.loads(cfg.to_json_string(use_diff=False)))) \
        if cfg is not None else type(model).__name__
    h.update(text.encode())
    for name, t in model.state_dict().items():
        data = t.detach().contiguous().cpu().reshape(-1)  # the same bytes; a 0-d tensor has no byte view
        h.update(name.encode())
        h.update(str(data.dtype).encode())
        if data.numel():
            h.update(data.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _is_hub_id(text: str) -> bool:
    """Is ``text`` a valid hub model id ("owner/name" or "name")? A path such as "./model" or "~/m" is not."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any failure means "not in cache"
        return False


def load_model(spec: ModelSpec, progress=None, make_room: Callable[[], None] | None = None) -> LoadedModel:
    """Load ``spec.source`` onto ``spec.device`` in ``spec.dtype`` and locate its matrices.

    Sources: "demo"; a local HF model folder; a ``.gguf`` file; a hub id already in the local HF cache.

    ``make_room``: called once the device, the source and its config have been checked, just before the weights
    load (a caller keeping other models drops some there; a source that fails those checks drops nothing).

    Raises:
        ModelLoadError: with a message naming the path or id and what to do.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    dtype = getattr(torch, spec.dtype)
    device = resolve_device(spec.device)
    if device.type == "cpu" and dtype != torch.float32:
        log.warning("%s on the CPU: its matrix products run about 100x slower than float32's here, so every "
                    "evaluation does too; use float32 on a CPU", spec.dtype)
    src = str(spec.source).strip()
    kwargs: dict = {}
    if src == "demo":
        from .demo import ensure_demo_model
        path = str(ensure_demo_model(progress))
    elif src.endswith(".gguf"):
        p = Path(src).expanduser()
        if not p.is_file():
            raise ModelLoadError(f"GGUF file not found: {p}")
        path, kwargs = str(p.parent), {"gguf_file": p.name}
    elif Path(src).expanduser().exists():
        p = Path(src).expanduser()
        if not p.is_dir():
            raise ModelLoadError(f"{p} is a file, not a model folder (give a folder with config.json, or a .gguf)")
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{p} is not a Hugging Face model folder: it has no config.json")
        path = str(p)
    elif _is_hub_id(src):  # owner/name, or a name without owner ("gpt2", "roberta-base")
        offline = hub_unreachable()
        if offline and not _hub_cached(src):
            raise ModelLoadError(f"hub model {src!r} is not in the local Hugging Face cache and cannot be downloaded: "
                                 f"{offline}. Download it once with network access, or give a local folder "
                                 f"(there is no folder {src!r} here).")
        path, kwargs = src, ({"local_files_only": True} if offline else {})
    else:
        raise ModelLoadError(f"model not found: there is no folder {src!r} here, and it is neither 'demo', a .gguf "
                             "file nor a hub id (owner/name, or a name such as gpt2)")
    if progress:
        progress(f"loading {src}")
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except OSError as e:
        if not Path(path).exists():
            raise ModelLoadError(
                f"hub model {src!r} is not in the local Hugging Face cache and could not be downloaded "
                f"(offline, gated, or no such model?). Download it once with network access, or give a local folder "
                f"(there is no folder {src!r} here). transformers says: {' '.join(str(e).split())[:300]}") from e
        raise ModelLoadError(f"cannot read the config of {src}: {e}") from e
    except Exception as e:  # noqa: BLE001 - a corrupt config.json or .gguf fails in many ways
        what = "GGUF file" if "gguf_file" in kwargs else "config.json"
        raise ModelLoadError(f"cannot read the {what} of {src} (corrupt or not a model file?): "
                             f"{type(e).__name__}: {str(e)[:200]}") from e
    archs = getattr(config, "architectures", None) or []
    kind = "masked" if any("MaskedLM" in a for a in archs) or config.model_type in ("bert", "roberta", "xlm-roberta") else "causal"
    loader = AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM
    if make_room:
        make_room()
    try:
        model = loader.from_pretrained(path, dtype=dtype, **kwargs)
    except ValueError as e:
        raise ModelLoadError(f"{src} is not a language model LASER Lab can use "
                             f"(no causal or masked LM head for {config.model_type}): {e}") from e
    except (OSError, RuntimeError, Exception) as e:  # noqa: BLE001 - corrupt files surface in many types
        raise ModelLoadError(f"could not load the weights of {src}: {type(e).__name__}: {str(e)[:300]}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - a missing or broken tokenizer fails in many ways
        raise ModelLoadError(f"could not load the tokenizer of {src} (a model folder needs its tokenizer files, "
                             f"e.g. tokenizer.json): {type(e).__name__}: {' '.join(str(e).split())[:200]}") from e
    with memory_explained(f"moving {src} to {device}"):
        model = model.to(device)
    return _wrap(model, tokenizer, spec, kind)


def from_module(model: torch.nn.Module, tokenizer, spec: ModelSpec | None = None) -> LoadedModel:
    """Wrap an already-built model and tokenizer (tests, notebooks) as a ``LoadedModel``."""
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    kind = "masked" if any("MaskedLM" in a for a in archs) else "causal"
    return _wrap(model, tokenizer, spec or ModelSpec(source=f"<{type(model).__name__}>"), kind)


def _wrap(model: torch.nn.Module, tokenizer, spec: ModelSpec, kind: str) -> LoadedModel:
    """Freeze ``model`` for inference, give the tokenizer a pad token, and locate and fingerprint the matrices."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return LoadedModel(model, tokenizer, spec, kind, locate_matrices(model), weights_fingerprint(model))
