"""Experiment tools: log parsing, summary tables, verdicts, plots, schedules, curve comparison, scaling, report."""
import csv
import io
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, TINY_TRAIN, assert_one_line_error, run_script

from gpt_toolkit.reports.summary import (
    HEADERS,
    curve_difference,
    find_runs,
    format_table,
    overfitting_verdict,
    sorted_rows,
    summary_row,
)
from gpt_toolkit.training import runlog
from gpt_toolkit.training.runlog import read_run
from tools.experiment import scaled_overrides
from tools.plot_lr import schedule

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(path, evals, took=12.5, params="0.80", extra=""):
    """A log as train.py prints it (and as `tee` captures it)."""
    lines = ["config:", f"  out_dir = {str(path)!r}", "tokens per iteration: 768", f"number of parameters: {params}M"]
    for step, (tr, va) in evals.items():
        lines.append(runlog.eval_line(step, tr, va))
        lines.append(runlog.iter_line(step, tr + 0.1, 20.0, 0.25))
    lines.append(extra)
    lines.append(runlog.took_line(took))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_text_log_parsing(tmp_path):
    log = write_log(tmp_path / "a.log", {0: (4.2, 4.3), 100: (2.5, 2.6), 200: (2.0, 2.2)})
    run = read_run(log)
    assert run.name == "a" and run.steps == [0, 100, 200]
    assert run.val_losses == [4.3, 2.6, 2.2] and run.train_losses == [4.2, 2.5, 2.0]
    assert run.took == 12.5 and run.num_params == 800_000 and run.tokens_per_iter == 768
    assert run.iters[100] == {"loss": 2.6, "time_ms": 20.0, "mfu": 0.25}
    assert run.best_val() == (200, 2.2)


def test_resumed_log_keeps_the_later_entry_per_step(tmp_path):
    log = tmp_path / "r.log"
    log.write_text("step 0: train loss 4.0000, val loss 4.1000\nstep 100: train loss 3.0000, val loss 3.1000\n"
                   "resuming from out/ckpt.pt at step 100\nstep 100: train loss 2.9000, val loss 3.0500\n"
                   "step 200: train loss 2.0000, val loss 2.1000\n")
    run = read_run(log)
    assert run.steps == [0, 100, 200] and run.val_losses == [4.1, 3.05, 2.1]


def test_metrics_jsonl_parsing_skips_a_cut_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(json.dumps({"type": "eval", "step": 0, "train_loss": 4.17, "val_loss": 4.18}) + "\n"
                 + json.dumps({"type": "train", "iter": 0, "loss": 4.2, "time_ms": 30.0, "mfu": 0.1, "tokens_per_s": 1000.0})
                 + "\n" + json.dumps({"type": "eval", "step": 50, "train_loss": 2.5, "val_loss": 2.75}) + "\n"
                 + '{"type": "eval", "step": 10')
    run = read_run(p)
    assert run.steps == [0, 50] and run.val_losses == [4.18, 2.75] and run.iters[0]["tokens_per_s"] == 1000.0


def test_unparseable_log_is_an_error(tmp_path):
    bad = tmp_path / "notes.log"
    bad.write_text("this is not a training log\n")
    with pytest.raises(ValueError, match="has no line like 'step N: train loss X, val loss Y'"):
        read_run(bad)
    r = run_script("tools/plot_loss.py", bad, "-o", tmp_path / "x.png")
    assert_one_line_error(r, "notes.log has no line like 'step N: train loss X, val loss Y'")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("gap, verdict", [(0.0, "healthy"), (0.0999, "healthy"), (0.1, "slight overfitting"),
                                          (0.2999, "slight overfitting"), (0.3, "moderate overfitting"),
                                          (0.4999, "moderate overfitting"), (0.5, "severe overfitting"),
                                          (1.0, "severe overfitting")])
def test_verdict_bands(gap, verdict):
    assert overfitting_verdict(gap) == verdict


def test_a_diverged_an_untrained_and_an_unfinished_run_are_said_so_not_given_an_overfitting_band(tmp_path):
    """The tutorial's large-learning-rate experiment can diverge: its val loss ends above where it started, and the gap
    bands (ch04 2.3) would call it "severe overfitting". A run stopped by a signal or killed is marked unfinished."""
    def row(name, evals, took=12.5, extra="", tail=None, ours=True):
        path = write_log(tmp_path / f"{name}.log", evals, took=took, extra=extra)
        lines = path.read_text().splitlines(keepends=True)[:tail]  # tail: a killed run's log ends without its end lines
        started = ["device cpu, dtype float32, compile False, 1 process(es); seed 1337\n"] if ours else []
        path.write_text("".join(lines[:1] + started + lines[1:]))
        return summary_row(read_run(path))[-1]
    assert row("diverged", {0: (4.2, 4.25), 100: (30.0, 3767.0)}) == "diverged (val loss above its start)"
    assert row("untrained", {0: (4.2, 4.25)}) == "untrained (step 0 only)"
    stopped = "interrupted (SIGINT) after step 100: saved out/latest.pt; continue with --init_from=resume"
    assert row("stopped", {0: (4.2, 4.25), 100: (1.5, 1.55)}, extra=stopped) == "healthy, unfinished"
    assert row("killed", {0: (4.2, 4.25), 100: (1.5, 1.55)}, tail=-2) == "healthy, unfinished"
    resumed = f"{stopped}\nresuming from out/latest.pt at step 100"  # then trained on to its end
    assert row("resumed", {0: (4.2, 4.25), 100: (1.5, 1.55)}, extra=resumed) == "healthy"
    # nanoGPT's own log has none of this toolkit's start and end lines: nothing to say it stopped early
    assert row("nanogpt", {0: (4.2, 4.25), 100: (1.5, 1.55)}, tail=-2, ours=False) == "healthy"
    # a fine-tune from a low start: its val loss rises while its train loss falls (overfitting, not divergence)
    assert row("finetune", {0: (1.6, 1.6), 100: (0.9, 1.7)}) == "severe overfitting"


def test_a_run_with_one_evaluation_plots_its_points_and_an_emptied_tee_log_points_at_its_runs_own(tmp_path,
                                                                                                   monkeypatch):
    """A run stopped after its step-0 evaluation drew an empty chart (a line through one point draws nothing). A tee'd
    NAME.log that a command typed again emptied (tee truncates before train.py refuses) names NAME/training.log."""
    from gpt_toolkit.reports import plots
    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, output: drawn.append(fig) or output)
    plots.plot_single(read_run(write_log(tmp_path / "early.log", {0: (4.2, 4.25)})), tmp_path / "early.png")
    assert [line.get_marker() for line in drawn[0].axes[0].lines] == ["o", "o"]
    (tmp_path / "exp9_x").mkdir()
    write_log(tmp_path / "exp9_x" / "training.log", {0: (4.2, 4.25), 100: (1.5, 1.55)})
    (tmp_path / "exp9_x.log").write_text("error: out_dir 'exp9_x' already holds a checkpoint ...\n")
    r = run_script("tools/plot_loss.py", tmp_path / "exp9_x.log", "-o", tmp_path / "x.png")
    assert_one_line_error(r, f"exp9_x.log has no line like 'step N: train loss X, val loss Y': its run's own log is "
                             f"{tmp_path / 'exp9_x' / 'training.log'} (pass that, or the directory)")


def test_a_plot_named_other_than_png_and_a_log_given_to_the_summary_are_one_line(tmp_path):
    log = write_log(tmp_path / "exp9_a.log", {0: (4.2, 4.25), 100: (1.5, 1.55)})
    r = run_script("tools/plot_loss.py", log, "-o", tmp_path / "curve.jpg")  # it wrote PNG bytes under that name
    assert_one_line_error(r, f"-o {tmp_path / 'curve.jpg'}: plots are written as PNG: give a name ending in .png")
    assert not (tmp_path / "curve.jpg").exists()
    r = run_script("tools/summarize_experiments.py", log)  # it said the directory was not found
    assert_one_line_error(r, f"'{log}' is a file: pass the directory of runs (e.g. {tmp_path}); for one run's log, "
                             f"tools/plot_loss.py {log}")


@pytest.fixture
def exp_dir(tmp_path):
    """Two runs as out_dirs (one also tee'd to NAME.log) and one only as a NAME.log."""
    d = tmp_path / "experiments"
    d.mkdir()
    for name, evals in {"exp9_a": {0: (4.2, 4.25), 100: (1.5, 1.55)}, "exp9_b": {0: (4.2, 4.25), 100: (1.0, 1.7)}}.items():
        (d / name).mkdir()
        write_log(d / name / "training.log", evals)
        write_log(d / f"{name}.log", evals)
        (d / name / "config.json").write_text(json.dumps({"num_params": 795904, "learning_rate": 1e-3}))
        bpb = {"exp9_a": 2.2362, "exp9_b": 2.1}[name]  # a run's last evaluation in metrics.jsonl carries it
        (d / name / "metrics.jsonl").write_text("".join(json.dumps(
            {"type": "eval", "step": s, "train_loss": t, "val_loss": v, "val_bpb": bpb + (0.5 if s == 0 else 0)}) + "\n"
            for s, (t, v) in evals.items()))
    write_log(d / "exp9_c.log", {0: (4.2, 4.3), 100: (1.2, 1.6)}, took=99.0)
    (d / "unrelated.txt").write_text("x")
    return d


def test_summary_rows_and_columns(exp_dir):
    runs = find_runs(exp_dir)
    assert [r.name for r in runs] == ["exp9_a", "exp9_b", "exp9_c"]
    rows = [summary_row(r) for r in runs]
    assert rows[0] == ["exp9_a", "1.5000", "1.5500", "0.0500", "12.5s", "1.5500", 100, "2.2362", "0.80M", "38,400",
                       "healthy"]
    assert rows[1][3] == "0.7000" and rows[1][-1] == "severe overfitting"
    assert rows[2][4] == "99.0s" and rows[2][-1] == "moderate overfitting"
    table = list(csv.reader(io.StringIO(format_table(rows, "csv"))))
    assert table[0] == HEADERS == ["Experiment", "Train Loss", "Val Loss", "Gap", "Time", "Best Val", "Best Step",
                                   "Val BPB", "Params", "Tokens/s", "Verdict"]
    assert rows[2][7] == "N/A"  # a bare log: no bits per byte
    by_bpb = [r[0] for r in sorted_rows(rows, "bpb")]
    assert by_bpb == ["exp9_b", "exp9_a", "exp9_c"]  # lowest bits per byte first; none last
    markdown = format_table(rows, "markdown")
    assert markdown.splitlines()[0].startswith("| Experiment ") and "| 1.5000 " in markdown


def test_summarize_cli_formats_and_match(exp_dir, tmp_path):
    r = run_script("tools/summarize_experiments.py", exp_dir)
    assert r.returncode == 0 and "+===" in r.stdout and "exp9_c" in r.stdout and "severe overfitting" in r.stdout
    r = run_script("tools/summarize_experiments.py", exp_dir, "--match", "exp9_b", "--format", "csv")
    assert r.stdout.splitlines()[1].startswith("exp9_b,1.0000,1.7000,0.7000")
    assert len(r.stdout.splitlines()) == 2
    r = run_script("tools/summarize_experiments.py", exp_dir, "--sort=bpb", "--format=csv")
    assert [line.split(",")[0] for line in r.stdout.splitlines()[1:]] == ["exp9_b", "exp9_a", "exp9_c"]
    r = run_script("tools/summarize_experiments.py", tmp_path / "nowhere")
    assert_one_line_error(r, "experiments directory", "not found")


def test_tutorials_summarize_regexes_read_our_logs(exp_dir):
    """the tutorial's extract_final_loss / extract_training_time regexes, unchanged, on a log we write."""
    content = (exp_dir / "exp9_a" / "training.log").read_text()
    final = None
    for line in reversed(content.splitlines()):
        m = re.search(r'train loss ([\d.]+), val loss ([\d.]+)', line)
        if m:
            final = float(m.group(1)), float(m.group(2))
            break
    assert final == (1.5, 1.55)
    assert float(re.search(r'training took ([\d.]+)', content).group(1)) == 12.5


def test_plots_are_written_as_png(exp_dir, tmp_path):
    single = tmp_path / "single.png"
    r = run_script("tools/plot_loss.py", exp_dir / "exp9_a.log", "-o", single)
    assert r.returncode == 0, r.stderr
    compare = tmp_path / "cmp.png"
    r = run_script("tools/plot_loss.py", "compare", exp_dir / "exp9_a", exp_dir / "exp9_b.log", exp_dir / "exp9_c.log",
                   "-o", compare)
    assert r.returncode == 0, r.stderr
    for png in (single, compare):
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    r = run_script("tools/plot_loss.py", exp_dir / "exp9_a.log", cwd=tmp_path)  # the tutorial's default file name
    assert r.returncode == 0 and (tmp_path / "loss_curve.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_lr_draws_the_schedule_training_uses(tmp_path):
    cfg = {"max_iters": 300, "learning_rate": 1e-3, "warmup_iters": 20, "lr_decay_iters": 250, "min_lr": 1e-4, "decay_lr": True}
    steps, lrs = schedule(cfg)
    assert steps == list(range(300))
    # nanoGPT's warmup and cosine, worked out by hand: linear to the peak, halfway down at the middle of the decay
    assert lrs[0] == pytest.approx(1e-3 / 21) and lrs[10] == pytest.approx(1e-3 * 11 / 21) and lrs[20] == pytest.approx(1e-3)
    assert lrs[135] == pytest.approx(1e-4 + 0.5 * 9e-4) and lrs[250] == lrs[299] == 1e-4
    wsd = schedule({**cfg, "lr_schedule": "wsd", "decay_frac": 0.2})[1]
    assert wsd[239] == 1e-3 and wsd[270] == pytest.approx(1e-4 + 0.5 * 9e-4) and wsd[299] < 1.01e-4
    assert set(schedule({**cfg, "lr_schedule": "constant"})[1][20:]) == {1e-3}
    out = tmp_path / "lr.png"
    r = run_script("tools/plot_lr.py", "config/train_shakespeare_char.py", "--max_iters=2000", "--warmup_iters=0",
                   "--decay_lr=False", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "lr at step 0 0.001, peak 0.001, last 0.001 over 2000 steps" in r.stdout
    assert out.read_bytes().startswith(PNG_MAGIC)
    for name, extra in [("a", {"warmup_iters": 0, "decay_lr": False}), ("b", {"warmup_iters": 100, "decay_lr": True})]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({**cfg, **extra}))
    r = run_script("tools/plot_lr.py", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "two.png")
    assert r.returncode == 0 and "a: lr at step 0 0.001" in r.stdout and "b: lr at step 0 9.9e-06" in r.stdout


def test_curve_difference_arithmetic(tmp_path):
    a = read_run(write_log(tmp_path / "a.log", {0: (4.0, 4.1), 10: (3.0, 3.1), 20: (2.0, 2.1)}))
    b = read_run(write_log(tmp_path / "b.log", {0: (4.0, 4.1), 10: (3.0, 3.13), 20: (2.01, 2.08), 30: (1.0, 1.0)}))
    steps, mean, worst = curve_difference(a, b, "val")
    assert steps == [0, 10, 20]
    assert mean == pytest.approx((0 + 0.03 + 0.02) / 3) and worst == pytest.approx(0.03)
    assert curve_difference(a, b, "train")[2] == pytest.approx(0.01)
    r = run_script("tools/compare_runs.py", tmp_path / "a.log", tmp_path / "b.log")
    assert "val loss over 3 evals (steps 0..20): mean abs diff 0.016667, max abs diff 0.030000" in r.stdout
    assert "NOT within 0.01" in r.stdout and r.returncode == 1  # a script can test the verdict
    r = run_script("tools/compare_runs.py", tmp_path / "a.log", tmp_path / "b.log", "--tolerance=0.03")
    assert "val curves within 0.03" in r.stdout and r.returncode == 0


@pytest.mark.parametrize("tolerance", ["nan", "-1", "inf"])
def test_compare_runs_refuses_a_tolerance_that_is_not_a_difference(tmp_path, tolerance):
    write_log(tmp_path / "a.log", {0: (4.0, 4.1)})
    r = run_script("tools/compare_runs.py", tmp_path / "a.log", tmp_path / "a.log", f"--tolerance={tolerance}")
    assert_one_line_error(r, f"--tolerance={float(tolerance)} must be a number of 0 or more")


def test_identical_runs_are_within_any_tolerance_even_0(tmp_path):
    write_log(tmp_path / "a.log", {0: (4.0, 4.1), 10: (3.0, 3.1)})
    r = run_script("tools/compare_runs.py", tmp_path / "a.log", tmp_path / "a.log", "--tolerance=0")
    assert "val curves within 0.0 of each other (max difference 0.0000" in r.stdout and r.returncode == 0


def test_cpu_scale_keeps_ratios():
    assert scaled_overrides(["--max_iters=1000", "--learning_rate=5e-3"], "full") == ["--max_iters=1000", "--learning_rate=5e-3"]
    args = scaled_overrides(["--max_iters=1000", "--learning_rate=5e-3"], "cpu")
    assert args[:2] == ["--max_iters=1000", "--learning_rate=5e-3"]  # the tutorial's overrides stay, the 5x rate included
    assert args[2:] == ["--n_embd=96", "--block_size=64", "--batch_size=16", "--max_iters=200", "--lr_decay_iters=1000",
                        "--warmup_iters=20", "--eval_interval=50", "--eval_iters=20", "--weight_decay=0.5"]
    small = scaled_overrides(["--batch_size=16", "--n_layer=8", "--n_embd=512", "--n_head=8"], "cpu")
    assert "--batch_size=4" in small and "--n_embd=128" in small  # still 1/4 of the baseline's batch, 512/384 wide
    assert "--warmup_iters=0" in scaled_overrides(["--warmup_iters=0", "--decay_lr=False"], "cpu")  # no warmup stays none
    assert "--weight_decay=0.0" in scaled_overrides(["--weight_decay=0.0"], "cpu")  # no decay stays none


def test_report_on_a_tiny_run(data_dir, tmp_path, exp_dir):
    exp = exp_dir
    r = run_script("train.py", "config/train_shakespeare_char.py", *TINY_TRAIN, "--max_iters=40", "--lr_decay_iters=40",
                   f"--data_dir={data_dir}", f"--out_dir={exp / 'exp3_overfit'}")
    assert r.returncode == 0, r.stderr
    r = run_script("tools/report.py", exp)
    assert r.returncode == 0, r.stderr
    report = (exp / "REPORT.md").read_text()
    assert "## Experiment 3: overfitting and regularization" in report
    assert "![exp3 comparison](exp3_comparison.png)" in report
    assert (exp / "exp3_comparison.png").read_bytes().startswith(PNG_MAGIC)
    run = read_run(exp / "exp3_overfit")
    gap = run.val_losses[-1] - run.train_losses[-1]
    assert f"val {run.val_losses[-1]:.4f}, gap {gap:.4f}: {overfitting_verdict(gap)}" in report
    assert "## Other runs" in report and "exp9_b" in report  # runs outside the five families still listed
    evaluated = run_script("tools/evaluate.py", f"--out_dir={exp / 'exp3_overfit'}", "--dtype=float32")
    loss = evaluated.stdout.split("val loss ")[1].split()[0]
    assert re.search(rf"\| exp3_overfit \| {loss} \| [\d.]+ \| [\d.]+ \| 111,539 \| {run.best_val()[1]:.4f} \|", report), report
    sample = report.split("### exp3_overfit\n\n```text\n")[1].split("```")[0]
    vocabulary = json.loads((data_dir / "shakespeare_char" / "meta.json").read_text())["itos"]
    assert len(sample) > 100 and set(sample) <= set(vocabulary)


def test_optimizer_family_compares_at_equal_steps_and_equal_time(tmp_path):
    """Experiment 6: the same steps, Muon slower per step; the report reads both runs at the same second too."""
    from tools.experiment import finish
    from tools.report import analysis_exp6
    exp = tmp_path / "experiments"
    for name, per_step, vals in (("exp6_adamw", 1.0, [4.2, 2.0, 1.8]), ("exp6_muon", 1.5, [4.2, 1.7, 1.6])):
        (exp / name).mkdir(parents=True)
        lines = [json.dumps({"type": "eval", "step": s, "train_loss": v - 0.05, "val_loss": v, "elapsed_s": s * per_step})
                 for s, v in zip((0, 100, 200), vals)]
        (exp / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert finish("exp6", "Experiment 6", exp_dir=exp, by_time=True) == 0
    assert (exp / "exp6_comparison_time.png").read_bytes().startswith(PNG_MAGIC)
    analysis = analysis_exp6(find_runs(exp, "exp6_*"))
    assert "equal steps (200): exp6_adamw final val 1.8000" in analysis and "exp6_muon final val 1.6000" in analysis
    # AdamW's last evaluation is at 200 s; by then Muon had evaluated step 100 (at 150 s), not step 200 (300 s)
    assert "equal time (200 s, the shorter run's last evaluation): exp6_adamw val 1.8000 at step 200; " \
           "exp6_muon val 1.7000 at step 100" in analysis


def test_time_to_quality_says_each_runs_time_against_nanogpts_the_way_round_that_reads_over_1():
    from tools.time_to_quality import versus
    assert versus(13.9, 66.8) == "4.81x faster"
    assert versus(377.4, 252.0) == "1.50x its time"
    assert versus(252.0, 252.0) == "1.00x faster"


def test_time_to_quality_compiles_each_of_our_runs_cold(tmp_path, monkeypatch):
    """A run that compiles (the record config) pays for compiling as a user's first run does: inductor's cache is a
    fresh directory for each of our runs, never the one an earlier run filled."""
    import tools.time_to_quality as ttq
    seen = []
    monkeypatch.setattr(ttq.subprocess, "run", lambda cmd, **kw: seen.append((cmd, kw.get("env"))) or
                        subprocess.CompletedProcess(cmd, 0, "", ""))
    for _ in range(2):
        ttq.run_once("record", tmp_path, tmp_path / "data", None)
    caches = [env["TORCHINDUCTOR_CACHE_DIR"] for _, env in seen]
    assert len(set(caches)) == 2 and all(Path(c).parent == tmp_path and not Path(c).exists() for c in caches)
    assert "config/train_shakespeare_char_record.py" in seen[0][0]


@pytest.mark.parametrize("users_own", [None, "50"])
def test_time_to_quality_starts_nanogpt_without_our_openmp_setting(tmp_path, monkeypatch, users_own):
    """nanoGPT's train.py runs as the user's shell would start it: not with the GOMP_SPINCOUNT our scripts set for
    themselves (inherited, it made nanoGPT's step 1.35x slower on a Xeon with AMX); a user's own setting reaches it."""
    import tools.time_to_quality as ttq
    from gpt_toolkit.core import startup
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("GPT_TOOLKIT_OMP_DEFAULTS", raising=False)
    monkeypatch.setattr(startup, "_SET_HERE", {})
    if users_own:
        monkeypatch.setenv("GOMP_SPINCOUNT", users_own)
    startup.brief_openmp_spin()  # what start_script does to the environment
    assert os.environ["GOMP_SPINCOUNT"] == (users_own or startup.SPIN_COUNT)  # what our own runs get
    nanogpt = tmp_path / "nanoGPT"
    (nanogpt / "config").mkdir(parents=True)
    for name in ("config/train_shakespeare_char.py", "configurator.py", "train.py"):
        (nanogpt / name).write_text("")
    seen = []
    monkeypatch.setattr(ttq.subprocess, "run", lambda cmd, **kw: seen.append(kw.get("env")) or
                        subprocess.CompletedProcess(cmd, 0, "", ""))
    ttq.run_once("nanogpt", tmp_path, tmp_path / "data", nanogpt)
    ttq.run_once("fast", tmp_path, tmp_path / "data", nanogpt)
    assert seen[0].get("GOMP_SPINCOUNT") == users_own and seen[0]["PYTHONPATH"] == str(nanogpt)
    assert seen[1]["GOMP_SPINCOUNT"] == (users_own or startup.SPIN_COUNT)


def test_time_to_quality_refuses_bad_runs_before_running_any(tmp_path):
    cases = [(["--runs=nanogpt,main"], "unknown run main: choose from nanogpt, recipe, cpu, cpu_muon, fast, speedrun"),
             (["--runs=nanogpt,fast"], "--runs names nanogpt but no checkout is given: pass --nanogpt=PATH"),
             ([f"--nanogpt={tmp_path}"], "has no train.py: give the directory of a nanoGPT checkout"),
             (["--runs=fast", "--rounds=0"], "--rounds=0 must be at least 1"),
             (["--runs=fast", f"--data_dir={tmp_path}"], f"no shakespeare_char in {tmp_path}"),
             (["--runs=fast", "--seeds=1,2"], "--seeds names 2 seeds for 1 rounds: give one seed per round"),
             (["--runs=fast", "--rounds=2", "--seeds=1,x"], "--seeds=1,x must be comma-separated whole numbers")]
    for args, message in cases:
        assert_one_line_error(run_script("tools/time_to_quality.py", *args), message)
    assert not list(tmp_path.iterdir())


def test_a_resumed_runs_time_counts_every_part(data_dir, tmp_path):
    """The summary's Time once counted only the last part of a resumed run (its 'training took' line)."""
    out = tmp_path / "exp9_resumed"
    assert run_script("train.py", *TINY_TRAIN, "--max_iters=20", f"--data_dir={data_dir}", f"--out_dir={out}").returncode == 0
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=40", "--init_from=resume", f"--data_dir={data_dir}",
                   f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    log = (out / "training.log").read_text()
    first, second = (float(s) for s in re.findall(r"training took ([\d.]+) seconds", log))
    total = float(re.search(r"with the parts before this resume: ([\d.]+) seconds of training in all", log).group(1))
    assert second < total <= first + second + 0.01
    assert read_run(out).took == total
    row = run_script("tools/summarize_experiments.py", tmp_path, "--format=csv").stdout
    assert f"{total:.1f}s" in row, row


def test_overlapping_curves_get_their_own_style(exp_dir, tmp_path, monkeypatch):
    """Four runs with the same curve (exp3's dropout and both looked like one line): each val line has its own
    colour, marker and dash pattern, and the later ones are drawn thinner, on top."""
    from gpt_toolkit.reports import plots
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, output: figures.append(fig) or output)
    same = read_run(exp_dir / "exp9_a.log")
    runs = []
    for name in "abcd":
        run = read_run(exp_dir / "exp9_a.log", name=f"exp3_{name}")
        assert run.evals == same.evals
        runs.append(run)
    plots.plot_compare(runs, tmp_path / "x.png")
    val = [line for line in figures[0].axes[0].get_lines() if line.get_label().endswith("(val)")]
    assert len(val) == 4 and len({line.get_color() for line in val}) == len({line.get_marker() for line in val}) == 4
    assert len({(line.get_linestyle(), str(line._dash_pattern)) for line in val}) == 4  # four dash patterns
    widths = [line.get_linewidth() for line in val]
    assert widths == sorted(widths, reverse=True) and [line.get_zorder() for line in val] == [2, 3, 4, 5]


def fake_run(name, *, vals, whole, last=None, **config):
    from types import SimpleNamespace

    from gpt_toolkit.training.runlog import LoggedRun as Run
    run = Run(name, None)
    run.evals = {i * 100: (v - 0.2, v) for i, v in enumerate(vals)}
    run.config = {"learning_rate": 1e-3, "seed": 1337, "dropout": 0.0, "weight_decay": 0.0, **config}
    run.whole, run.num_params = SimpleNamespace(loss=whole), 800_000
    run.whole_last = SimpleNamespace(loss=last) if last is not None else None
    return run


def test_the_report_calls_a_difference_inside_the_seeds_spread_no_difference():
    """Experiment 1 at SCALE=cpu once named a best and a worst learning rate 0.003 apart; with a seed twin the
    report holds each difference to the seeds' spread, on the whole split."""
    from tools.report import analysis_exp1, analysis_exp3
    curve = [4.2, 3.0, 2.6, 2.5]
    runs = [fake_run("exp1_baseline", vals=curve, whole=2.5030),
            fake_run("exp1_baseline_seed2", vals=curve, whole=2.4990, seed=1338),
            fake_run("exp1_large_lr", vals=curve, whole=2.4999, learning_rate=5e-3),
            fake_run("exp1_small_lr", vals=[4.2, 3.9, 3.6, 3.4], whole=3.4000, learning_rate=1e-4)]
    text = analysis_exp1(runs)
    assert "learning_rate 0.005 (exp1_large_lr): whole-split val 2.4999, the lowest" in text
    assert "learning_rate 0.001 (exp1_baseline): whole-split val 2.5030, +0.0031: no difference within noise" in text
    assert "learning_rate 0.0001 (exp1_small_lr): whole-split val 3.4000, +0.9001: worse" in text
    assert "noise: exp1_baseline and exp1_baseline_seed2, the same run with another seed, end 0.0040 apart" in text
    alone = analysis_exp1([r for r in runs if r.name != "exp1_baseline_seed2"])
    assert "+0.0031: worse (noise unmeasured)" in alone and "no seed twin to measure the noise against" in alone
    # experiment 3 judges where training ends (the last checkpoint): the best one is from before the overfitting
    runs = [fake_run("exp3_overfit", vals=[4.0, 2.5, 2.6, 2.7], whole=2.5882, last=2.7400),
            fake_run("exp3_overfit_seed2", vals=[4.0, 2.5, 2.6, 2.7], whole=2.5850, last=2.7300, seed=1338),
            fake_run("exp3_dropout", vals=[4.0, 2.6, 2.55, 2.5], whole=2.5000, last=2.5100, dropout=0.2),
            fake_run("exp3_weight_decay", vals=[4.0, 2.5, 2.6, 2.7], whole=2.5880, last=2.7350, weight_decay=0.1)]
    text = analysis_exp3(runs)
    assert "val loss climbs 0.2000 from its best (step 100) while train loss falls: overfitting" in text
    assert "exp3_dropout: whole-split val at the end 2.5100 against exp3_overfit's 2.7400 (-0.2300): less " \
           "overfitting than none; best checkpoint 2.5000 against 2.5882" in text
    assert "exp3_weight_decay: whole-split val at the end 2.7350 against exp3_overfit's 2.7400 (-0.0050): no " \
           "difference within noise" in text
    assert "end 0.0100 apart" in text


def exp2_runs(exp, conditions=None, configs=None):
    """exp2's four runs as experiments/NAME/ directories at SCALE=cpu's sizes (16 x 1 against 4 x 4); conditions:
    {name: (start GFLOP/s, end GFLOP/s, start load, end load)} for their conditions.json; configs: {name: {key: value}}
    on top of their config.json."""
    shapes = {"exp2_grad_accum": (4, 4, 0.2), "exp2_grad_accum_nodropout": (4, 4, 0.0), "exp2_large_batch": (16, 1, 0.2),
              "exp2_large_batch_nodropout": (16, 1, 0.0)}
    for name, (batch, accumulation, dropout) in shapes.items():
        (exp / name).mkdir(parents=True)
        config = {"batch_size": batch, "gradient_accumulation_steps": accumulation, "dropout": dropout,
                  "resolved_device": "cpu", "resolved_dtype": "float32", **(configs or {}).get(name, {})}
        (exp / name / "config.json").write_text(json.dumps(config))
        (exp / name / "metrics.jsonl").write_text("".join(json.dumps(
            {"type": "eval", "step": s, "train_loss": v - 0.05, "val_loss": v}) + "\n" for s, v in ((0, 4.2), (50, 2.5))))
        if conditions and name in conditions:
            start, end, load_start, load_end = conditions[name]
            (exp / name / "conditions.json").write_text(json.dumps(
                {"start": {"load_avg": load_start, "matmul_gflops": start},
                 "end": {"load_avg": load_end, "matmul_gflops": end}, "cores": 2}))
    return exp


def test_plot_titles_say_the_runs_own_batch_sizes(tmp_path, monkeypatch):
    """Experiment 2's plot once said 'batch 64 x 1 vs 16 x 4' (the tutorial's) over runs of 16 x 1 and 4 x 4
    (SCALE=cpu's): {batch} and {KEY} in a title are the runs' own settings, from their config.json."""
    from gpt_toolkit.reports import plots
    from gpt_toolkit.reports.summary import fill_title
    from tools.experiment import finish
    from tools.report import build_report
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, output: figures.append(fig) or output)
    exp = exp2_runs(tmp_path / "experiments")
    assert finish("exp2", "Experiment 2: batch {batch} accumulated", exp_dir=exp) == 0
    assert figures[-1].axes[0].get_title() == "Experiment 2: batch 16 x 1 vs 4 x 4 accumulated"
    script = (ROOT / "experiments" / "exp2_grad_accum.sh").read_text()
    assert '--title "Experiment 2: batch {batch} accumulated"' in script and "64 x 1 vs 16 x 4 acc" not in script
    runs = find_runs(exp, "exp2_large*") + [read_run(write_log(tmp_path / "bare.log", {0: (4.0, 4.1)}))]
    assert fill_title("{batch}; dropout {dropout}; {nothing} {}", runs) == "16 x 1 vs ?; dropout 0.2 vs 0.0 vs ?; " \
                                                                            "{nothing} {}"
    r = run_script("tools/plot_loss.py", "compare", exp / "exp2_large_batch", exp / "exp2_grad_accum", "--title",
                   "batch {batch}", "-o", tmp_path / "c.png")
    assert r.returncode == 0 and figures[-1].axes[0].get_title() == "batch 16 x 1 vs 4 x 4", r.stderr
    report = build_report(exp, samples=False, whole_split=False).read_text()
    assert "## Experiment 2: gradient accumulation vs a large batch (batch 16 x 1 vs 4 x 4)" in report
    assert figures[-1].axes[0].get_title() == "Experiment 2: gradient accumulation vs a large batch (batch 16 x 1 vs 4 x 4)"
    assert "- dropout off, batch x accumulation exp2_large_batch_nodropout 16 x 1 vs exp2_grad_accum_nodropout 4 x 4: " \
           "val curves over 2 evaluations" in report


def test_timings_from_a_busier_machine_are_flagged_not_comparable(tmp_path, monkeypatch):
    """Under load, identical work took 3x as long in one run as in its twin, which read like 'accumulation is 3x
    slower': each run's conditions.json (the machine's speed and load before and after it) goes with the table, and
    runs whose machine was more than 1.5x slower than another's get a note that their timings are not comparable."""
    from gpt_toolkit.reports import plots
    from gpt_toolkit.reports.summary import timing_note
    from tools.experiment import finish
    from tools.report import build_report
    monkeypatch.setattr(plots, "save_figure", lambda fig, output: output)
    busy = {"exp2_large_batch": (50.0, 48.0, 0.31, 2.02), "exp2_grad_accum": (17.0, 16.0, None, None),
            "exp2_large_batch_nodropout": (48.0, 50.0, 2.0, 2.1), "exp2_grad_accum_nodropout": (47.5, 46.0, 2.0, 2.0)}
    exp = exp2_runs(tmp_path / "busy", busy)
    note = timing_note(find_runs(exp))
    assert note.startswith("Time and Tokens/s are not comparable between these runs: the machine was up to 3.0x "
                           "slower around some of them than around others")  # 48 against 16 GFLOP/s
    assert "exp2_grad_accum 17.0/16.0 GFLOP/s, load average unknown;" in note  # no load where there is none
    assert "exp2_large_batch 50.0/48.0 GFLOP/s, load average 0.3/2.0 on 2 cores;" in note
    assert "busy" not in note  # a load of 2.1 on 2 cores: a run of ours alone
    assert note.endswith("Compare them by loss; for their speed, run them again on an otherwise idle machine (RERUN=1).")
    quiet = exp2_runs(tmp_path / "quiet", {name: (50.0, 48.0, 2.0, 2.0) if "large" in name else (36.0, 40.0, 2.0, 2.1)
                                           for name in busy})
    assert timing_note(find_runs(quiet)) is None  # 48 against 36: within 1.5x
    (quiet / "exp2_grad_accum" / "conditions.json").write_text("{not json")  # damaged: as if not recorded
    assert timing_note(find_runs(quiet)) == (
        "Time and Tokens/s are not comparable between these runs: the machine's state was not recorded for "
        "exp2_grad_accum (trained before tools/experiment.py recorded it, or by train.py directly). Compare them by "
        "loss; for their speed, run them again on an otherwise idle machine (RERUN=1).")
    # the same speeds before and after, but others' work on the cores all along (measured: a load of 8-10 on the
    # shared 2-core VM while exp2's times ranged 19.9-47.4 s): not comparable either
    loaded = exp2_runs(tmp_path / "loaded", {name: (140.0, 135.0, 9.8, 2.0) if name == "exp2_grad_accum" else
                                             (147.0, 140.0, 2.0, 2.1) for name in busy})
    assert ("the machine was up to" not in timing_note(find_runs(loaded))
            and "not comparable between these runs: others' work kept the machine busy around exp2_grad_accum (a load "
                "average above 1.5x its cores, where a run of ours alone makes about 1x), so their times depend on what "
                "else ran (a fixed CPU matmul and the 1-minute load average, before/after each run: exp2_grad_accum "
                "140.0/135.0 GFLOP/s, load average 9.8/2.0 on 2 cores;" in timing_note(find_runs(loaded)))
    for name in busy:
        (loaded / name / "conditions.json").write_text(json.dumps(
            {"start": {"load_avg": 8.5, "matmul_gflops": 140.0}, "end": {"load_avg": 9.0, "matmul_gflops": 150.0},
             "cores": 2}))
    assert "busy around all of them (a load" in timing_note(find_runs(loaded))
    cuda = exp2_runs(tmp_path / "cuda", configs={"exp2_grad_accum": {"resolved_device": "cuda", "resolved_dtype": "bfloat16"}})
    assert "they trained on different devices or precisions (exp2_grad_accum cuda/bfloat16, exp2_grad_accum_nodropout " \
           "cpu/float32" in timing_note(find_runs(cuda))
    assert timing_note(find_runs(exp2_runs(tmp_path / "unrecorded"))) is None  # nothing known: nothing said
    # the tools that show the table say it under it; a csv stays rows only (the note on stderr)
    r = run_script("tools/summarize_experiments.py", exp)
    assert r.returncode == 0 and r.stdout.rstrip().endswith(note), r.stdout
    r = run_script("tools/summarize_experiments.py", exp, "--format=csv")
    assert len(r.stdout.splitlines()) == 5 and note in r.stderr
    assert run_script("tools/summarize_experiments.py", exp, "--format=markdown", "-o", tmp_path / "t.md").returncode == 0
    assert (tmp_path / "t.md").read_text().endswith(f"\n\n{note}\n")
    assert finish("exp2", "Experiment 2", exp_dir=exp) == 0
    assert (exp / "exp2_summary.md").read_text().endswith(f"|\n\n{note}\n")
    report = build_report(exp, samples=False, whole_split=False).read_text()
    assert "| exp2_large_batch_nodropout |" in report.split(note)[0] and "![exp2 comparison]" in report.split(note)[1]


def test_an_experiment_run_keeps_the_learners_own_log_of_that_name_and_never_writes_through_a_link(data_dir, tmp_path,
                                                                                                    monkeypatch):
    """The learner's `... 2>&1 | tee experiments/exp1_baseline.log`, then the family's script, which trains that run
    again: the learner's log was overwritten without a copy (train.py keeps its own training.log as .1)."""
    for knob in ("SCALE", "EXTRA", "DEVICE", "RERUN"):
        monkeypatch.delenv(knob, raising=False)
    exp = tmp_path / "experiments"
    exp.mkdir()
    (exp / "exp9_mine.log").write_text("step 0: train loss 4.2000, val loss 4.2000\nmy own run\n")
    args = ("tools/experiment.py", "run", "exp9_mine", *TINY_TRAIN, "--max_iters=10", "--eval_interval=10",
            f"--data_dir={data_dir}")
    r = run_script(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "exp9_mine: the earlier exp9_mine.log is kept as exp9_mine.log.1" in r.stdout
    assert (exp / "exp9_mine.log.1").read_text().endswith("my own run\n") and "step 10:" in (exp / "exp9_mine.log").read_text()
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not a log\n")
    (exp / "exp9_linked.log").symlink_to(elsewhere)
    r = run_script(*args[:2], "exp9_linked", *args[3:], cwd=tmp_path)
    assert_one_line_error(r, "exp9_linked.log is a symbolic link")
    assert elsewhere.read_text() == "not a log\n"


@pytest.mark.slow
def test_an_experiment_stopped_by_ctrl_c_is_trained_again_not_taken_as_finished(data_dir, tmp_path, monkeypatch):
    """A stopped run says 'training took' too: rerunning the family's script skipped it as finished, and its summary
    row came from the part that ran."""
    import signal
    import sys
    for knob in ("SCALE", "EXTRA", "DEVICE", "RERUN"):
        monkeypatch.delenv(knob, raising=False)
    args = ["tools/experiment.py", "run", "exp9_stop", *TINY_TRAIN, "--max_iters=300", "--lr_decay_iters=300",
            "--eval_interval=100", "--log_interval=1", f"--data_dir={data_dir}"]
    proc = subprocess.Popen([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("iter 120:"):  # after the save at step 100
            break
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole group, as in a terminal
    proc.communicate(timeout=120)
    log = (tmp_path / "experiments" / "exp9_stop" / "training.log").read_text()
    assert "interrupted (SIGINT)" in log and "training took" in log
    r = run_script(*args, cwd=tmp_path)
    assert r.returncode == 0 and "already finished" not in r.stdout and "step 300:" in r.stdout, r.stdout
    r = run_script(*args, cwd=tmp_path)  # now it is
    assert "exp9_stop: already finished with these settings" in r.stdout


def test_an_experiment_run_records_the_machines_load_before_and_after(data_dir, tmp_path, monkeypatch):
    import os

    from tools.experiment import machine_now
    for knob in ("SCALE", "EXTRA", "DEVICE", "RERUN"):
        monkeypatch.delenv(knob, raising=False)
    r = run_script("tools/experiment.py", "run", "exp9_tiny", *TINY_TRAIN, "--max_iters=10", "--eval_interval=10",
                   f"--data_dir={data_dir}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "experiments" / "exp9_tiny"
    conditions = json.loads((run / "conditions.json").read_text())
    assert set(conditions) == {"start", "end", "cores"} and conditions["cores"] >= 1
    for moment in (conditions["start"], conditions["end"]):
        assert moment["matmul_gflops"] > 0 and isinstance(moment["load_avg"], float) and moment["time"][:2] == "20"
    assert (f"exp9_tiny: the machine ran a fixed CPU matmul at {conditions['start']['matmul_gflops']:.1f} GFLOP/s "
            f"before it trained and {conditions['end']['matmul_gflops']:.1f} after, 1-minute load average "
            f"{conditions['start']['load_avg']:.2f} and ") in r.stdout
    log = (tmp_path / "experiments" / "exp9_tiny.log").read_text()  # the tutorial's lines, as they were
    assert re.search(r"^step 10: train loss [\d.]+, val loss [\d.]+$", log, re.M)
    assert re.search(r"^training took [\d.]+ seconds$", log, re.M) and "fixed CPU matmul" not in log
    monkeypatch.delattr(os, "getloadavg")  # Windows has none
    assert machine_now(seconds=0.01)["load_avg"] is None
    monkeypatch.undo()
    for knob in ("SCALE", "EXTRA", "DEVICE", "RERUN"):
        monkeypatch.delenv(knob, raising=False)
    r = run_script("tools/experiment.py", "run", "exp9_tiny", *TINY_TRAIN, "--max_iters=12", "--eval_interval=10",
                   "--block_size=100000", f"--data_dir={data_dir}", cwd=tmp_path)  # train.py refuses it: no memory
    assert r.returncode != 0 and not (run / "conditions.json").exists()  # none beside the earlier run's records
