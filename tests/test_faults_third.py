"""Nothing lost, round three (the server's faults are in test_serve_hostile.py): a file the user names is never
replaced by surprise, inputs nobody bounded are refused in one line, the lock names its real holder, and every
script and tool stops on Ctrl-C or SIGTERM promptly, in one line. Each fault is made real: a file that appears during
an export, a FIFO, a lock held by another process, signals sent to running tools."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY_TRAIN, assert_one_line_error, run_script

from gpt_toolkit.core.errors import INTERRUPTED
from gpt_toolkit.core.locking import LOCK_NAME

pytestmark = pytest.mark.precision  # its runs train in the precision dtype=auto picks (.ci/run runs it in both)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("third") / "run"
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=20", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def lora_run(run, data_dir):
    out = run.parent / "lora"
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=20", "--lora_rank=4", f"--init_from={run}",
                   f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return out


# ----------------------------------------------------------------------------- a file the user names

def test_export_gguf_never_replaces_a_file_that_appears_during_the_export(run, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from gpt_toolkit.models import gguf_export
    to = tmp_path / "model.gguf"
    encoded = gguf_export.encoded

    def and_meanwhile(*args):  # another process makes the file while the export writes its own
        if not to.exists():
            to.write_text("the user's own file")
        return encoded(*args)
    monkeypatch.setattr(gguf_export, "encoded", and_meanwhile)
    r = run_script("tools/export_gguf.py", f"--out_dir={run}", f"--to={to}")
    assert_one_line_error(r, f"{to} appeared while this file was being written", "choose another name")
    assert to.read_text() == "the user's own file" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_export_gguf_says_an_out_dir_that_is_a_file_is_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    r = run_script("tools/export_gguf.py", f"--out_dir={tmp_path / 'notes.txt'}", f"--to={tmp_path / 'a.gguf'}")
    assert_one_line_error(r, f"out_dir '{tmp_path / 'notes.txt'}' is a file, not a run's directory")


@pytest.mark.parametrize("tool", ["plot_loss", "summarize_experiments"])
def test_an_output_that_is_not_ours_is_never_replaced(run, tmp_path, tool):
    """-o pointed at a checkpoint, a user's PNG, a link, a directory: refused in one line, all left as they were; a
    plot or table the tool wrote itself is replaced by the next run."""
    exps = tmp_path / "experiments"
    exps.mkdir()
    os.symlink(run, exps / "exp1_run")
    args = [str(run)] if tool == "plot_loss" else [str(exps)]
    before = digest(run / "ckpt.pt")
    r = run_script(f"tools/{tool}.py", *args, "-o", run / "ckpt.pt")
    assert_one_line_error(r, f"{run / 'ckpt.pt'} exists and is not a", "this toolkit wrote", "choose another -o")
    assert digest(run / "ckpt.pt") == before
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"a photo, not a plot" * 10)
    os.symlink(tmp_path / "nowhere", tmp_path / "link.png")
    for taken in (photo, tmp_path / "link.png"):
        assert_one_line_error(run_script(f"tools/{tool}.py", *args, "-o", taken), "is not a", "choose another -o")
    assert photo.read_bytes().endswith(b"not a plot" * 1) and os.readlink(tmp_path / "link.png") == str(tmp_path / "nowhere")
    assert_one_line_error(run_script(f"tools/{tool}.py", *args, "-o", tmp_path), f"output {tmp_path} is a directory",
                          f"-o {tmp_path / 'out'}")
    ours = tmp_path / ("plot.png" if tool == "plot_loss" else "table.txt")
    for _ in range(2):  # written, then replaced by the same tool
        r = run_script(f"tools/{tool}.py", *args, "-o", ours)
        assert r.returncode == 0 and ours.stat().st_size > 100, r.stderr


def test_the_report_replaces_only_its_own_report(run, tmp_path):
    exps = tmp_path / "experiments"
    exps.mkdir()
    os.symlink(run, exps / "exp1_run")
    (exps / "REPORT.md").write_text("my own notes")
    r = run_script("tools/report.py", exps, "--samples=False", "--whole_split=False")
    assert_one_line_error(r, f"{exps / 'REPORT.md'} exists and is not a report this toolkit wrote")
    assert not (exps / "exp1_comparison.png").exists()  # refused before any work
    (exps / "REPORT.md").unlink()
    for _ in range(2):
        assert run_script("tools/report.py", exps, "--samples=False", "--whole_split=False").returncode == 0


def test_the_report_skips_a_garbage_checkpoint_and_says_so(run, tmp_path):
    import shutil
    exps = tmp_path / "experiments"
    exps.mkdir()
    shutil.copytree(run, exps / "exp1_good")
    shutil.copytree(run, exps / "exp1_bad")
    (exps / "exp1_bad" / "ckpt.pt").write_bytes(b"garbage" * 100)
    r = run_script("tools/report.py", exps, "--samples=True", "--whole_split=True")
    assert r.returncode == 0, r.stderr
    assert "skipped the whole-split score of" in r.stderr and "exp1_bad" in r.stderr
    assert "skipped the sample of exp1_bad" in r.stderr
    report = (exps / "REPORT.md").read_text()
    assert "| exp1_good |" in report and "### exp1_good" in report and "### exp1_bad" not in report


@pytest.mark.parametrize("kind", ["an empty directory", "nothing"])
def test_merge_lora_and_export_hf_refuse_a_link_as_to(lora_run, tmp_path, kind):
    pytest.importorskip("transformers")
    target = tmp_path / "target"
    if kind == "an empty directory":
        target.mkdir()
    os.symlink(target, tmp_path / "to")
    for tool in ("merge_lora", "export_hf"):
        r = run_script(f"tools/{tool}.py", f"--out_dir={lora_run}", f"--to={tmp_path / 'to'}", "--checkpoint=latest.pt")
        assert_one_line_error(r, f"--to={tmp_path / 'to'} is a symbolic link (to {target})", "a new directory")
    assert os.readlink(tmp_path / "to") == str(target) and (not target.exists() or not any(target.iterdir()))


def test_merge_lora_on_a_full_disk_gives_export_advice_not_training_advice(lora_run, tmp_path):
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "merge_lora.py"), f"--out_dir={lora_run}",
                        "--checkpoint=latest.pt", f"--to={tmp_path / 'merged'}"], capture_output=True, text=True,
                       preexec_fn=small_files, timeout=300)
    line = assert_one_line_error(r, "could not save the checkpoint", f"nothing was kept at {tmp_path / 'merged'}",
                                 "choose another --to")
    assert "--init_from=resume" not in line and not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- inputs nobody bounded

def test_a_lora_rank_above_the_models_width_is_refused(run, data_dir, tmp_path):
    r = run_script("train.py", *TINY_TRAIN, "--lora_rank=100000", f"--init_from={run}", f"--data_dir={data_dir}",
                   f"--out_dir={tmp_path / 'lora'}")
    assert_one_line_error(r, "lora_rank=100000 is above the smallest dimension of the matrices it adapts (32",
                          "--lora_rank=8")
    r = run_script("train.py", *TINY_TRAIN, "--lora_rank=32", "--max_iters=1", f"--init_from={run}",
                   f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'lora32'}")
    assert r.returncode == 0, r.stderr  # n_embd itself is the highest rank, and allowed


@pytest.mark.slow
@pytest.mark.parametrize("name", [LOCK_NAME, "training.log", "metrics.jsonl"])
def test_a_fifo_where_a_run_keeps_a_file_is_refused_not_waited_on(data_dir, tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / name)
    r = run_script("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", subprocess_only=True,
                   timeout=120)  # opening it used to wait for ever for the FIFO's other end
    assert_one_line_error(r, f"{out / name} is not a regular file (a FIFO", "move it away")


@pytest.mark.slow
def test_the_lock_refusal_names_the_process_that_holds_it_not_the_one_the_file_names(data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text("pid 4194000 (train.py --out_dir=out, since 01:02:03)\n")  # an earlier run's line
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
                               str(out / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        r = run_script("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}")
    finally:
        holder.kill()
        holder.wait()
    line = assert_one_line_error(r, f"out_dir '{out}' is being written by pid {holder.pid} (")
    assert "4194000" not in line and "fcntl.flock" in line


def test_prepare_chat_builds_a_character_vocabulary_from_both_splits(tmp_path):
    lines = [{"prompt": "hello", "completion": "world"}] * 9 + [{"prompt": "zebra", "completion": "quixotic!"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = run_script("data/prepare_chat.py", f"--input={tmp_path / 'c.jsonl'}", "--name=c", "--tokenizer=char",
                   f"--data_dir={tmp_path}")
    assert r.returncode == 0, r.stderr  # 'z', 'q', 'x' and '!' occur only in the val conversation
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert {"z", "q", "x", "!"} <= set(meta["itos"])
    r = run_script("data/prepare_chat.py", f"--input={tmp_path / 'c.jsonl'}", "--name=d", "--tokenizer=char",
                   f"--data_dir={tmp_path}", "--block_size=-1")
    assert_one_line_error(r, "--block_size=-1 must be a positive number of tokens")


# ----------------------------------------------------------------------------- signals, in every script and tool

def started(cmd, marker, *, stream="stderr"):
    """A script in a process of its own, once `marker` has appeared in its output (it is at work by then)."""
    proc = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seen = b""
    source = proc.stderr if stream == "stderr" else proc.stdout
    while marker not in seen:
        chunk = os.read(source.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"{cmd[0]} ended before {marker!r}: {seen[-2000:]!r}")
        seen += chunk
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("tool", ["sample", "evaluate", "prepare"])
def test_a_signal_stops_a_tool_at_work_in_one_line(run, data_dir, tmp_path, tool, sig, shakespeare_text):
    if tool == "sample":
        proc = started(["sample.py", f"--out_dir={run}", "--max_new_tokens=1000000", "--num_samples=1"], b"\n",
                       stream="stdout")
    elif tool == "evaluate":
        proc = started(["tools/evaluate.py", f"--out_dir={run}", "--split=train", "--batch_size=1",
                        f"--data_dir={data_dir}"], b"tok/s]")
    else:
        (tmp_path / "big.txt").write_text(shakespeare_text * 20, encoding="utf-8")
        proc = started(["data/prepare_text.py", f"--input={tmp_path / 'big.txt'}", "--name=big", "--tokenizer=gpt2",
                        f"--data_dir={tmp_path}", "--num_proc=2"], b"prepare big")
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    err = err.decode()
    assert proc.returncode == 128 + sig, (proc.returncode, err[-2000:])
    assert err.rstrip().endswith(INTERRUPTED) and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "big" / "train.bin").exists()
    print(f"{tool} stopped {took:.2f} s after {signal.Signals(sig).name}")


def test_the_lr_finder_refuses_its_output_before_its_training(run, data_dir):
    before = digest(run / "ckpt.pt")
    r = run_script("tools/lr_finder.py", *TINY_TRAIN, f"--data_dir={data_dir}", "-o", run / "ckpt.pt")
    assert_one_line_error(r, f"{run / 'ckpt.pt'} exists and is not a plot this toolkit wrote")
    assert "range test" not in r.stdout and digest(run / "ckpt.pt") == before
