"""Summarize every run in an experiments directory as one table.

    python tools/summarize_experiments.py                      # experiments/, grid table
    python tools/summarize_experiments.py experiments --match 'exp3_*' --format markdown
    python tools/summarize_experiments.py --format csv -o results.csv

A run is experiments/<name>/ (its metrics.jsonl, training.log and config.json) or experiments/<name>.log.
The gap is final val loss minus final train loss; the verdict uses the tutorial's bands. A note under the table
(on stderr for csv) says when the runs' Time and Tokens/s are not comparable: the machine was busier around some of
them (their conditions.json, from tools/experiment.py), or they trained on different devices.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.core.files import write_output
from gpt_toolkit.reports.summary import (
    SORT_KEYS,
    find_runs,
    format_table,
    is_table,
    sorted_rows,
    summary_row,
    timing_note,
)


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("exp_dir", nargs="?", default="experiments", help="directory of runs (default experiments)")
    parser.add_argument("--format", choices=["grid", "markdown", "csv"], default="grid")
    parser.add_argument("--match", default="*", help="only runs whose name matches this glob, e.g. 'exp1_*'")
    parser.add_argument("-o", "--output", help="write the table to this file instead of printing it (a file there is "
                        "replaced only if it is a table this tool wrote)")
    parser.add_argument("--sort", choices=list(SORT_KEYS), default="name", help="order the runs by name (default), "
                        "final val loss, best val loss, or val bits per byte (runs with other tokenizers compare by it)")
    args, _ = parser.parse(argv)
    runs = find_runs(args.exp_dir, args.match)
    if not runs:
        raise UserError(f"no runs with logs in {args.exp_dir} (matching '{args.match}'): each run needs "
                        f"NAME/training.log, NAME/metrics.jsonl or NAME.log")
    table = format_table(sorted_rows([summary_row(r) for r in runs], args.sort), args.format)
    note = timing_note(runs)
    text = table + ("" if table.endswith("\n") else "\n")
    if note and args.format != "csv":
        text += f"\n{note}\n"
    elif note:  # a csv stays rows only
        print(note, file=sys.stderr)
    if args.output:
        write_output(args.output, text.encode("utf-8"), ours=is_table, what="summary table", flag="-o")
        print(f"summary of {len(runs)} runs written to {args.output}")
    else:
        if args.format == "grid":
            print("=" * 80 + "\nExperiment summary\n" + "=" * 80)
        print(text, end="")
    return 0


if __name__ == "__main__":
    run_main(main)
