"""Recipes: a versioned JSON/YAML record of edits that re-applies them to the model and saves the result."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from .candidates import result_row
from .config import CONTIGUOUS, Edit, ModelSpec, SearchConfig, TaskSpec, check_one_per_matrix, read_text, to_dict
from .errors import ConfigError, LaserError
from .grouping import check_row_order
from .models import LoadedModel, load_model
from .reduction import edit_row_order, reduced_weight
from .saving import check_out_folder, save_model_atomic
from .significance import change_between

log = logging.getLogger(__name__)
RECIPE_VERSION = 2  # the newest this reads. 2: an edit may group its rows otherwise than contiguously; only such a
# recipe is written as 2 (older versions refuse it rather than reduce other blocks), any other as 1, read by all


def library_versions() -> dict[str, str]:
    import transformers

    from . import __version__
    return {"laser_core": str(__version__), "torch": str(torch.__version__), "transformers": str(transformers.__version__)}


def make_recipe(lm: LoadedModel, edits: list[Edit], task: TaskSpec | None = None, metrics: dict | None = None,
                method: str | None = None, search: dict | None = None) -> dict:
    """A recipe dict: model spec + fingerprint, task + split + seed, edits with layer/type/ranks (and, for rows grouped
    otherwise than contiguously, the ``row_order`` of the blocks: see :func:`recipe_row_orders`), metrics, and
    ``search``: the settings of the search that found the edit (``SearchConfig`` as a dict), where one did."""
    rows = []
    for e in edits:
        rows.append(result_row(lm, e))  # as a search's result says it: grouping where not contiguous
        if e.grouping != CONTIGUOUS:  # its blocks as found here, so that apply reduces these on any device
            rows[-1]["row_order"] = edit_row_order(lm, e)
    version = 2 if any(e.grouping != CONTIGUOUS for e in edits) else 1
    return {"laser_lab_recipe": version, "model": {**to_dict(lm.spec), "fingerprint": lm.fingerprint},
            "task": to_dict(task) if task else None, "method": method, "edits": rows, "metrics": metrics or {},
            **({"search": search} if search else {}), "versions": library_versions()}


def recipe_from_report(lm: LoadedModel, report, task: TaskSpec) -> dict:
    """The recipe of a search report's best edit, with base vs edited metrics on search and test splits."""
    edit = report.best_edit()
    if edit is None:
        raise LaserError("the search evaluated no candidate, so there is no edit to export")
    metrics = recipe_metrics(report.search_split, report.base, report.best, report.base_test, report.best_test)
    return make_recipe(lm, [edit], task, metrics, method=report.method, search=report.config)


def recipe_metrics(search_split: str, base: dict | None, edited: dict | None, base_test: dict | None = None,
                   edited_test: dict | None = None, other_tasks: list[dict] | None = None) -> dict:
    """A recipe's ``metrics``: accuracy, log-loss and size of each evaluation given (None where not computed),
    base and edited on the split the search scored, and on held-out test (what ``apply`` re-checks), with the
    paired held-out change (questions fixed and broken, its 95% interval and p-value; see ``significance``). An
    evaluation stopped early counts as not computed: its accuracy counts only the examples it saw. ``other_tasks``:
    the edit on other tasks' held-out test (``other_tasks.effects_metrics``), where measured."""
    def pick(d: dict | None) -> dict | None:
        if d is None or d.get("stopped_early"):
            return None
        return {"accuracy": d["accuracy"], "log_loss": d["log_loss"], "n": d["n"]}
    change = change_between(base_test, edited_test)
    out = {"search_split": search_split, "base": pick(base), "edited": pick(edited),
           "base_test": pick(base_test), "edited_test": pick(edited_test),
           "held_out_change": change.to_dict() if change else None}
    return {**out, "other_tasks": other_tasks} if other_tasks else out


def load_recipe(path: str | Path) -> dict:
    """Read and validate a recipe file. Raises ConfigError naming what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    text = read_text(path, ConfigError)
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            recipe = yaml.safe_load(text)
        else:
            recipe = json.loads(text)
    except Exception as e:  # noqa: BLE001 - yaml and json raise different types
        raise ConfigError(f"{path} is not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'JSON'}: {e}") from e
    if not isinstance(recipe, dict) or "laser_lab_recipe" not in recipe:
        raise ConfigError(f"{path} is not a LASER Lab recipe (no 'laser_lab_recipe' version field)")
    if not isinstance(recipe["laser_lab_recipe"], int):
        raise ConfigError(f"{path}: the recipe version must be a whole number, got {recipe['laser_lab_recipe']!r}")
    if recipe["laser_lab_recipe"] > RECIPE_VERSION:
        raise ConfigError(f"{path} was written by a newer LASER Lab (recipe v{recipe['laser_lab_recipe']}); upgrade")
    if not isinstance(recipe.get("edits"), list) or not recipe["edits"]:
        raise ConfigError(f"{path} has no edits")
    recipe_row_orders(None, recipe)  # validates K, rho and row orders (their lengths once a model is loaded)
    if not isinstance(recipe.get("model"), dict) or not isinstance(recipe["model"].get("source"), str):
        raise ConfigError(f"{path} names no model: it needs a 'model' with the 'source' its edits were found on")
    return recipe


def recipe_model(recipe: dict) -> ModelSpec:
    """The model spec a recipe was made on (its source, device and dtype)."""
    return ModelSpec(**{k: v for k, v in recipe["model"].items() if k in ("source", "device", "dtype")})


def recipe_search(recipe: dict) -> SearchConfig | None:
    """The settings of the search that found a recipe's edits; None where it records none (a recipe from before
    they were recorded, a composition, a hand-written one) or settings this version cannot read."""
    try:
        return SearchConfig(**recipe["search"]) if isinstance(recipe.get("search"), dict) else None
    except (TypeError, ConfigError):
        return None


def recipe_task(recipe: dict) -> TaskSpec | None:
    """The task spec a recipe was made on, or None where it names none. A field the recipe lacks takes its default:
    a recipe written before the field existed was made with it (the answer match, the answer base). Before, such a
    recipe's task was compared as written, and the dashboard took it for another task than the same one loaded.

    Raises:
        ConfigError: a field this version does not know, or a bad value (with the field named).
    """
    task = recipe.get("task")
    if not task:
        return None
    unknown = sorted(set(task) - {f.name for f in dataclasses.fields(TaskSpec)})
    if unknown:
        raise ConfigError(f"the recipe's task has fields this LASER Lab does not know: {', '.join(unknown)}; upgrade")
    return TaskSpec(**task)


def compose_recipes(recipes: list[dict], sources: list[str] | None = None) -> dict:
    """One recipe that applies the edits of all ``recipes`` together, as LASER composes reductions of several
    matrices. Its edits are measured together by ``eval --recipe`` (held-out test against the base) or the
    dashboard's recipe check: what edits do together is not what each did alone, so it carries no metrics. Its
    task is theirs where they name the same one (defaults filled, see :func:`recipe_task`), else none.

    Raises:
        ConfigError: fewer than two recipes, recipes of models with other weights (fingerprints), or two edits of
            one matrix.
    """
    if len(recipes) < 2:
        raise ConfigError("compose needs at least two recipes")
    prints = [r["model"].get("fingerprint") for r in recipes]
    if len(set(prints)) > 1:
        raise ConfigError(f"the recipes were made on models with other weights (fingerprints "
                          f"{', '.join(map(str, prints))}); compose recipes of one model")
    check_one_per_matrix([e for r in recipes for e in recipe_edits(r)])
    tasks = [recipe_task(r) for r in recipes]
    return {"laser_lab_recipe": max(r["laser_lab_recipe"] for r in recipes), "model": recipes[0]["model"],
            "task": to_dict(tasks[0]) if tasks[0] is not None and all(t == tasks[0] for t in tasks) else None,
            "method": "composed", "edits": [row for r in recipes for row in r["edits"]], "metrics": {},
            "composed_from": list(sources) if sources else None, "versions": library_versions()}


def recipe_edits(recipe: dict) -> list[Edit]:
    """The recipe's edits as ``Edit`` objects (validated)."""
    try:
        edits = [Edit.of(e) for e in recipe["edits"]]
    except (KeyError, TypeError) as e:
        raise ConfigError(f"a recipe edit lacks a field: {e}") from e
    return check_one_per_matrix(edits)


def recipe_row_orders(lm: LoadedModel | None, recipe: dict) -> dict[str, torch.Tensor]:
    """The row order each edit with clustered (not contiguous) blocks records, by matrix: its blocks are the
    consecutive runs of the contiguous blocks' sizes (see :mod:`laser_core.grouping`). A recipe written before
    LASER Lab recorded them has none: its blocks are clustered again where it is used.

    Raises:
        ConfigError: an order that does not list each row of its matrix (of ``lm``'s; without a model, of as many rows
            as it lists) once, or one given for contiguous blocks.
    """
    orders = {}
    for row, e in zip(recipe["edits"], recipe_edits(recipe)):
        order = row.get("row_order")
        if order is None:
            continue
        if e.grouping == CONTIGUOUS:
            raise ConfigError(f"the recipe's edit of {e.name} gives a row order, but its K={e.k} blocks are contiguous")
        rows = lm.ref(e.name).shape[0] if lm is not None else len(order) if isinstance(order, list) else 0
        orders[e.name] = check_row_order(order, rows, f"the recipe's edit of {e.name}")
    return orders


def check_recipe_fits(lm: LoadedModel, recipe: dict, force: bool = False, same_blocks: bool = True) -> list[Edit]:
    """Check that every edit names a matrix of ``lm`` and that the fingerprints agree (unless ``force``); and, with
    ``same_blocks`` (where the edits are to be reduced as this machine groups the rows: an evaluation), that each
    recorded row order is the one the grouping gives here. Clustering compares floating-point sums, which another
    device or library version may round otherwise, moving a row near a tie; ``apply`` reduces the recorded blocks."""
    edits = recipe_edits(recipe)
    for e in edits:
        lm.ref(e.name)
    want = (recipe.get("model") or {}).get("fingerprint")
    if want and want != lm.fingerprint and not force:
        raise ConfigError(f"the recipe was made on a model with fingerprint {want}, but this model's is "
                          f"{lm.fingerprint}; apply it to the same weights, or pass --force")
    orders = recipe_row_orders(lm, recipe)
    for e in edits if same_blocks else ():
        if e.name in orders and orders[e.name].tolist() != edit_row_order(lm, e):
            raise ConfigError(f"the recipe's {e.grouping} blocks of {e.name} are not those this machine groups its "
                              "rows into (a row near a tie, rounded otherwise); apply reduces the recipe's own blocks: "
                              "apply it (python -m laser_core apply --recipe <file> --out <folder>), then evaluate the "
                              "saved model (eval --model <folder>, or load it here as a local folder)")
    return edits


def apply_edits_permanently(lm: LoadedModel, edits: list[Edit], orders: dict[str, torch.Tensor] | None = None) -> None:
    """Write the reduced weights into ``lm.model`` for good (only for a model about to be saved); an edit whose matrix
    has a row order in ``orders`` (a recipe's, see :func:`recipe_row_orders`) reduces the blocks it gives."""
    params = dict(lm.model.named_parameters())
    edits = check_one_per_matrix(edits)
    with lm.lock, torch.no_grad():
        new = {e.name: reduced_weight(lm, e, rows=(orders or {}).get(e.name)) for e in edits}
        for name, value in new.items():
            params[name].copy_(value)


def matches_recorded(accuracy: float, recorded: dict) -> bool:
    """Whether ``accuracy`` is the one a recipe's ``metrics`` entry ``recorded`` (same weights, same examples)."""
    return abs(accuracy - recorded["accuracy"]) < 1e-9


def apply_recipe(recipe: dict, out: str | Path, model: ModelSpec | None = None, overwrite: bool = False,
                 force: bool = False, check: bool = True, progress=None) -> dict[str, Any]:
    """Load the recipe's model (or ``model``), apply its edits, optionally re-check the edited accuracy on
    the recipe's test split, and save the edited model to ``out``. Returns {"out", "check"}.

    The loaded copy is private to this call, so no shared model is ever left edited.
    """
    spec = model or recipe_model(recipe)
    out_path = check_out_folder(out, overwrite, spec.source)  # before the model load and the check (minutes)
    tspec = recipe_task(recipe)  # before the model load: a bad task fails in seconds
    lm = load_model(spec, progress)
    edits = check_recipe_fits(lm, recipe, force, same_blocks=False)
    orders = recipe_row_orders(lm, recipe)
    for e in edits:
        if e.grouping != CONTIGUOUS and e.name not in orders:
            log.warning("the recipe records no row order for %s (it was written before LASER Lab recorded them): its "
                        "%s blocks are found again here", e.name, e.grouping)
    apply_edits_permanently(lm, edits, orders)
    result = {"check": None}
    if check and tspec is not None:
        from .candidates import evaluate_split
        from .tasks import load_task, make_splits

        splits = make_splits(load_task(tspec), tspec)
        res = evaluate_split(lm, splits, "test")
        want = (recipe.get("metrics") or {}).get("edited_test")
        result["check"] = {"accuracy": res.accuracy, "log_loss": res.log_loss, "expected": want,
                           "matches": want is None or matches_recorded(res.accuracy, want)}
    result["out"] = str(save_model_atomic(lm, out_path, recipe, overwrite))
    return result
