"""``python -m laser_core report``: the paper's Table 1 (:mod:`laser_core.report`) printed as it fills in."""
from __future__ import annotations

import json
import sys

from .cli_args import speed_of
from .config import ModelSpec


def cmd_report(args) -> int:
    """``report``: the table, each task's row as it finishes (and its JSON saved), the whole at the end; after a
    Ctrl-C, the table of the tasks that finished."""
    from .report import paper_table  # here, as the CLI's other commands import theirs: --help stays quick
    from .report_table import row_line, table_markdown
    from .saving import check_out_file

    tasks = [t for t in args.tasks.split(",") if t]
    json_out = check_out_file(args.json_out) if args.json_out else None  # not after the first task's tens of minutes

    def save(partial: dict) -> None:  # each finished task is saved at once, and the whole run at its end
        if not json_out:
            return
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(partial, indent=2))
        except OSError as e:  # the table is still printed at the end
            print(f"warning: could not write {json_out}: {e.strerror or e}", file=sys.stderr, flush=True)

    done: dict = {}

    def on_row(partial: dict) -> None:
        print(row_line(partial["rows"][-1]), file=sys.stderr, flush=True)
        save(partial)
        done.update(partial)
    try:
        result = paper_table(ModelSpec(args.model, args.device), tasks, args.quick, args.seed, args.n_calib,
                             args.n_test, progress=lambda m: print(m, file=sys.stderr, flush=True), on_row=on_row,
                             grouping=args.grouping, other_tasks=args.other_tasks, speed=speed_of(args))
    except KeyboardInterrupt:  # the tasks that finished are worth their table: each took minutes to hours
        if not done:
            raise
        print(table_markdown(done))
        print(f"interrupted: the table holds the {len(done['rows'])} of {len(tasks)} tasks that finished"
              + (f" (also in {json_out})" if json_out else "") + "; the task running then is not in it",
              file=sys.stderr)
        return 130
    save(result)  # with the other tasks' table, where asked
    print(table_markdown(result))
    return 0
