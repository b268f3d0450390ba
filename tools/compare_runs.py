"""Compare two runs' loss curves step by step: the tutorial's experiment 2 check that gradient accumulation
matches a large batch (they predict a difference below 0.01).

    python tools/compare_runs.py experiments/exp2_large_batch experiments/exp2_grad_accum [--tolerance=0.01]

Exits 0 when the val curves are within the tolerance of each other, 1 when they differ by more (a script can test it).
"""
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.reports.summary import curve_difference, tolerance_for
from gpt_toolkit.training.runlog import read_run


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("run_a", help="out_dir, log or metrics.jsonl")
    parser.add_argument("run_b", help="out_dir, log or metrics.jsonl")
    parser.add_argument("--tolerance", type=float, help="the difference that counts as 'the same' (default: the "
                        "tutorial's 0.01 for float32 runs, more for bfloat16 and float16 ones)")
    args, _ = parser.parse(argv)
    if args.tolerance is not None and not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        raise UserError(f"--tolerance={args.tolerance} must be a number of 0 or more (the largest val-loss difference "
                        f"that counts as the same, e.g. 0.01)")
    try:
        a, b = read_run(args.run_a), read_run(args.run_b)
    except ValueError as e:
        raise UserError(str(e)) from None
    for which in ("val", "train"):
        steps, mean, worst = curve_difference(a, b, which)
        print(f"{which} loss over {len(steps)} evals (steps {steps[0]}..{steps[-1]}): "
              f"mean abs diff {mean:.6f}, max abs diff {worst:.6f}")
    _, _, worst_val = curve_difference(a, b, "val")
    tolerance, why = (args.tolerance, "given") if args.tolerance is not None else tolerance_for(a, b)
    within = worst_val <= tolerance
    print(f"{a.name} vs {b.name}: val curves {'within' if within else 'NOT within'} {tolerance} of each other (max "
          f"difference {worst_val:.4f}; tolerance {tolerance}: {why})")
    return 0 if within else 1


if __name__ == "__main__":
    run_main(main)
