"""Write experiments/REPORT.md: per experiment family the summary table, the comparison plots, the tutorial's
analysis templates filled in with measured values, each run's whole-split val loss, and a short generated sample
per run.

    python tools/report.py experiments/
    python tools/report.py experiments/ --samples=False      # skip generating text (faster)
    python tools/report.py experiments/ --whole_split=False  # skip scoring each checkpoint on its whole val split
"""
import contextlib
import math
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import torch

from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.core.files import check_output, remove_stale_temps, write_output
from gpt_toolkit.models.checkpoint import BEST, LATEST, load_checkpoint
from gpt_toolkit.models.source import ModelSource, load_model
from gpt_toolkit.reports.plots import plot_compare
from gpt_toolkit.reports.summary import (
    batch_shape,
    curve_difference,
    fill_title,
    find_runs,
    format_table,
    run_verdict,
    summary_row,
    timing_note,
    tolerance_for,
)
from gpt_toolkit.training.evaluation import checkpoint_split

FAMILIES = {
    "exp1": "Experiment 1: configuration parameters (learning rate, batch size, model size)",
    "exp2": "Experiment 2: gradient accumulation vs a large batch (batch {batch})",  # the runs' own sizes
    "exp3": "Experiment 3: overfitting and regularization",
    "exp4": "Experiment 4: learning-rate schedules",
    "exp5": "Experiment 5: model size",
    "exp6": "Experiment 6: AdamW vs Muon",
    "exp7": "Experiment 7: which tokenizer? (equal training time, compared in bits per byte)",
}
RULES = """How the words below are decided, from each run's evaluations:
- diverged: a non-finite loss, or the final val loss is not at least 0.1 below the first;
- oscillating: val loss rose by more than 0.02 between consecutive evaluations at least twice;
- converged: the last evaluation interval improved val loss by less than 1%; otherwise still improving;
- initial loss drop: the val-loss fall over the first evaluation interval, "fast" when at least 80% of the
  family's largest fall, else "slow";
- overfitting verdict: the tutorial's bands on final val - train: < 0.1 healthy, < 0.3 slight, < 0.5 moderate, else severe."""


def convergence(run):
    vals = run.val_losses
    if not all(math.isfinite(v) for v in vals) or vals[-1] > vals[0] - 0.1:
        return "diverged"
    rises = sum(1 for a, b in zip(vals[1:], vals[2:]) if b - a > 0.02)
    if rises >= 2:
        return "oscillating"
    if len(vals) >= 2 and (vals[-2] - vals[-1]) < 0.01 * vals[-1]:
        return "converged"
    return "still improving"


def first_drop(run):
    vals = run.val_losses
    return vals[0] - vals[1] if len(vals) > 1 else 0.0


def describe_run(run, fastest_drop):
    speed = "fast" if fastest_drop > 0 and first_drop(run) >= 0.8 * fastest_drop else "slow"
    took = f"{run.took:.1f} s" if run.took is not None else "N/A"
    first_interval = run.steps[1] if len(run.steps) > 1 else 0
    return (f"- initial loss drop: {speed} ({first_drop(run):.3f} over the first {first_interval} steps)\n"
            f"- converged: {convergence(run)}\n- final val loss: {run.val_losses[-1]:.4f} "
            f"(best {run.best_val()[1]:.4f} at step {run.best_val()[0]})\n- training time: {took}")


def setting(run, key):
    return run.config.get(key, "?")


def val_of(run):
    """(val loss to compare runs by, what it is): the best checkpoint on the whole split, else the log's last figure."""
    score = getattr(run, "whole", None)
    return (score.loss, "whole-split val") if score is not None else (run.val_losses[-1], "final val (20 batches)")


def final_of(run):
    """(val loss at the end of training, what it is): the last checkpoint on the whole split, else the log's last
    figure. Overfitting shows here, where the best checkpoint hides it."""
    score = getattr(run, "whole_last", None)
    return (score.loss, "whole-split val at the end") if score is not None else (run.val_losses[-1], "final val (20 batches)")


def seed_noise(runs, of=val_of):
    """(how far apart two runs that differ only in their seed end, by `of`, their names), or None: the noise a
    difference between settings must clear."""
    def same(a, b):  # keys one config lacks (a run from before the key existed) are not a difference
        keys = (set(a.config) & set(b.config)) - SEED_FREE
        return all(a.config[k] == b.config[k] for k in keys)
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if a.config and b.config and a.config.get("seed") != b.config.get("seed") and same(a, b):
                return abs(of(a)[0] - of(b)[0]), (a.name, b.name)
    return None


def within_noise(diff, noise):
    """A verdict on a difference in val loss: inside twice the seeds' spread (and 0.005) is no difference."""
    if noise is None:
        return None
    return abs(diff) <= max(2 * noise[0], 0.005)


def noise_text(noise):
    if noise is None:
        return ("no seed twin to measure the noise against (the family's script runs one): differences under ~0.03 "
                "may be noise")
    return f"noise: {noise[1][0]} and {noise[1][1]}, the same run with another seed, end {noise[0]:.4f} apart"


def analysis_exp1(runs):
    by = {r.name: r for r in runs}
    fastest = max(first_drop(r) for r in runs)
    out = []
    for name, label in [("exp1_large_lr", "1A, larger learning rate"), ("exp1_small_lr", "1B, smaller learning rate"),
                        ("exp1_small_batch", "1C, smaller batch"), ("exp1_large_model", "1D, larger model")]:
        if name in by:
            r = by[name]
            out.append(f"#### {name} ({label}: learning_rate {setting(r, 'learning_rate')}, batch_size "
                       f"{setting(r, 'batch_size')}, {r.num_params / 1e6:.2f}M parameters)\n{describe_run(r, fastest)}")
    lr_runs = [by[n] for n in ("exp1_baseline", "exp1_large_lr", "exp1_small_lr", "exp1_too_large_lr") if n in by]
    if lr_runs:
        noise = seed_noise(runs)
        what = val_of(lr_runs[0])[1]
        best = min(lr_runs, key=lambda r: val_of(r)[0])
        lines = []
        for r in sorted(lr_runs, key=lambda r: float(setting(r, "learning_rate"))):
            diff = val_of(r)[0] - val_of(best)[0]
            if r is best:
                verdict = "the lowest"
            elif within_noise(diff, noise):
                verdict = f"{diff:+.4f}: no difference within noise"
            else:
                verdict = f"{diff:+.4f}: worse" + ("" if noise else " (noise unmeasured)")
            lines.append(f"- learning_rate {setting(r, 'learning_rate')} ({r.name}): {what} {val_of(r)[0]:.4f}, "
                         f"{verdict}; {convergence(r)}")
        out.append("#### Summary\n" + "\n".join(lines) + f"\n- {noise_text(noise)}")
    return "\n\n".join(out)


def analysis_exp2(runs):
    by = {r.name: r for r in runs}
    out = []
    for a, b, what in [("exp2_large_batch", "exp2_grad_accum", "the tutorial's config (dropout as configured)"),
                       ("exp2_large_batch_nodropout", "exp2_grad_accum_nodropout", "dropout off")]:
        if a in by and b in by:
            steps, mean, worst = curve_difference(by[a], by[b], "val")
            tolerance, why = tolerance_for(by[a], by[b])
            verdict = "below" if worst < tolerance else "above"
            sizes = f"{by[a].name} {batch_shape(by[a]) or '?'} vs {by[b].name} {batch_shape(by[b]) or '?'}"
            out.append(f"- {what}, batch x accumulation {sizes}: val curves over {len(steps)} evaluations differ by "
                       f"{mean:.6f} on average and {worst:.6f} at most: {verdict} {tolerance} ({why}; the tutorial "
                       f"predicts < 0.01 in float32)")
    return "\n".join(out) or "(the exp2 pairs were not found)"


def analysis_exp3(runs):
    lines = []
    for r in runs:
        gap = r.val_losses[-1] - r.train_losses[-1]
        lines.append(f"- {r.name} (dropout {setting(r, 'dropout')}, weight_decay {setting(r, 'weight_decay')}): "
                     f"train {r.train_losses[-1]:.4f}, val {r.val_losses[-1]:.4f}, gap {gap:.4f}: "
                     f"{run_verdict(r)}; best val {r.best_val()[1]:.4f} at step {r.best_val()[0]}")
    by = {r.name: r for r in runs}
    base = by.get("exp3_overfit")
    if base is not None:
        noise = seed_noise(runs, of=final_of)
        what = final_of(base)[1]
        climb = base.val_losses[-1] - base.best_val()[1]
        lines.append(f"- without regularisation (exp3_overfit) val loss climbs {climb:.4f} from its best (step "
                     f"{base.best_val()[0]}) while train loss falls: " + ("overfitting" if climb > 0.01 else
                                                                           "no overfitting at this length"))
        for name in ("exp3_dropout", "exp3_weight_decay", "exp3_both"):
            if name in by:  # where training ends: how much of the climb the regularisation prevented
                diff = final_of(by[name])[0] - final_of(base)[0]
                verdict = ("no difference within noise" if within_noise(diff, noise) else
                           "less overfitting than none" if diff < 0 else "worse than none")
                lines.append(f"- {name}: {what} {final_of(by[name])[0]:.4f} against exp3_overfit's "
                             f"{final_of(base)[0]:.4f} ({diff:+.4f}): {verdict}; best checkpoint "
                             f"{val_of(by[name])[0]:.4f} against {val_of(base)[0]:.4f}")
        lines.append(f"- {noise_text(noise)}")
    return "\n".join(lines)


def analysis_exp4(runs):
    fastest = max(first_drop(r) for r in runs)
    parts = [f"#### {r.name} (warmup_iters {setting(r, 'warmup_iters')}, decay_lr {setting(r, 'decay_lr')})\n"
             f"{describe_run(r, fastest)}" for r in runs]
    best = min(runs, key=lambda r: r.val_losses[-1])
    parts.append(f"#### Summary\n- lowest final val loss: {best.name} ({best.val_losses[-1]:.4f})")
    return "\n\n".join(parts)


def analysis_exp5(runs):
    rows = []
    for r in sorted(runs, key=lambda r: r.num_params or 0):
        L, d, V = setting(r, "n_layer"), setting(r, "n_embd"), setting(r, "vocab_size")
        estimate = f"{(L * 16 * d * d + V * d) / 1e6:.2f}M" if all(isinstance(x, int) for x in (L, d, V)) else "?"
        took = f"{r.took:.1f} s" if r.took is not None else "N/A"
        rows.append(f"| {r.name} | {(r.num_params or 0) / 1e6:.2f}M | {estimate} | {took} | {r.val_losses[-1]:.4f} |")
    return ("| model | parameters (exact) | tutorial's 16·L·d² + V·d | training time | final val loss |\n"
            "| --- | --- | --- | --- | --- |\n" + "\n".join(rows))


def val_at_time(run, seconds):
    """(step, val loss) of the last evaluation the run had made by `seconds` after it started, or None."""
    steps = [s for s in run.steps if run.elapsed.get(s, float("inf")) <= seconds]
    return (steps[-1], run.evals[steps[-1]][1]) if steps else None


def analysis_exp6(runs):
    by = {r.name: r for r in runs}
    if "exp6_adamw" not in by or "exp6_muon" not in by:
        return "(exp6_adamw and exp6_muon were not both found)"
    adamw, muon = by["exp6_adamw"], by["exp6_muon"]
    lines = [f"- equal steps ({r.steps[-1]}): {r.name} final val {r.val_losses[-1]:.4f}, best {r.best_val()[1]:.4f}, "
             f"{r.took or 0:.1f} s" for r in (adamw, muon)]
    if adamw.elapsed and muon.elapsed:
        t = min(max(adamw.elapsed.values()), max(muon.elapsed.values()))
        at = {r.name: val_at_time(r, t) for r in (adamw, muon)}
        lines.append(f"- equal time ({t:.0f} s, the shorter run's last evaluation): " + "; ".join(
            f"{name} val {v[1]:.4f} at step {v[0]}" for name, v in at.items() if v))
    return "\n".join(lines)


def analysis_exp7(runs, exp_dir):
    """Each tokenizer's run scored on every token of its val split: bits per byte (what compares them), tokens per
    byte, and the steps the equal time bought."""
    rows = []
    for r in runs:
        path = Path(exp_dir) / r.name / BEST
        if not path.exists():
            continue
        ckpt = load_checkpoint(path, optimizer=False)
        score = checkpoint_split(ckpt, split="val").score(batch_size=8, device="cpu", ctx=contextlib.nullcontext())
        meta = ckpt.get("meta") or {"tokenizer": "gpt2"}
        rows.append((score.bits_per_byte or math.inf, f"| {r.name} | {meta['tokenizer']} | "
                     f"{ckpt['model_args']['vocab_size']:,} | {score.tokens / score.text_bytes:.3f} | {r.steps[-1]:,} | "
                     f"{r.num_params / 1e6:.2f}M | {score.loss:.4f} | **{score.bits_per_byte:.4f}** |"))
    if not rows:
        return "(no exp7 run has a checkpoint)"
    return ("| run | tokenizer | vocab | tokens per byte | steps in the time | parameters | val loss per token | "
            "val bits per byte |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n"
            + "\n".join(row for _, row in sorted(rows)))


SEED_FREE = {"seed", "out_dir", "wandb_run_name", "resolved_device", "resolved_dtype", "resolved_compile"}
ANALYSES = {"exp1": analysis_exp1, "exp2": analysis_exp2, "exp3": analysis_exp3, "exp4": analysis_exp4, "exp5": analysis_exp5,
            "exp6": analysis_exp6, "exp7": analysis_exp7}


def unless_broken(what, call):
    """call(), or None when it fails for something wrong with a run's files (a garbage checkpoint): a report of many
    runs skips that one, as summarize_experiments.py does, and says so."""
    try:
        return call()
    except UserError as e:
        print(f"skipped {what}: {e}", file=sys.stderr, flush=True)
        return None


def generated_sample(out_dir, max_new_tokens=200, seed=1337):
    """A short sample from a run's checkpoint, or None when it has none (or a broken one: skipped, and said)."""
    if not (Path(out_dir) / BEST).exists():
        return None
    model_and_tokenizer = unless_broken(f"the sample of {Path(out_dir).name}", lambda: load_model(
        ModelSource.run(out_dir), "cpu", checkpoint=BEST))
    if model_and_tokenizer is None:
        return None
    model, tokenizer = model_and_tokenizer
    torch.manual_seed(seed)
    start = torch.tensor([tokenizer.encode("\n")], dtype=torch.long)
    return tokenizer.decode(model.generate(start, max_new_tokens, temperature=0.8, top_k=200)[0].tolist())


def score_whole_split(exp_dir, runs):
    """Each run's best checkpoint scored on every token of its val split (tools/evaluate.py): run.whole (None
    without a checkpoint). The verdicts compare runs by it."""
    def score(path):
        if not path.exists():
            return None
        return unless_broken(f"the whole-split score of {path}", lambda: checkpoint_split(
            load_checkpoint(path, optimizer=False), split="val").score(batch_size=8, device="cpu", ctx=contextlib.nullcontext()))
    for r in runs:
        r.whole = score(exp_dir / r.name / BEST)
        r.whole_last = score(exp_dir / r.name / LATEST) if r.name.startswith("exp3_") else None  # overfitting's end


def whole_split_table(runs):
    """Markdown table of each run's whole-split score, beside the 20-batch figure its log ends with; None when no run
    has one."""
    rows = []
    for r in runs:
        score = getattr(r, "whole", None)
        if score is None:
            continue
        bpb = f"{score.bits_per_byte:.4f}" if score.bits_per_byte is not None else "N/A"
        last = getattr(r, "whole_last", None)
        rows.append(f"| {r.name} | {score.loss:.4f} | {math.exp(min(score.loss, 700)):.2f} | {bpb} | {score.tokens:,} | "
                    f"{r.best_val()[1]:.4f} | {f'{last.loss:.4f}' if last is not None else '-'} |")
    if not rows:
        return None
    return ("## Whole-split val loss\n\nEach run's best checkpoint (ckpt.pt) scored on every token of its val split "
            "(float32, as `python tools/evaluate.py --out_dir=RUN` prints it). Compare runs by this column: the "
            "training log's figure is 20 sampled batches and moves by about +-0.03 with the rows it draws. Runs with "
            "different tokenizers compare by bits per byte, not by loss per token. Experiment 3's runs are also scored "
            "at the end of training (latest.pt), where overfitting shows.\n\n"
            "| run | whole-split val loss | perplexity | bits per byte | tokens | best val in the log (20 batches) | "
            "whole-split val at the end |\n| --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows))


def tasks_table(runs):
    """Markdown table of the --eval_tasks scores at each run's last evaluation; None when no run scored tasks."""
    scored = [r for r in runs if r.core]
    if not scored:
        return None
    names = sorted({name for r in scored for name in r.tasks[max(r.core)]})
    rows = []
    for r in scored:
        last = r.tasks[max(r.core)]
        cells = [(f"{last[n].get('acc_norm', last[n].get('acc', last[n].get('exact_match'))):.4f}" if n in last else "-")
                 for n in names]
        rows.append(f"| {r.name} | {max(r.core)} | " + " | ".join(cells) + f" | {r.core[max(r.core)]:.4f} |")
    return ("## Tasks (--eval_tasks)\n\nEach task's accuracy at the run's last evaluation (acc_norm for multiple choice, "
            "acc for last word, exact match for generation) on its first eval_tasks_limit items, and the CORE-style mean "
            "of the scores centered on chance ((acc - random) / (1 - random)).\n\n"
            f"| run | step | {' | '.join(names)} | CORE-style |\n| --- | --- | {' | '.join('---' for _ in names)} | --- |\n"
            + "\n".join(rows))


REPORT_TITLE = b"# Experiment report"


def build_report(exp_dir, samples=True, whole_split=True):
    exp_dir = Path(exp_dir)
    all_runs = find_runs(exp_dir)
    remove_stale_temps(exp_dir)  # plots and tables a killed run of this tool left half-written
    is_report = lambda head: head.startswith(REPORT_TITLE)
    check_output(exp_dir / "REPORT.md", ours=is_report, what="report", flag="the report")  # before the scoring
    if not all_runs:
        raise UserError(f"no runs with logs in {exp_dir}: run an experiment script first")
    devices = sorted({f"{r.config.get('resolved_device', '?')}/{r.config.get('resolved_dtype', '?')}"
                      f"{'/compiled' if r.config.get('resolved_compile') else ''}" for r in all_runs})
    parts = [f"{REPORT_TITLE.decode()}\n\nGenerated by `python tools/report.py {exp_dir}` on {date.today()} from "
             f"{len(all_runs)} runs (device/dtype, and /compiled where torch.compile ran: {', '.join(devices)}).\n\n{RULES}"]
    if whole_split:
        score_whole_split(exp_dir, all_runs)
    known = [f for f in FAMILIES if any(r.name.startswith(f + "_") for r in all_runs)]
    others = [r for r in all_runs if not any(r.name.startswith(f + "_") for f in FAMILIES)]
    for family in known:
        runs = [r for r in all_runs if r.name.startswith(family + "_")]
        title = fill_title(FAMILIES[family], runs)
        png = exp_dir / f"{family}_comparison.png"
        if not png.exists():
            plot_compare(runs, png, title)
        section = [f"## {title}", format_table([summary_row(r) for r in runs], "markdown")]
        if note := timing_note(runs):
            section.append(note)
        section.append(f"![{family} comparison]({png.name})")
        if (exp_dir / f"{family}_comparison_time.png").exists():
            section.append(f"![{family} comparison by time]({family}_comparison_time.png)")
        if (exp_dir / f"{family}_lr_schedules.png").exists():
            section.append(f"![{family} learning-rate schedules]({family}_lr_schedules.png)")
        analysis = ANALYSES[family](runs, exp_dir) if family == "exp7" else ANALYSES[family](runs)
        section += ["### Analysis", analysis]
        parts.append("\n\n".join(section))
    if others:
        note = timing_note(others)
        parts.append("## Other runs\n\n" + format_table([summary_row(r) for r in others], "markdown")
                     + (f"\n\n{note}" if note else ""))
    table = whole_split_table(all_runs) if whole_split else None
    if table:
        parts.append(table)
    table = tasks_table(all_runs)
    if table:
        parts.append(table)
    if samples:
        texts = []
        for r in all_runs:
            text = generated_sample(exp_dir / r.name) if (exp_dir / r.name).is_dir() else None
            if text is not None:
                texts.append(f"### {r.name}\n\n```text\n{text.strip()}\n```")
        if texts:
            heading = "## Samples (200 tokens from each run's checkpoint, seed 1337, temperature 0.8)"
            parts.append(heading + "\n\n" + "\n\n".join(texts))
    report = exp_dir / "REPORT.md"
    write_output(report, ("\n\n".join(parts) + "\n").encode("utf-8"), ours=is_report, what="report", flag="the report")
    return report


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("exp_dir", nargs="?", default="experiments", help="directory of runs (default experiments)")
    parser.add_flag("--samples", default=True, help="generate a text sample per run")
    parser.add_flag("--whole_split", default=True, help="score each run's checkpoint on its whole val split")
    args, _ = parser.parse(argv)
    report = build_report(args.exp_dir, samples=args.samples, whole_split=args.whole_split)
    print(f"report written to {report}")
    return 0


if __name__ == "__main__":
    run_main(main)
