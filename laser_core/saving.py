"""Writing what LASER Lab saves: recipe files and edited models, each atomically, in a place checked before the run
that produces it (a wrong folder fails in seconds, not after a search)."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from .card import CARD_FILE, model_card
from .config import Edit
from .errors import ConfigError, LaserError
from .models import LoadedModel

log = logging.getLogger(__name__)
_INT_LIST = re.compile(r"\[\n\s*(-?\d+(?:,\n\s*-?\d+)*)\n\s*\]")  # json's indented list (a string holds no newline)


def recipe_text(recipe: dict, fmt: str = "JSON") -> str:
    """``recipe`` as ``fmt`` ("JSON" or "YAML") text, sorted keys; a list of whole numbers (a block's ranks, a
    clustered edit's row order) on one line, not one number per line."""
    if fmt == "YAML":
        import yaml
        return yaml.safe_dump(recipe, sort_keys=True, default_flow_style=None, width=1 << 20)
    text = json.dumps(recipe, indent=2, sort_keys=True)
    return _INT_LIST.sub(lambda m: "[" + ", ".join(re.split(r",\s*", m.group(1))) + "]", text) + "\n"


def save_recipe(recipe: dict, path: str | Path) -> Path:
    """Write ``recipe`` as YAML (``.yaml``/``.yml``) or JSON (anything else), sorted keys, atomically."""
    path = check_out_file(path)
    text = recipe_text(recipe, "YAML" if path.suffix in (".yaml", ".yml") else "JSON")
    replaced = _replaced(path, recipe)
    _write_whole(path, text, "the recipe")
    if replaced:  # a search's recipe has one name per task, method and model: another run's would be gone unsaid
        log.warning("%s held another recipe (%s: other settings, data or model); it is replaced. Where the search "
                    "that made it used the cache, running it again writes it back in seconds; --recipe-out FILE keeps "
                    "a search's recipe apart", path, replaced)
    return path


def _replaced(path: Path, recipe: dict) -> str | None:
    """The edits (and held-out accuracy) of the recipe at ``path``, in words, where ``recipe`` would replace it by
    other edits or ones made on another model or task; None where there is none, or it is the same."""
    from .recipe import load_recipe
    try:
        old = load_recipe(path) if path.is_file() else None
    except ConfigError:  # not a recipe: check_out_file lets it be replaced
        return None
    new = json.loads(json.dumps({k: recipe.get(k) for k in ("edits", "model", "task")}, default=str))  # as read
    if old is None or new == {k: old.get(k) for k in new}:
        return None
    try:
        edits = "; ".join(Edit.of(e).label for e in old["edits"])
    except (KeyError, TypeError, ValueError, LaserError):  # a malformed edit: said where the recipe is used
        edits = f"{len(old['edits'])} edits"
    test = (old.get("metrics") or {}).get("edited_test") or {}
    return edits + (f", held-out accuracy {test['accuracy']:.3f}" if isinstance(test.get("accuracy"), float) else "")


RECIPE_FILE = "laser_recipe.json"  # beside every model LASER Lab saves; what marks a folder it may overwrite


def _write_whole(path: Path, text: str, what: str) -> None:
    """``text`` into ``path`` through a temporary file beside it and one rename, so a failed write leaves no half
    file; ``ConfigError`` naming ``what`` where it cannot be written (a full disk)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"could not write {what} to {path}: {e.strerror or e}") from e


def json_text(data) -> str:
    """``data`` as indented JSON with sorted keys (what is not JSON, as text): a search's report, as ``search
    --report-out`` writes it and Explore downloads it."""
    return json.dumps(data, indent=1, sort_keys=True, default=str)


def save_json(data, path: str | Path) -> Path:
    """:func:`json_text` of ``data`` at ``path`` (checked as :func:`check_out_file` checks it), written whole or not
    at all: a search's report (``search --report-out``)."""
    out = check_out_file(path)
    _write_whole(out, json_text(data), "the report")
    return out


def check_out_folder(out: str | Path, overwrite: bool = False, source: str | None = None) -> Path:
    """The absolute path a model is to be saved to, once it is known that it can be: ``ConfigError`` where ``out``
    is or holds the model ``source`` being edited, exists (unless ``overwrite``, which replaces only an empty
    folder or one LASER Lab saved a model into: anything else would be deleted), lies under a file, or its
    nearest existing folder cannot be written."""
    out = Path(out).expanduser().resolve()
    src = Path(source).expanduser() if source else None
    if src is not None and src.exists() and (src.resolve() == out or out in src.resolve().parents):
        raise ConfigError(f"{out} holds the model being edited ({src.resolve()}); save the edited model to another "
                          "folder, so that the original stays")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another folder or pass --overwrite")
    if out.exists() and not (out.is_dir() and ((out / RECIPE_FILE).is_file() or not any(out.iterdir()))):
        raise ConfigError(f"{out} is not a model folder saved by LASER Lab (it has no {RECIPE_FILE}), so overwrite "
                          "leaves it as it is: replacing it would delete what it holds; choose another folder")
    return _check_parent(out)


def check_out_file(path: str | Path) -> Path:
    """The absolute path of a file to be written at the end of a run (a recipe, a report's JSON): ``ConfigError``
    now, not after the run, where it is a folder, a read-only file, lies under a file or cannot be created."""
    out = Path(path).expanduser().resolve()
    if out.is_dir():
        raise ConfigError(f"cannot save to {out}: it is a folder; give a file name")
    if out.exists() and not os.access(out, os.W_OK):
        raise ConfigError(f"cannot save to {out}: the file is read-only; choose another file")
    return _check_parent(out)


def _check_parent(out: Path) -> Path:
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot save to {out}: {parent} is a file, not a folder")
    try:  # os.access alone says yes to root where no file can be made (/proc, a read-only mount)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OSError
        tempfile.TemporaryFile(dir=parent).close()
    except OSError:
        raise ConfigError(f"cannot save to {out}: {parent} is not writable; choose another folder") from None
    return out


def save_model_atomic(lm: LoadedModel, out: str | Path, recipe: dict, overwrite: bool = False) -> Path:
    """``save_pretrained`` (safetensors) + tokenizer + ``laser_recipe.json`` + a model card (``README.md``, see
    :func:`laser_core.card.model_card`) into ``out`` via a temp folder and one rename, so an interrupted save never
    leaves a half model. Refuses an existing ``out`` unless ``overwrite``, and the folder of the model itself (see
    :func:`check_out_folder`); a write that fails (a full disk) is a ``ConfigError`` too."""
    out = check_out_folder(out, overwrite, lm.spec.source)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as e:
        raise ConfigError(f"cannot save to {out}: {e.strerror or e}") from e
    try:
        lm.model.save_pretrained(tmp, safe_serialization=True)
        lm.tokenizer.save_pretrained(tmp)
        save_recipe(recipe, tmp / RECIPE_FILE)
        (tmp / CARD_FILE).write_text(model_card(recipe))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise ConfigError(f"could not save the edited model to {out} (nothing was left there): "
                              f"{e.strerror or e}") from e
        raise
    return out
