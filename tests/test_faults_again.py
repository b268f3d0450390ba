"""Nothing lost, round two: what a second fault pass found, each fault made real (a real signal, a real SIGKILL at a
chosen moment, a real symlink, a real file-size limit), each test failing without its fix."""
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_TRAIN, assert_one_line_error, run_script, signal_and_time

from gpt_toolkit.core.locking import LOCK_NAME
from gpt_toolkit.models.checkpoint import load_checkpoint
from gpt_toolkit.training.guards import Guard
from model import GPT, GPTConfig

pytestmark = pytest.mark.precision  # its code path depends on the precision dtype=auto picks (.ci/run runs it in both)

# A sitecustomize for a child train.py: SIGKILL itself when os.replace is called for the KILL_AFTER-th time with a
# destination containing KILL_ON_REPLACE (before that call does anything): a kill at an exact moment of a real run.
KILL_ON_REPLACE = """import os, signal
_real, _count = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if os.environ["KILL_ON_REPLACE"] in str(dst):
        _count[0] += 1
        if _count[0] == int(os.environ["KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)
    return _real(src, dst, *args, **kwargs)
os.replace = replace
"""


def train_args(data_dir, out, *extra):
    return ["train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", *extra]


def digests(out, pattern="*"):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(out.glob(pattern))
            if p.is_file() and not p.name.startswith(".")}  # not the lock file: it names its latest holder


def killed_run(tmp_path, args, *, on, after):
    (tmp_path / "hook").mkdir(exist_ok=True)
    (tmp_path / "hook" / "sitecustomize.py").write_text(KILL_ON_REPLACE)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "hook"), KILL_ON_REPLACE=on, KILL_AFTER=str(after))
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    return r


@pytest.fixture
def many_saves(data_dir, tmp_path):
    """A finished run with 30 rolling checkpoints besides ckpt.pt and latest.pt, and its logs."""
    out = tmp_path / "out"
    r = run_script(*train_args(data_dir, out, "--max_iters=60", "--eval_interval=2", "--keep_last=30"))
    assert r.returncode == 0, r.stderr
    assert len(list(out.glob("ckpt_step*.pt"))) == 30
    return out


# ----------------------------------------------------------------------------- 1. eval_only writes no checkpoint

def test_eval_only_from_scratch_on_a_trained_out_dir_is_refused(data_dir, tmp_path):
    out = tmp_path / "out"
    assert run_script(*train_args(data_dir, out, "--max_iters=20")).returncode == 0
    before = digests(out)
    r = run_script(*train_args(data_dir, out, "--eval_only=True"))
    assert_one_line_error(r, "holds a trained checkpoint (latest.pt)", "--eval_only=True with init_from=scratch would "
                          "evaluate a new, untrained model", "--init_from=resume")
    assert digests(out) == before


@pytest.mark.slow
def test_ctrl_c_during_an_eval_only_evaluation_saves_nothing(data_dir, tmp_path):
    out = tmp_path / "out"
    assert run_script(*train_args(data_dir, out, "--max_iters=20")).returncode == 0
    before = digests(out, "*.pt") | digests(out, "config.json")
    proc = subprocess.Popen([sys.executable, *train_args(data_dir, out, "--eval_only=True", "--init_from=resume",
                                                         "--eval_iters=100000")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("evaluating at step 20:"):  # five seconds into the evaluation
            break
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted (SIGINT) during the evaluation at step 20: an --eval_only run saves nothing" in stdout
    assert digests(out, "*.pt") | digests(out, "config.json") == before


# ----------------------------------------------------------------------------- 2. and 4. --overwrite=True, killed

@pytest.mark.slow
def test_a_kill_while_overwrite_sets_checkpoints_aside_loses_none(data_dir, tmp_path, many_saves):
    before = digests(many_saves)
    # the journal is the first write into the folder: the 12th rename there is the 11th file, 21 are not yet moved
    killed_run(tmp_path, train_args(data_dir, many_saves, "--overwrite=True", "--seed=7"), on="set-aside", after=12)
    aside = list(many_saves.glob(".replaced.*"))
    assert len(aside) == 1 and 0 < len(list(aside[0].glob("*.pt"))) < 32
    r = run_script(*train_args(data_dir, many_saves, "--init_from=resume", "--max_iters=62", "--eval_interval=2",
                               "--keep_last=40"))
    assert r.returncode == 0, r.stderr
    assert "put back the checkpoints (ckpt.pt, ckpt_step" in r.stdout and "resuming from" in r.stdout
    assert "at step 60" in r.stdout
    after, rolling = digests(many_saves), [name for name in before if name.startswith("ckpt_step")]
    assert {name: after[name] for name in rolling} == {name: before[name] for name in rolling}  # all 30, as they were
    assert not list(many_saves.glob(".replaced.*"))


@pytest.mark.slow
def test_a_kill_after_the_first_save_of_an_overwrite_keeps_the_new_run(data_dir, tmp_path, many_saves):
    """Killed between its first save and dropping what it set aside: the new run's checkpoint stays, the old ones go
    (what --overwrite=True asked for), and the resume continues the new run."""
    killed_run(tmp_path, train_args(data_dir, many_saves, "--overwrite=True", "--seed=7", "--max_iters=40"),
               on=".done", after=1)
    assert load_checkpoint(many_saves / "latest.pt")["iter_num"] == 20  # the new run's first save
    r = run_script(*train_args(data_dir, many_saves, "--init_from=resume", "--max_iters=40"))
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout and "at step 20" in r.stdout
    assert not list(many_saves.glob(".replaced.*")) and not list(many_saves.glob("ckpt_step*.pt"))
    assert not re.search(r"seed += 7", (many_saves / "training.log.1").read_text())  # the old run's log, kept


def test_an_overwrite_that_saves_nothing_gives_back_the_logs_with_the_checkpoints(data_dir, tmp_path):
    out = tmp_path / "out"
    assert run_script(*train_args(data_dir, out, "--max_iters=40")).returncode == 0
    before = digests(out)
    r = run_script(*train_args(data_dir, out, "--overwrite=True", "--learning_rate=1e9", "--grad_clip=0",
                               "--log_interval=1", "--seed=7"))
    assert_one_line_error(r, "NaN/Inf")
    assert "with their run's config.json, metrics.jsonl, training.log (this run's are kept as config.json.1, " \
           "metrics.jsonl.1, training.log.1)" in r.stdout
    after = digests(out)
    assert {name: after[name] for name in before} == before  # every file of the earlier run, as it was
    assert re.search(r"seed +\= 7", (out / "training.log.1").read_text())  # and the failed run's log, kept beside them
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "eval"] == [0, 20, 40]  # one run's records, not two


@pytest.mark.slow
def test_readers_name_the_folder_a_killed_overwrite_left(data_dir, tmp_path, many_saves):
    # the journal, then the 32 checkpoints: killed as it moves the logs
    killed_run(tmp_path, train_args(data_dir, many_saves, "--overwrite=True"), on="set-aside", after=34)
    aside = list(many_saves.glob(".replaced.*"))
    assert len(aside) == 1 and not list(many_saves.glob("*.pt"))
    for script in ("sample.py", "tools/evaluate.py"):
        r = run_script(script, f"--out_dir={many_saves}", *(["--max_new_tokens=5"] if script == "sample.py" else []))
        assert_one_line_error(r, "a --overwrite=True run that did not finish set the earlier ones aside in "
                              f"{aside[0]}", "--init_from=resume")


# ----------------------------------------------------------------------------- 3. links and directories

def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_kept(data_dir, tmp_path):
    out = tmp_path / "out"
    assert run_script(*train_args(data_dir, out, "--max_iters=20")).returncode == 0
    mine = tmp_path / "my_notes.txt"
    mine.write_text("my notes, not a lock")
    (out / LOCK_NAME).unlink()
    (out / LOCK_NAME).symlink_to(mine)
    r = run_script(*train_args(data_dir, out, "--init_from=resume", "--max_iters=30"))
    assert_one_line_error(r, f"{out / LOCK_NAME} is a symbolic link (to {mine})", "remove the link")
    assert mine.read_text() == "my notes, not a lock"
    r = run_script("data/prepare_text.py", f"--input={mine}", "--name=notes", f"--data_dir={tmp_path}")
    assert r.returncode == 0, r.stderr  # a dataset directory's lock the same way
    (tmp_path / "notes" / LOCK_NAME).unlink()
    (tmp_path / "notes" / LOCK_NAME).symlink_to(mine)
    r = run_script("data/prepare_text.py", f"--input={mine}", "--name=notes", f"--data_dir={tmp_path}")
    assert_one_line_error(r, "is a symbolic link")
    assert mine.read_text() == "my notes, not a lock"


@pytest.mark.parametrize("name", ["training.log", "metrics.jsonl"])
def test_a_log_that_is_a_symlink_is_refused_on_resume(data_dir, tmp_path, name):
    out = tmp_path / "out"
    assert run_script(*train_args(data_dir, out, "--max_iters=20")).returncode == 0
    elsewhere = tmp_path / "elsewhere.log"
    os.replace(out / name, elsewhere)
    (out / name).symlink_to(elsewhere)
    before = elsewhere.read_bytes()
    r = run_script(*train_args(data_dir, out, "--init_from=resume", "--max_iters=30"))
    assert_one_line_error(r, f"{out / name} is a symbolic link", "remove the link")
    assert elsewhere.read_bytes() == before and (out / name).is_symlink()


@pytest.mark.parametrize("name", ["training.log", "metrics.jsonl", LOCK_NAME])
def test_a_directory_where_a_run_file_belongs_is_one_line(data_dir, tmp_path, name):
    out = tmp_path / "out"
    assert run_script(*train_args(data_dir, out, "--max_iters=20")).returncode == 0
    (out / name).unlink()
    (out / name).mkdir()
    r = run_script(*train_args(data_dir, out, "--init_from=resume", "--max_iters=30"))
    assert_one_line_error(r, f"{out / name} is a directory")


# ----------------------------------------------------------------------------- 5. sampling's vanishing values

@pytest.fixture(scope="module")
def sampled_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "out"
    assert run_script(*train_args(data_dir, out, "--max_iters=20")).returncode == 0
    return out


def sample(out, *flags):
    return run_script("sample.py", f"--out_dir={out}", "--start=ROMEO:", "--num_samples=1", "--max_new_tokens=40",
                      "--seed=3", *flags)


def test_a_vanishing_temperature_or_top_p_is_greedy(sampled_run):
    greedy = sample(sampled_run, "--temperature=0")
    assert greedy.returncode == 0, greedy.stderr
    for flags in (["--temperature=1e-300"], ["--temperature=1e-40"], ["--temperature=1e-5"], ["--top_p=1e-300"],
                  ["--top_p=1e-300", "--num_samples=2"]):
        r = sample(sampled_run, *flags)
        assert r.returncode == 0, r.stderr
        texts = r.stdout.split("---------------\n")[:-1]
        assert texts and all(t == greedy.stdout.split("---------------\n")[0] for t in texts), flags


@pytest.mark.parametrize("flag, message", [
    ("--repetition_penalty=1e-300", "repetition_penalty=1e-300 must be positive, between 1e-06 and 1e+06"),
    ("--temperature=1e999", "temperature=inf must be 0 (greedy) or positive (and finite)"),
    ("--min_p=1e999", "min_p=inf must be in [0, 1)"),
    ("--top_p=0", "top_p=0.0 must be in (0, 1]")])
def test_sampling_values_that_cannot_work_are_one_line(sampled_run, flag, message):
    assert_one_line_error(sample(sampled_run, flag), message, code=2)


def test_the_librarys_generate_refuses_them_too():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=11))
    with pytest.raises(ValueError, match="repetition_penalty=1e-300 must be positive, between"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, repetition_penalty=1e-300)
    torch.manual_seed(0)
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 5, temperature=1e-300)
    assert torch.equal(out, model.generate(torch.zeros(1, 1, dtype=torch.long), 5, temperature=0))


# ----------------------------------------------------------------------------- 6. a second interrupt in the save

def test_a_second_ctrl_c_inside_the_stops_save_is_an_abort_not_a_full_disk(data_dir, tmp_path, monkeypatch):
    """The first SIGINT comes after step 5; the second lands inside torch's writer as it writes the stop's save."""
    out = tmp_path / "out"

    class FirstCtrlC(Guard):
        def after_step(self, step, loss, norm, lr):
            if step + 1 == 5:
                os.kill(os.getpid(), signal.SIGINT)

    real = torch.save

    def second_ctrl_c_midway(obj, f, *args, **kwargs):
        class Writer:
            writes = 0

            def write(self, data):
                Writer.writes += 1
                if Writer.writes == 3:
                    os.kill(os.getpid(), signal.SIGINT)
                return f.write(data)

            def __getattr__(self, name):
                return getattr(f, name)
        return real(obj, Writer(), *args, **kwargs)
    monkeypatch.setattr(torch, "save", second_ctrl_c_midway)
    r = run_script(*train_args(data_dir, out), guard=FirstCtrlC())
    line = assert_one_line_error(r, "aborted by a second interrupt (SIGINT) while saving the state after step 5: "
                                    "no checkpoint had been saved yet", code=130)
    assert "disk" not in line and not list(out.glob("*.pt")) and not list(out.glob(".*.tmp*"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="mounts a tmpfs: needs root and unshare")
def test_a_full_disk_during_a_save_says_no_space_left(data_dir, tmp_path):
    """A real full disk: a 700 kB tmpfs, in a mount namespace of the test's own, holding the run; the resumed run's
    first save does not fit beside the checkpoint already there."""
    out = tmp_path / "out"
    assert run_script(*train_args(data_dir, out, "--max_iters=20")).returncode == 0
    small = tmp_path / "small"
    small.mkdir()
    resume = " ".join(shlex.quote(a) for a in [sys.executable, *train_args(data_dir, small / "out", "--init_from=resume",
                                                                            "--max_iters=40")])
    script = f"mount -t tmpfs -o size=700k tmpfs {small} && cp -a {out} {small}/out && {resume}"
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    if "mount:" in r.stderr:
        pytest.skip(f"no tmpfs here: {r.stderr.strip()}")
    assert_one_line_error(r, "could not save the checkpoint to", "(No space left on device): the previous checkpoint "
                          "is intact")


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="mounts a tmpfs: needs root and unshare")
def test_a_write_failure_torch_reports_without_its_cause_is_named_from_the_full_disk(tmp_path):
    """torch's writer can report a failed write as only 'unexpected pos': on a disk that is full, the cause is that."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from gpt_toolkit.core.files import write_failure_cause; "
            f"open({str(tmp_path / 'fill')!r}, 'wb').write(b'x' * 2**20)\n"
            f"print(write_failure_cause(RuntimeError('[enforce fail at inline_container.cc:642] . unexpected pos 64 vs "
            f"0'), {str(tmp_path / 'ckpt.pt')!r}))")
    script = f"mount -t tmpfs -o size=1m tmpfs {tmp_path} && {shlex.quote(sys.executable)} -c {shlex.quote(code)}"
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True, text=True,
                       timeout=60)
    if "mount:" in r.stderr:
        pytest.skip(f"no tmpfs here: {r.stderr.strip()}")
    assert r.stdout.strip() == "No space left on device", r.stderr


# ----------------------------------------------------------------------------- 8. Ctrl-C in a BPE's training

def threaded_forks(pid):
    """The ids of a process's running children that are forks of it (its command line: not a program it runs for a
    moment, nor a child that ended and waits to be reaped) with threads of their own; Linux, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rpartition(")")[2].split()[:2]
            forked = (stat.parent / "cmdline").read_bytes() == Path(f"/proc/{pid}/cmdline").read_bytes()
            threads = len(list((stat.parent / "task").iterdir()))
        except (OSError, ValueError):  # a process that ended meanwhile
            continue
        if int(parent) == pid and state not in "ZX" and forked and threads > 1:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_ctrl_c_while_a_bpe_trains_stops_at_once(tmp_path, shakespeare_text):
    """tokenizers' training is Rust that a Ctrl-C cannot reach (about 20 s on this 50 MB corpus, when quiet); it runs
    in a child, and the signal comes while that child trains: the stop comes within 2 s, or this busy machine's
    equivalent (conftest's signal_and_time), never at the training's end."""
    corpus = tmp_path / "big.txt"
    corpus.write_text("".join(shakespeare_text.replace("e", c) for c in "eaiouyxz" * 6))
    proc = subprocess.Popen([sys.executable, "data/prepare_text.py", f"--input={corpus}", "--name=big",
                             f"--data_dir={tmp_path}", "--tokenizer=bpe", "--vocab_size=4096"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120  # only against a hang: the training starts within a second when quiet
    while not threaded_forks(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # (the sample's single-threaded readers come and go before it)
    trainer = threaded_forks(proc.pid)  # the BPE's training: tokenizers' Rust threads in a fork
    assert len(trainer) == 1, (trainer, proc.poll())
    time.sleep(0.5)  # into the Rust code
    assert threaded_forks(proc.pid) == trainer  # still training when the signal comes
    out, err, took, bound = signal_and_time(proc, signal.SIGINT)
    assert took < bound, (took, bound)
    assert "trained a byte-level BPE" not in out and proc.returncode == 130, (proc.returncode, err)
    assert err.strip().splitlines()[-1] == "interrupted: stopped before finishing; no file was left half-written", err
    assert "Traceback" not in err and not (tmp_path / "big" / "train.bin").exists()


# ----------------------------------------------------------------------------- 7. tracebacks, each one line now

@pytest.mark.parametrize("flags, message", [
    (["--peak_flops=1e-300"], "peak_flops=1e-300 is not a device's FLOP/s (1e6 to 1e21)"),
    (["--seed=1000000000000000000000000000000"], "seed=1000000000000000000000000000000 is too large: use a seed from 0 "
                                                 "to 4294967295"),
    (["--max_iters=1000000000000000000000000000000"], "max_iters=1000000000000000000000000000000 is more steps than a "
                                                      "run can take: use at most 1,000,000,000,000")])
def test_absurd_numbers_are_refused_at_the_start(data_dir, tmp_path, flags, message):
    r = run_script(*train_args(data_dir, tmp_path / "out", *flags))
    assert_one_line_error(r, message, code=2)
    assert not (tmp_path / "out").exists()


def test_a_huge_seed_in_sample_and_a_nan_bpe_sample_are_one_line(sampled_run, tmp_path):
    assert_one_line_error(sample(sampled_run, "--seed=99999999999999999999"), "seed=99999999999999999999 must be from 0")
    (tmp_path / "t.txt").write_text("some text to prepare " * 50)
    r = run_script("data/prepare_text.py", f"--input={tmp_path / 't.txt'}", "--name=n", f"--data_dir={tmp_path}",
                   "--tokenizer=bpe", "--vocab_size=300", "--bpe_sample_mb=nan")
    assert_one_line_error(r, "--bpe_sample_mb=nan must be a positive number of megabytes")


@pytest.mark.parametrize("name", ["config.json", "train.bin", "val.bin"])
def test_a_directory_where_a_run_or_dataset_file_belongs_is_one_line(data_dir, tmp_path, name):
    data = tmp_path / "data"
    shutil.copytree(data_dir / "shakespeare_char", data / "shakespeare_char")
    out = tmp_path / "out"
    assert run_script(*train_args(data, out, "--max_iters=10")).returncode == 0
    where = (out if name == "config.json" else data / "shakespeare_char") / name
    where.unlink()
    where.mkdir()
    r = run_script(*train_args(data, out, "--init_from=resume", "--max_iters=20"))
    assert_one_line_error(r, f"{where} is ")


def test_metrics_records_no_run_writes_are_skipped_by_resume_and_the_tools(data_dir, tmp_path):
    out = tmp_path / "runs" / "out"
    assert run_script(*train_args(data_dir, out, "--max_iters=20")).returncode == 0
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"type": "eval", "step": "x", "train_loss": 1, "val_loss": 1}\n'
                '{"type": "train", "iter": {"a": 1}, "loss": 1}\n["not", "a", "record"]\n')
    for args in (train_args(data_dir, out, "--init_from=resume", "--max_iters=30"),
                 ["tools/plot_loss.py", out, "-o", tmp_path / "p.png"],
                 ["tools/summarize_experiments.py", tmp_path / "runs"]):
        r = run_script(*args)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args[0], r.stderr)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "eval"] == [0, 20, 30]  # the resume dropped the odd ones


def test_a_truncated_config_json_in_plot_lr_is_one_line(data_dir, tmp_path):
    out = tmp_path / "out"
    assert run_script(*train_args(data_dir, out, "--max_iters=10")).returncode == 0
    (out / "config.json").write_text((out / "config.json").read_text()[:50])
    assert_one_line_error(run_script("tools/plot_lr.py", out, "-o", tmp_path / "lr.png"),
                          "config.json is damaged or not a run's config.json")


@pytest.mark.parametrize("skip", [False, True])
def test_a_chat_line_nested_too_deep_is_one_line(tmp_path, skip):
    (tmp_path / "deep.jsonl").write_text('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    r = run_script("data/prepare_chat.py", f"--input={tmp_path / 'deep.jsonl'}", "--name=c", f"--data_dir={tmp_path}",
                   "--tokenizer=char", f"--skip_bad={skip}")
    assert_one_line_error(r, "holds no conversation" if skip else "line 1: not JSON this toolkit reads (nested too deep)")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="mounts a tmpfs: needs root and unshare")
def test_a_new_run_on_a_full_disk_is_one_line(data_dir, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    run = " ".join(shlex.quote(a) for a in [sys.executable, *train_args(data_dir, full / "out", "--max_iters=10")])
    script = (f"mount -t tmpfs -o size=64k tmpfs {full} && head -c 65536 /dev/zero > {full}/filler 2>/dev/null; "
              f"{run}")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    if "mount:" in r.stderr:
        pytest.skip(f"no tmpfs here: {r.stderr.strip()}")
    assert_one_line_error(r, "No space left on device")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_preparation_leaves_no_worker_traceback(tmp_path, shakespeare_text, sig):
    corpus = tmp_path / "big.txt"
    corpus.write_text("".join(shakespeare_text.replace("e", c) for c in "eaiouyxz" * 2))
    proc = subprocess.Popen([sys.executable, "data/prepare_text.py", f"--input={corpus}", "--name=big",
                             f"--data_dir={tmp_path}", "--tokenizer=gpt2", "--num_proc=2"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # the workers are encoding (for about two seconds more)
    proc.send_signal(sig)
    err = proc.stderr.read()  # until every process that holds the pipe (the workers too) has ended
    proc.wait()
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_a_worker_whose_parent_died_before_it_started_ends_itself():
    """The kill can land between a worker's fork and its PR_SET_PDEATHSIG: the worker finds another parent and exits
    (an orphan once waited for tasks forever, holding the killed-preparation test's pipe open)."""
    from gpt_toolkit.data import preparing
    pid = os.fork()
    if pid == 0:  # the worker: given a parent that is not its own, as after the kill
        try:
            preparing._worker_init(None, os.getppid() + 1)
        finally:
            os._exit(0)  # only reached without the check (or if it raised): never back into pytest
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 1


# ----------------------------------------------------------------------------- 9. messages that say what happened

def test_too_few_train_tokens_names_max_train_tokens(data_dir, tmp_path):
    r = run_script(*train_args(data_dir, tmp_path / "out", "--max_train_tokens=1"))
    line = assert_one_line_error(r, "block_size=32 is too long for the train split of 'shakespeare_char' (1 token): use a "
                                    "larger --max_train_tokens")
    assert "block_size=0" not in line
    r = run_script(*train_args(data_dir, tmp_path / "out", "--max_train_tokens=10"))
    assert_one_line_error(r, "(10 tokens): use --block_size=9 or less, or a larger --max_train_tokens")


@pytest.mark.slow
def test_two_exports_to_one_place_at_once_tell_the_loser_why(sampled_run, tmp_path):
    to = tmp_path / "hf"
    cmd = [sys.executable, "tools/export_hf.py", f"--out_dir={sampled_run}", f"--to={to}"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    loser = next(err for code, err in results if code)
    assert "disk" not in loser and ("another process" in loser or "already exists" in loser), loser
    assert (to / "config.json").exists()


def test_a_stopped_run_in_this_process_leaves_the_signal_handlers_as_they_were(data_dir, tmp_path):
    """A run stopped by a signal (in a tool or a test's process) gives SIGINT and SIGTERM back: the processes started
    afterwards would otherwise inherit an ignored Ctrl-C."""
    class CtrlC(Guard):
        def after_step(self, step, loss, norm, lr):
            if step + 1 == 3:
                os.kill(os.getpid(), signal.SIGINT)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    r = run_script(*train_args(data_dir, tmp_path / "out"), guard=CtrlC())
    assert r.returncode == 130, r.stderr
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
