"""The command line's flags: the parser of every subcommand, and the specs and search settings that flags name and
back (the dashboard prints the command that repeats what it ran)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .answers import MATCH_HELP, MATCH_RULES
from .config import CONTIGUOUS, PAPER_KS, PAPER_RHOS, ModelSpec, SearchConfig, TaskSpec
from .grouping import GROUPING_HELP, GROUPINGS


def _ints(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(","):
        try:
            if "-" in part.strip()[1:]:
                a, b = part.split("-", 1)
                if int(b) < int(a):
                    raise argparse.ArgumentTypeError(f"the range {part.strip()} is empty: write the lower number first")
                out.extend(range(int(a), int(b) + 1))
            elif part.strip():
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part.strip()!r} is not a whole number: give numbers separated by "
                                             "commas, e.g. 1,2,4 (ranges as 20-29)") from None
    return tuple(out)


def recipe_path(args: argparse.Namespace, task: str, method: str, grouping: str, fingerprint: str) -> Path:
    """Where a search writes its recipe: ``--recipe-out``, else ``recipes/`` in the project cache folder
    (``$LASER_LAB_CACHE`` or ``<repo>/cache``), or in ``DIR`` for ``--cache-dir DIR``, named by task, method, row
    grouping where not contiguous and model (``fever-c2i-1e7195bf.json``)."""
    from .models import cache_root
    if args.recipe_out:
        return Path(args.recipe_out)
    folder = Path(args.cache_dir) / "recipes" if args.cache_dir and not args.no_cache else cache_root() / "recipes"
    return folder / "-".join([task, method] + [grouping] * (grouping != CONTIGUOUS) + [f"{fingerprint[:8]}.json"])


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers: give them separated by commas, "
                                         "e.g. 0.5,0.1") from None


def parser() -> argparse.ArgumentParser:
    """The parser of ``python -m laser_core`` and its subcommands."""
    p = argparse.ArgumentParser(prog="python -m laser_core", description="Gradient-guided low-rank reduction (C2I) and LASER.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser, task: bool = True) -> None:
        g = sp.add_argument_group("model")
        g.add_argument("--model", default="demo", help="'demo', a model folder, a .gguf file or a cached hub id")
        g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
        g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="weights' dtype (default float32; on a CPU keep it: bf16 matmul is ~100x slower)")
        g.add_argument("--cache-dir", default=None, help="cache folder (default: <repo>/cache/store)")
        g.add_argument("--no-cache", action="store_true", help="compute everything, store nothing")
        if task:
            t = sp.add_argument_group("task")
            t.add_argument("--task", default="fever", help="bundled name (fever, epistemic_reasoning, qa_wikidata, "
                                                           "truthful_qa), a BIG-bench task.json or its folder, .jsonl, .csv, "
                                                           "a .json array of records, .tsv, .parquet, hf:<dataset>[:<split>] "
                                                           "or hf:<dataset>:<config>:<split>")
            t.add_argument("--n-calib", type=int, default=100, help="calibration examples: gradients and C2I's search (default 100)")
            t.add_argument("--n-test", type=int, default=300, help="held-out test examples, never searched on (default 300)")
            t.add_argument("--n-val", type=int, default=None, help="LASER validation size (default 20%% of the task)")
            t.add_argument("--seed", type=int, default=0, help="shuffles the task before it is split (default 0)")
            t.add_argument("--prompt-col", default="prompt", help="JSONL/CSV/HF column of the prompt (default prompt)")
            t.add_argument("--choices-col", default="choices", help="column of the answer choices, or several columns of one "
                           "choice each, e.g. sol1,sol2 (PIQA) (default choices)")
            t.add_argument("--answer-col", default="answer", help="column of the correct choice: its index or text (default answer)")
            t.add_argument("--answer-base", type=int, choices=(0, 1), default=0,
                           help="the index the answer column gives the first choice: 0 (default), or 1 for sets that "
                                "count from 1 (Winogrande, Social IQa)")
            t.add_argument("--targets-col", default="targets", help="column of accepted answers for generation tasks (default targets)")
            t.add_argument("--max-new-tokens", type=int, default=TaskSpec.max_new_tokens,
                           help="generation tasks: tokens decoded per answer; an answer longer than this is never "
                                "right (default %(default)s)")
            t.add_argument("--match", choices=tuple(MATCH_RULES), default=TaskSpec.match,
                           help=f"generation tasks: when an answer is right. {MATCH_HELP}")
            t.add_argument("--shots", type=int, default=TaskSpec.shots,
                           help="few-shot: this many solved examples, drawn with the seed and kept out of every split, "
                                "before every prompt (default %(default)s: zero-shot, as LASER and the paper)")
            t.add_argument("--prompt-template", default="",
                           help="JSONL/CSV/HF: build the prompt from columns, e.g. 'Question: {question}\\nAnswer:' "
                                "(\\n is a line break; default: the prompt column as it is)")
            t.add_argument("--fixed-choices", default="",
                           help="JSONL/CSV/HF: the same choices for every row, e.g. 'no|yes' (BoolQ, SST-2), the answer "
                                "column an index or text of them, or true/false for the second/first of two (default: each row's "
                                "choices column)")

    def speed(sp: argparse.ArgumentParser, which: str) -> None:  # settings that change times, not what is found
        sp.add_argument("--no-prefix-reuse", action="store_true", help=f"run the full forward for every {which}")
        sp.add_argument("--prefix-budget-mb", type=int, default=SearchConfig.prefix_budget_mb,
                        help="memory (on the model's device: RAM, or a GPU's) for prefix reuse's cached hidden "
                             "states; least recently used layers are dropped, the one in use is kept (default "
                             "%(default)s)")
        sp.add_argument("--stack", type=int, default=0,
                        help="candidates of one matrix and K evaluated together in one forward (exact; faster where "
                             "a GPU waits on kernel launches); default 0: 8 on a GPU for a model under 1B parameters, "
                             "else 1 (one at a time)")

    def grid(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--rhos", type=_floats, default=PAPER_RHOS, help="fractions of rank kept, e.g. 0.1,0.01")
        sp.add_argument("--early-stop", action="store_true", help="stop a candidate once it cannot win (exact)")
        speed(sp, "candidate (and every --compose step)")
        sp.add_argument("--recipe-out", default=None, help="where to write the best edit's recipe (.json/.yaml; default: "
                        "cache/recipes/, or DIR/recipes with --cache-dir DIR)")
        sp.add_argument("--report-out", default=None, help="where to write the search's report as JSON: its settings, "
                        "the base, every candidate, the best, the held-out test and the timings (also when cancelled)")
        sp.add_argument("--compose", action="store_true",
                        help="then add other matrices' best edits to the best one, one at a time, keeping each where "
                             "the edits together score better on the search's split (as LASER composes reductions); "
                             "held-out test of the edits kept, and their recipe beside the best's (<recipe>-composed)")
        sp.add_argument("--compose-max", type=_positive, default=None,
                        help="--compose, trying at most this many edits, best alone first (default: every one that "
                             "beats the base alone)")

    def scoring(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--score", default="paper", help="paper | first_order (default paper)")
        sp.add_argument("--tail-fraction", type=float, default=SearchConfig.tail_fraction,
                        help="paper score: trailing share of each spectrum that is summed (default %(default)s)")

    sp = sub.add_parser("scores", help="singular-value gradient scores of every matrix")
    common(sp)
    scoring(sp)
    sp.add_argument("--top", type=_positive, default=10,
                    help="how many of the best-scored matrices to print (default 10)")
    sp = sub.add_parser("search", help="C2I: gradient-selected top-q matrices x K x rho on the calibration split")
    common(sp)
    grid(sp)
    sp.add_argument("--q", type=int, default=5, help="how many top-scored matrices to try (default 5)")
    sp.add_argument("--ks", type=_ints, default=PAPER_KS, help="block counts K, e.g. 1,2,4,8 (the default)")
    sp.add_argument("--grouping", default=CONTIGUOUS, choices=list(GROUPINGS),
                    help="how a matrix's rows form its K blocks: " + "; ".join(f"{name}: {text}" for name, text
                                                                           in GROUPING_HELP.items())
                    + " (default contiguous)")
    scoring(sp)
    sp = sub.add_parser("laser", help="LASER baseline: layers x types x rho, K=1, on the validation split")
    common(sp)
    grid(sp)
    sp.add_argument("--layers", type=_ints, default=None, help="e.g. 0-29 or 20,25,29 (default: all)")
    sp.add_argument("--types", type=lambda s: tuple(x for x in s.split(",") if x), default=None,
                    help="e.g. up,down (default: all)")
    sp = sub.add_parser("eval", help="accuracy and log-loss of the model (or a recipe's edit) on a split; a recipe "
                        "on held-out test is compared with the base model")
    common(sp)
    sp.add_argument("--recipe", default=None, help="a recipe (.json/.yaml) whose edit to evaluate (default: the base model)")
    sp.add_argument("--split", default="test", choices=["calib", "val", "test"], help="which split (default test)")
    sp.add_argument("--other-tasks", nargs="?", const="all", default=None, metavar="TASKS",
                    help="with --recipe: also the base model and the recipe on these tasks' held-out test splits "
                         "(comma-separated bundled names or task files, split with this task's sizes and seed), each "
                         "change paired; alone or 'all': every bundled task but --task")
    sp = sub.add_parser("searches", help="the searches in the cache for this model and task side by side (C2I and "
                        "LASER, any settings): time, best edit, its held-out change from the base")
    common(sp)
    sp.add_argument("--forget", type=_positive, default=None, metavar="N",
                    help="take search N (numbered as listed) off the list: its report is deleted from the cache, its "
                         "candidates' results stay (running it again lists it again, from the cache)")
    sp = sub.add_parser("report", help="the paper's Table 1: base, LASER, C2I K=1, C2I K grid on bundled tasks")
    sp.add_argument("--model", default="demo", help="'demo', a model folder, a .gguf file or a cached hub id")
    sp.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    sp.add_argument("--tasks", default="epistemic_reasoning,qa_wikidata,fever,truthful_qa",
                    help="comma-separated bundled tasks (default: all four)")
    sp.add_argument("--quick", action="store_true", help="CPU-sized: smaller grids, LASER on its last layer, extrapolated")
    sp.add_argument("--seed", type=int, default=0, help="shuffles each task before it is split (default 0)")
    sp.add_argument("--n-calib", type=int, default=100, help="calibration examples per task (default 100)")
    sp.add_argument("--n-test", type=int, default=300, help="held-out test examples per task (default 300)")
    sp.add_argument("--json-out", default=None, help="also write the rows as JSON here")
    sp.add_argument("--grouping", default=CONTIGUOUS, choices=list(GROUPINGS),
                    help="clustered: also run C2I's K grid with clustered row blocks, as one more column (default "
                         "contiguous: the paper's columns only)")
    sp.add_argument("--other-tasks", action="store_true",
                    help="then each task's C2I K-grid edit on the other tasks' held-out test splits, as a table of "
                         "changes from their base")
    speed(sp, "candidate of every search, LASER's and C2I's (times without prefix reuse on either side)")
    sp = sub.add_parser("apply", help="apply a recipe and save the edited model (save_pretrained)")
    sp.add_argument("--recipe", required=True, help="the recipe (.json/.yaml) to apply")
    sp.add_argument("--out", required=True, help="folder to write (refused if it exists, unless --overwrite)")
    sp.add_argument("--model", default=None, help="override the recipe's model source")
    sp.add_argument("--device", default=None, help="override the recipe's device: auto | cpu | cuda | cuda:N | mps")
    sp.add_argument("--overwrite", action="store_true", help="replace the --out folder if it exists")
    sp.add_argument("--force", action="store_true", help="apply even if the model fingerprint differs")
    sp.add_argument("--no-check", action="store_true", help="skip re-evaluating the edited model")
    sp = sub.add_parser("compose", help="one recipe applying the edits of several recipes together (each on its own "
                        "matrix); evaluate it with eval --recipe")
    sp.add_argument("recipes", nargs="+", help="the recipes (.json/.yaml) to combine, of one model")
    sp.add_argument("--out", required=True, help="where to write the combined recipe (.json/.yaml)")
    return p


def specs_of(args) -> tuple[ModelSpec, TaskSpec]:
    """The model and task specs that parsed command-line ``args`` name."""
    return ModelSpec(args.model, args.device, args.dtype), \
        TaskSpec(args.task, args.n_calib, args.n_test, args.n_val, args.seed, args.prompt_col, args.choices_col,
                 args.answer_col, args.targets_col, args.max_new_tokens, prompt_template=args.prompt_template,
                 fixed_choices=args.fixed_choices, answer_base=args.answer_base, match=args.match, shots=args.shots)


def spec_args(model: ModelSpec, task: TaskSpec) -> list[str]:
    """Command-line flags that load ``model`` and split ``task`` exactly so (``--model`` and ``--task`` always,
    others where they differ from the default), for a page to print an equivalent command."""
    out = ["--model", model.source]
    out += [x for f in ("device", "dtype") if getattr(model, f) != getattr(ModelSpec, f)
            for x in (f"--{f}", str(getattr(model, f)))]
    out += ["--task", task.source]
    for f in ("n_calib", "n_test", "n_val", "seed", "prompt_col", "choices_col", "answer_col", "targets_col",
              "max_new_tokens", "prompt_template", "fixed_choices", "answer_base", "match", "shots"):
        if getattr(task, f) != getattr(TaskSpec, f):
            out += ["--" + f.replace("_", "-"), str(getattr(task, f))]
    return out


def search_config_of(args, method: str) -> SearchConfig:
    """The search settings that parsed ``search`` (method "c2i") or ``laser`` arguments name."""
    shared = dict(rhos=args.rhos, early_stop=args.early_stop, **speed_of(args))
    if method == "c2i":
        return SearchConfig("c2i", args.score, args.q, args.ks, tail_fraction=args.tail_fraction,
                            grouping=args.grouping, **shared)
    return SearchConfig("laser", ks=(1,), layers=args.layers, types=args.types, **shared)


def speed_of(args) -> dict:
    """The speed-only settings (:data:`laser_core.search.SPEED_ONLY`) that parsed ``search``, ``laser`` or ``report``
    arguments name."""
    return dict(prefix_reuse=not args.no_prefix_reuse, prefix_budget_mb=args.prefix_budget_mb, stack=args.stack)


def command_defaults(method: str) -> SearchConfig:
    """The settings of ``search`` (method "c2i") or ``laser`` run with no grid flags (LASER: whole matrices, K=1)."""
    return SearchConfig("c2i") if method == "c2i" else SearchConfig("laser", ks=(1,))


def search_args(cfg: SearchConfig) -> list[str]:
    """The ``search`` (c2i) or ``laser`` command and its flags that give ``cfg`` back through
    :func:`search_config_of` (flags only where a setting differs from :func:`command_defaults`)."""
    default = command_defaults(cfg.method)
    out = ["search" if cfg.method == "c2i" else "laser"]
    text = {"ks": lambda v: ",".join(map(str, v)), "rhos": lambda v: ",".join(f"{r:g}" for r in v),
            "layers": lambda v: ",".join(map(str, v)), "types": ",".join}
    fields = ("q", "ks", "grouping", "score", "tail_fraction") if cfg.method == "c2i" else ("layers", "types")
    for f in (*fields, "rhos", "prefix_budget_mb", "stack"):
        value = getattr(cfg, f)
        if value != getattr(default, f) and value is not None:
            out += ["--" + f.replace("_", "-"), text.get(f, str)(value)]
    out += ["--early-stop"] * cfg.early_stop + ["--no-prefix-reuse"] * (not cfg.prefix_reuse)
    return out


def search_command(model: ModelSpec, task: TaskSpec, cfg: SearchConfig) -> str:
    """The shell command that runs the search ``cfg`` on ``model`` and ``task`` (as a page or a model card shows it)."""
    import shlex
    return shlex.join(["python", "-m", "laser_core", *search_args(cfg), *spec_args(model, task)])
