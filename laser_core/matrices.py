"""Locate the weight matrices of a model's transformer blocks: which parameter is which layer's q, k, v, o, gate, up or
down matrix, by a table per architecture or a generic pattern, and the matrix ``W`` (out x in) of each."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import ModelLoadError


# Per-architecture tables: regex on the parameter name -> matrix type. ``(\d+)`` is the layer index.
ARCH_TABLES: dict[str, list[tuple[str, str]]] = {
    "llama": [  # model.layers.<i>..., or model.language_model.layers.<i>... in a vision-language model
        (r"model\.(?:language_model\.)?layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight", r"\2"),
        (r"model\.(?:language_model\.)?layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"\2"),
    ],
    "gpt2": [  # Conv1D stores W transposed (in x out)
        (r"transformer\.h\.(\d+)\.attn\.c_attn\.weight", "qkv"),
        (r"transformer\.h\.(\d+)\.attn\.c_proj\.weight", "o"),
        (r"transformer\.h\.(\d+)\.mlp\.c_fc\.weight", "up"),
        (r"transformer\.h\.(\d+)\.mlp\.c_proj\.weight", "down"),
    ],
    "gptj": [
        (r"transformer\.h\.(\d+)\.attn\.(q|k|v)_proj\.weight", r"\2"),
        (r"transformer\.h\.(\d+)\.attn\.out_proj\.weight", "o"),
        (r"transformer\.h\.(\d+)\.mlp\.fc_in\.weight", "up"),
        (r"transformer\.h\.(\d+)\.mlp\.fc_out\.weight", "down"),
    ],
    "gpt_neox": [
        (r"gpt_neox\.layers\.(\d+)\.attention\.query_key_value\.weight", "qkv"),
        (r"gpt_neox\.layers\.(\d+)\.attention\.dense\.weight", "o"),
        (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_h_to_4h\.weight", "up"),
        (r"gpt_neox\.layers\.(\d+)\.mlp\.dense_4h_to_h\.weight", "down"),
    ],
    "roberta": [
        (r"(?:roberta|bert)\.encoder\.layer\.(\d+)\.attention\.self\.query\.weight", "q"),
        (r"(?:roberta|bert)\.encoder\.layer\.(\d+)\.attention\.self\.key\.weight", "k"),
        (r"(?:roberta|bert)\.encoder\.layer\.(\d+)\.attention\.self\.value\.weight", "v"),
        (r"(?:roberta|bert)\.encoder\.layer\.(\d+)\.attention\.output\.dense\.weight", "o"),
        (r"(?:roberta|bert)\.encoder\.layer\.(\d+)\.intermediate\.dense\.weight", "up"),
        (r"(?:roberta|bert)\.encoder\.layer\.(\d+)\.output\.dense\.weight", "down"),
    ],
}
ARCH_ALIASES = {"mistral": "llama", "qwen2": "llama", "qwen3": "llama", "gemma": "llama", "gemma2": "llama",
                "gemma3_text": "llama", "olmo": "llama", "bert": "roberta", "xlm-roberta": "roberta"}
TYPE_ORDER = ["q", "k", "v", "qkv", "o", "gate", "up", "down"]
GENERIC_PATTERN = r"(?:.*\.)?(?:layers|layer|h|blocks|block)\.(\d+)\.(.+)\.weight"


@dataclass(frozen=True)
class MatrixRef:
    """One located weight matrix: ``W`` (out x in) is the parameter, or its transpose when ``transposed``."""

    layer: int
    type: str
    name: str
    shape: tuple[int, int]  # of W (out x in), after undoing any transposition
    transposed: bool = False


def _conv1d_names(model: torch.nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        if type(mod).__name__ == "Conv1D":
            names.add(f"{mod_name}.weight")
    return names


def _language_model_prefix(model: torch.nn.Module) -> str:
    """The parameter-name prefix of the model's language model where it holds other towers ("model.language_model."
    in a vision-language model), else "" (every parameter)."""
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except Exception:  # noqa: BLE001 - a model without one may raise instead of returning None
        return ""
    name = next((n for n, m in model.named_modules() if m is decoder), "") if decoder is not model else ""
    return f"{name}." if name and "language_model" in name.split(".") else ""


def locate_matrices(model: torch.nn.Module) -> list[MatrixRef]:
    """List every 2-D weight of the transformer blocks as ``MatrixRef`` (layer, type, name), in layer order.

    Uses the architecture's table when the model type of its text config has one, else a generic pattern
    (``...layers.<i>.<path>.weight``) whose type is the path inside the block. Only the language model's blocks
    count: a vision-language model (Gemma 3 from 4B up) also has a vision tower with ``encoder.layers.<i>``.

    Raises:
        ModelLoadError: no block matrices were found at all.
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", "") or ""
    table = ARCH_TABLES.get(ARCH_ALIASES.get(model_type, model_type))
    conv1d = _conv1d_names(model)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    scope = _language_model_prefix(model)
    refs: list[MatrixRef] = []
    for name, p in model.named_parameters():
        if p.ndim != 2 or id(p) in embeddings or not name.startswith(scope):
            continue
        mtype = None
        layer = None
        for pattern, repl in table or []:
            m = re.fullmatch(pattern, name)
            if m:
                layer, mtype = int(m.group(1)), m.expand(repl)
                break
        if table is None:
            m = re.fullmatch(GENERIC_PATTERN, name)
            if m:
                layer, mtype = int(m.group(1)), m.group(2)
        if mtype is None:
            continue
        transposed = name in conv1d
        shape = (p.shape[1], p.shape[0]) if transposed else (p.shape[0], p.shape[1])
        refs.append(MatrixRef(layer, mtype, name, tuple(int(s) for s in shape), transposed))
    if not refs:
        raise ModelLoadError(
            f"found no weight matrices in the blocks of this {model_type or type(model).__name__} model; "
            "it has no '<...>.layers.<i>.<...>.weight' parameters to reduce")
    order = {t: i for i, t in enumerate(TYPE_ORDER)}
    refs.sort(key=lambda r: (r.layer, order.get(r.type, len(order)), r.type))
    return refs


def matrix_of(param: torch.Tensor, ref: MatrixRef) -> torch.Tensor:
    """The matrix W (out x in) as a view of ``param``."""
    return param.t() if ref.transposed else param
