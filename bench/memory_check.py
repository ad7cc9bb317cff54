"""Running out of memory on a real GPU: does a search still find what it finds with room to spare? (a check, not a test)

  python bench/memory_check.py --model demo --task fever

Needs a CUDA GPU. Runs a small LASER sweep (stacks of 8 rho, cached states at three layers) once with the whole GPU,
notes its peak memory, then again under a cap between what the model takes and that peak
(``torch.cuda.set_per_process_memory_fraction``: the allocator itself refuses more), so that stacks halve, cached
states give way and evaluations' batches shrink (laser_core.memory.halving, PrefixPool.make_room). Prints, per cap,
the warnings the run gave, whether it finished, and whether its candidates equal the uncapped run's (same accuracy,
log-loss within 1e-4). The tests check the same on fake devices only; this is the one place a real allocator fails.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from laser_core import ModelSpec, SearchConfig, TaskSpec, load_model, load_task, make_splits, run_search  # noqa: E402
from laser_core.memory import human_bytes, out_of_memory  # noqa: E402


class Said(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--task", default="fever")
    ap.add_argument("--layers", default="2,15,29", help="layers swept (their down matrices)")
    ap.add_argument("--caps", default="0.75,0.5,0.25",
                    help="each cap as a share of the room the uncapped run took beyond the model")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU: on a CPU the allocator cannot be capped (the tests fake its failures instead)")
        return 2
    lm = load_model(ModelSpec(args.model, device="cuda"))
    ts = TaskSpec(args.task)
    splits = make_splits(load_task(ts), ts)
    cfg = SearchConfig("laser", ks=(1,), rhos=(0.9, 0.75, 0.5, 0.25, 0.1, 0.05, 0.01, 0.005),
                       layers=tuple(int(x) for x in args.layers.split(",")), types=("down",), stack=8)
    total = torch.cuda.get_device_properties(lm.device).total_memory
    torch.cuda.empty_cache()
    model_bytes = torch.cuda.memory_allocated(lm.device)
    torch.cuda.reset_peak_memory_stats(lm.device)
    roomy = run_search(lm, splits, cfg, None, held_out=False)
    peak = torch.cuda.max_memory_allocated(lm.device)
    print(f"{lm.machine}: model {human_bytes(model_bytes)}, uncapped peak {human_bytes(peak)} of {human_bytes(total)}; "
          f"{len(roomy.candidates)} candidates")
    said = Said()
    logging.getLogger("laser_core").addHandler(said)
    ok = True
    for share in (float(x) for x in args.caps.split(",")):
        cap = model_bytes + share * (peak - model_bytes)
        said.lines.clear()
        lm.eval_tokens = None  # each cap starts from the default batch size
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(cap / total, lm.device)
        try:
            tight = run_search(lm, splits, cfg, None, held_out=False)
            same = [(c["name"], c["rho"], c["accuracy"]) for c in tight.candidates] == \
                [(c["name"], c["rho"], c["accuracy"]) for c in roomy.candidates] and \
                all(abs(a["log_loss"] - b["log_loss"]) < 1e-4 for a, b in zip(tight.candidates, roomy.candidates))
            outcome = f"finished, {'the same candidates' if same else 'OTHER candidates than uncapped'}"
            ok &= same
        except Exception as e:  # noqa: BLE001 - a failure here is the finding
            if not out_of_memory(e):
                raise
            outcome = f"stopped: {' '.join(str(e).split())[:200]}"
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, lm.device)
        print(f"\ncap {human_bytes(int(cap))} ({share:g} of the room beyond the model): {outcome}")
        for line in said.lines:
            print(f"  warning: {line}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
