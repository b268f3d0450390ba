"""Draw learning-rate schedules, computed by train.py's own get_lr.

    python tools/plot_lr.py config/train_shakespeare_char.py --max_iters=2000 --warmup_iters=0 --decay_lr=False
    python tools/plot_lr.py experiments/exp4_no_schedule experiments/exp4_warmup_only -o exp4_lr.png

With out_dirs, each run's schedule comes from its config.json, all on one figure.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from configurator import defaults_of
from gpt_toolkit.core.cli import tool_parser, training_config
from gpt_toolkit.core.config import Config
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.reports.plots import save_figure, subplots
from gpt_toolkit.training.runlog import read_config_json
from gpt_toolkit.training.schedule import schedule_of


def parser():
    p = tool_parser(__file__, __doc__, training_config=True)
    p.add_argument("-o", "--output", default="lr_schedule.png", help="the plot (default lr_schedule.png)")
    return p


def schedule(cfg):
    """(steps, learning rates) of a run with this config (a dict), train.py's defaults for the keys it lacks."""
    return schedule_of(cfg, defaults_of(Config))


def run_config(path):
    path = Path(path)
    config_json = path / "config.json" if path.is_dir() else path
    if not config_json.exists():
        raise UserError(f"{config_json} not found: pass out_dirs of finished runs, or a config file and --key=value overrides")
    config = read_config_json(config_json)
    if config is None:
        raise UserError(f"{config_json} is damaged or not a run's config.json: pass another run's out_dir, or a config "
                        f"file and --key=value overrides")
    return config


def main(argv):
    args, rest = parser().parse_known(argv)
    if rest and all(Path(a).is_dir() or a.endswith(".json") for a in rest):  # finished runs: their own configs
        schedules = {Path(a).name if Path(a).is_dir() else Path(a).parent.name: run_config(a) for a in rest}
    else:
        schedules = {"schedule": vars(training_config(rest))}
    output = args.output
    fig, ax = subplots(figsize=(10, 5))
    for name, cfg in schedules.items():
        steps, lrs = schedule(cfg)
        ax.plot(steps, lrs, label=name, linewidth=2)
        print(f"{name}: lr at step 0 {lrs[0]:.3g}, peak {max(lrs):.3g}, last {lrs[-1]:.3g} over {len(steps)} steps")
    ax.set(xlabel="Steps", ylabel="Learning Rate", title="Learning Rate Schedule")
    ax.legend()
    ax.grid(True, alpha=0.3)
    save_figure(fig, output)
    print(f"schedule plot saved to {output}")
    return 0


if __name__ == "__main__":
    run_main(main)
