"""The LR pilot of a comparison: which LR each method's grid is centred on.

    OPTIMS="mezo lozo adam" MODES=lora STEPS=30 EVAL_STEPS=30 LRS="1e-4 1e-3 1e-2" OUT=result/pilot \
        bash grid.sh --eval_on_start true                  # a few steps of each method at LRs x10 apart
    python bench/pilot_lrs.py result/pilot                 # the table, and LRS_<optim> lists for grid.sh

Per method (report.py's groups: task, model, mode, optimizer), each LR's dev loss before and after the pilot's steps
(eval_loss at the first and last evaluation its trainer_state.json logged), the training loss it logged first and
last, and whether it diverged (report.diverged: a non-finite loss, or a last logged loss above 1.5x the lowest).  The
centre is the LR with the lowest final dev loss among those that did not diverge (the lowest LR where all did): the
dev set decides, never the test set.  The grid is the centre divided and multiplied by `--spacing` (3: three LRs x3
apart, each rounded to one significant figure).  A centre at an end of the pilot's LRs is marked: the pilot did not bracket the best LR.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import report  # noqa: E402
from zo.registry import short  # noqa: E402


def losses(run: report.Run) -> dict:
    history = (report.trainer_state(run) or {}).get("log_history", [])
    dev = [e["eval_loss"] for e in history if isinstance(e.get("eval_loss"), (int, float))]
    train = [e["loss"] for e in history if isinstance(e.get("loss"), (int, float))]
    return {"dev_first": dev[0] if dev else None, "dev_last": dev[-1] if dev else None,
            "train_first": train[0] if train else None, "train_last": train[-1] if train else None}


def centre(group: report.Group) -> tuple[float, list[dict]]:
    """The LR the grid is centred on, and one row per configuration (sorted by LR)."""
    rows = []
    for c in group.configurations:
        row = {"lr": report.learning_rate(c), "diverged": report.diverged(c), **losses(c.runs[0])}
        rows.append(row)
    rows.sort(key=lambda r: r["lr"])
    usable = [r for r in rows if not r["diverged"] and r["dev_last"] is not None]
    chosen = min(usable, key=lambda r: r["dev_last"])["lr"] if usable else rows[0]["lr"]
    return chosen, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="the pilot grid's OUT folder")
    parser.add_argument("--spacing", type=float, default=3.0, help="factor between the grid's LRs (default 3)")
    options = parser.parse_args(argv)
    runs, notes = report.find_results([options.folder])
    if not runs:
        print(f"pilot_lrs.py: no result files under {options.folder}", file=sys.stderr)
        return 2
    print("| method | LR | dev loss, first evaluation | dev loss, last | training loss, first logged | last | "
          "diverged | centre |")
    print("|" + "---|" * 8)
    grids = {}
    for group in report.group_runs(runs):
        if group.mode == "icl":
            continue
        lr, rows = centre(group)
        lrs = [r["lr"] for r in rows]
        edge = " (an end of the pilot's LRs)" if len(lrs) > 1 and lr in (lrs[0], lrs[-1]) else ""
        for r in rows:
            cells = [f"{r[k]:.4f}" if r[k] is not None else "–" for k in ("dev_first", "dev_last", "train_first",
                                                                          "train_last")]
            mark = f"**centre**{edge}" if r["lr"] == lr else ""
            print(f"| {group.optimizer} | {short(r['lr'])} | {' | '.join(cells)} | {'yes' if r['diverged'] else ''} "
                  f"| {mark} |")
        # one significant figure: 1e-3 / 3 is written 3e-4, as people write grids
        first_order = group.configurations[0].runs[0].config.get("trainer") == "regular"
        grids["adam" if first_order else group.optimizer] = " ".join(   # the names grid.sh's OPTIMS take
            short(float(f"{lr * f:.0e}")) for f in (1 / options.spacing, 1.0, options.spacing))
    print()
    for name, lrs in grids.items():
        print(f'LRS_{name}="{lrs}"')
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
