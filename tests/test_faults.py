"""Nothing a user made is lost, whatever runs beside it: one writer per out_dir and per dataset directory, temp files
that are ours alone, --overwrite=True that replaces instead of deleting, datasets whose files switch together,
checkpoints that are verified on load, and logs that survive a full disk. Each fault is made real where a test can
make it: two processes, a SIGKILL, a file-size limit, flipped bytes, an exception between two renames."""
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_TRAIN, assert_one_line_error, build_dataset, run_script

from gpt_toolkit.core.files import TEMP_MARKER
from gpt_toolkit.core.locking import LOCK_NAME
from gpt_toolkit.data.dataset import Dataset
from gpt_toolkit.models.checkpoint import load_checkpoint, save_checkpoint
from gpt_toolkit.training.runlog import read_metrics

pytestmark = pytest.mark.precision  # its code path depends on the precision dtype=auto picks (.ci/run runs it in both)


def train_args(data_dir, out, *extra):
    return ["train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={out}", *extra]


def checkpoints(out):
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.pt"))}


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.fixture
def finished(data_dir, tmp_path):
    out = tmp_path / "out"
    assert run_script(*train_args(data_dir, out, "--max_iters=20")).returncode == 0
    return out


# ----------------------------------------------------------------------------- one writer per directory

@pytest.mark.slow
def test_a_second_writer_is_refused_whatever_its_flags_and_readers_still_work(data_dir, tmp_path):
    out = tmp_path / "busy"
    cmd = [sys.executable, *train_args(data_dir, out, "--max_iters=100000", "--lr_decay_iters=100000",
                                       "--log_interval=1")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / "latest.pt").exists())  # saved at step 20: a reader has something to read
        for extra in ([], ["--init_from=resume"], ["--overwrite=True"], ["--eval_only=True"]):
            r = run_script(*train_args(data_dir, out, *extra))
            assert_one_line_error(r, f"out_dir '{out}' is being written by pid {proc.pid} (train.py",
                                  "wait for it to finish or choose another --out_dir")
        r = run_script("sample.py", f"--out_dir={out}", "--checkpoint=latest.pt", "--max_new_tokens=5",
                       "--num_samples=1", "--device=cpu")
        assert r.returncode == 0, r.stderr
        assert proc.poll() is None  # the first run goes on, untouched
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the lock died with its process: a resume takes over, and logs each step once
    step = load_checkpoint(out / "latest.pt")["iter_num"]
    r = run_script(*train_args(data_dir, out, "--max_iters=100000", "--lr_decay_iters=100000", "--log_interval=1",
                                "--init_from=resume", f"--max_iters={step + 10}"))
    assert r.returncode == 0, r.stderr
    records, _ = read_metrics(out / "metrics.jsonl")
    iters = [r["iter"] for r in records if r["type"] == "train"]
    assert iters == list(range(step + 10)), "each step once, in order"


@pytest.mark.slow
def test_two_preparations_of_one_name_the_second_is_refused(tmp_path, shakespeare_text):
    big = tmp_path / "big.txt"
    big.write_text(shakespeare_text * 40, encoding="utf-8")  # ~45 MB: a preparation that takes a while
    first = subprocess.Popen([sys.executable, str(ROOT / "data" / "prepare_text.py"), f"--input={big}", "--name=x",
                              f"--data_dir={tmp_path}", "--tokenizer=gpt2", "--num_proc=1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    try:
        wait_for(lambda: (tmp_path / "x" / LOCK_NAME).exists() and (tmp_path / "x" / LOCK_NAME).read_text())
        small = tmp_path / "small.txt"
        small.write_text(shakespeare_text[:10000], encoding="utf-8")
        r = run_script("data/prepare_text.py", f"--input={small}", "--name=x", f"--data_dir={tmp_path}")
        assert_one_line_error(r, f"dataset directory '{tmp_path / 'x'}' is being written by pid {first.pid}",
                              "or prepare it under another --name")
        assert first.poll() is None and not (tmp_path / "x" / "train.bin").exists()
    finally:
        first.kill()
        first.wait()


def test_clean_up_keeps_files_named_like_temps_and_removes_dead_writers_temps(data_dir, tmp_path, shakespeare_text):
    out = tmp_path / "out"
    out.mkdir()
    users = {".notes.tmp": "notes", ".plan.tmp.md": "plan", "ckpt.pt.tmp": "mine"}
    for name, text in users.items():
        (out / name).write_text(text)
    (out / ".backup.tmp_old").mkdir()
    (out / ".backup.tmp_old" / "ckpt.pt").write_bytes(b"an old model")
    dead = out / f".latest.pt.{dead_pid()}.{TEMP_MARKER}"
    dead.write_bytes(b"torn")
    assert run_script(*train_args(data_dir, out, "--max_iters=20")).returncode == 0
    assert {n: (out / n).read_text() for n in users} == users
    assert (out / ".backup.tmp_old" / "ckpt.pt").read_bytes() == b"an old model"
    assert not dead.exists()
    ds = tmp_path / "data" / "mine"
    ds.mkdir(parents=True)
    (ds / ".raw.tmp.txt").write_text("my raw text")
    build_dataset(shakespeare_text[:20000], ds)
    assert (ds / ".raw.tmp.txt").read_text() == "my raw text"


# ----------------------------------------------------------------------------- --overwrite=True replaces

def test_overwrite_that_fails_before_saving_puts_the_old_checkpoints_back(data_dir, finished):
    before = checkpoints(finished)
    r = run_script(*train_args(data_dir, finished, "--overwrite=True", "--learning_rate=1e9", "--grad_clip=0",
                                "--log_interval=1"))
    assert_one_line_error(r, "NaN/Inf", "no checkpoint had been saved yet")
    assert "the earlier checkpoints are back (ckpt.pt, latest.pt)" in r.stdout
    assert checkpoints(finished) == before
    assert not list(finished.glob(".replaced.*"))


def test_overwrite_removes_the_old_checkpoints_only_after_its_first_save(data_dir, finished):
    before = checkpoints(finished)
    r = run_script(*train_args(data_dir, finished, "--overwrite=True", "--max_iters=20", "--seed=7"))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.index("set aside until this run's first save") < out.index("saving checkpoint") < out.index(
        "the earlier run's checkpoints are now replaced")
    assert checkpoints(finished).keys() == before.keys() and checkpoints(finished) != before
    assert not list(finished.glob(".replaced.*"))


@pytest.mark.slow
def test_overwrite_killed_before_its_first_save_gives_the_old_checkpoints_back(data_dir, finished):
    cmd = [sys.executable, *train_args(data_dir, finished, "--overwrite=True", "--max_iters=100000",
                                       "--lr_decay_iters=100000", "--eval_interval=100000", "--log_interval=1")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("iter 3:"):
            break
    assert not list(finished.glob("*.pt"))  # set aside while the new run trains
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = run_script(*train_args(data_dir, finished, "--init_from=resume", "--max_iters=30"))
    assert r.returncode == 0, r.stderr
    assert "put back the checkpoints (ckpt.pt, latest.pt)" in r.stdout and "resuming from" in r.stdout
    assert "at step 20" in r.stdout


# ----------------------------------------------------------------------------- datasets switch together

def test_a_dataset_interrupted_between_two_renames_is_refused_not_mixed(tmp_path, shakespeare_text, monkeypatch):
    ds = tmp_path / "mix"
    build_dataset(shakespeare_text[:50000], ds)
    real, calls = os.replace, []

    def killed_after_the_first_rename(src, dst):
        if str(dst).endswith(".bin"):
            calls.append(dst)
            if len(calls) == 2:
                raise KeyboardInterrupt  # as if the process died here: train.bin is new, val.bin and meta.json old
        return real(src, dst)
    monkeypatch.setattr(os, "replace", killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(shakespeare_text[50000:120000], ds)
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(Exception, match=r"train.bin is not the file meta.json lists .*re-run"):
        Dataset(tmp_path, "mix")
    build_dataset(shakespeare_text[50000:120000], ds)  # prepared again: whole
    Dataset(tmp_path, "mix")


def test_a_char_dataset_prepared_again_as_gpt2_leaves_no_char_vocabulary(tmp_path, shakespeare_text):
    ds = tmp_path / "swap"
    build_dataset(shakespeare_text[:50000], ds, "char")
    assert (ds / "meta.pkl").exists()
    build_dataset(shakespeare_text[:50000], ds, "gpt2")
    assert not (ds / "meta.pkl").exists()  # nanoGPT's scripts would read its 65-character vocabulary
    assert Dataset(tmp_path, "swap").meta["tokenizer"] == "gpt2"


def test_a_failed_preparation_leaves_no_empty_directory_and_names_are_checked(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    r = run_script("data/prepare_text.py", f"--input={tmp_path / 'empty.txt'}", "--name=new", f"--data_dir={tmp_path}")
    assert_one_line_error(r, "is empty")
    assert not (tmp_path / "new").exists()
    (tmp_path / "t.txt").write_text("some text " * 100)
    for name in ("", ".", "..", "a/b", ".hidden"):
        r = run_script("data/prepare_text.py", f"--input={tmp_path / 't.txt'}", f"--name={name}", f"--data_dir={tmp_path}")
        assert_one_line_error(r, "must be a plain directory name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "t.txt"]


# ----------------------------------------------------------------------------- verified checkpoints

def flip_bytes_of(path, tensor, value=1e6):
    """Overwrite 64 bytes of `tensor`'s data inside the checkpoint file with float32 `value`s, as a failing disk might."""
    data = bytearray(path.read_bytes())
    raw = tensor.detach().contiguous().view(torch.uint8).numpy().tobytes()[:64]
    at = data.find(raw)
    assert at > 0 and data.find(raw, at + 1) < 0
    data[at:at + 64] = np.full(16, value, dtype=np.float32).tobytes()
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_the_optimizer_state_stop_a_resume(data_dir, finished):
    for name in ("latest.pt", "ckpt.pt"):  # hard links: one file
        assert (finished / name).stat().st_ino == (finished / "latest.pt").stat().st_ino
    state = load_checkpoint(finished / "latest.pt")["optimizer"]["state"]
    flip_bytes_of(finished / "latest.pt", state[0]["exp_avg_sq"])
    r = run_script(*train_args(data_dir, finished, "--init_from=resume", "--max_iters=30"))
    assert_one_line_error(r, f"checkpoint {finished / 'latest.pt'} fails its checksum", "--verify_checkpoint=False")
    assert "ckpt.pt" not in r.stderr  # the same damaged file under another name: no way out
    r = run_script(*train_args(data_dir, finished, "--init_from=resume", "--max_iters=30", "--verify_checkpoint=False"))
    assert r.returncode == 0, r.stderr  # asked for: loaded anyway


def test_a_damaged_latest_pt_says_how_a_resume_goes_on_from_ckpt_pt_and_that_works(data_dir, finished):
    """train.py resumes from latest.pt by name: "use another checkpoint (ckpt.pt)" had no flag to follow. Where ckpt.pt
    is a file of its own, the message says to move latest.pt aside, and that resume goes on."""
    shutil.copy(finished / "ckpt.pt", finished / "copy.tmp")
    os.replace(finished / "copy.tmp", finished / "ckpt.pt")  # its own file, no longer latest.pt's hard link
    flip_bytes_of(finished / "latest.pt", load_checkpoint(finished / "latest.pt")["model"]["transformer.wte.weight"])
    r = run_script(*train_args(data_dir, finished, "--init_from=resume", "--max_iters=30"))
    latest = finished / "latest.pt"
    assert_one_line_error(r, f"checkpoint {latest} fails its checksum", f"move it aside (e.g. mv {latest} "
                             f"{latest}.damaged) and resume again: it continues from ckpt.pt")
    os.replace(latest, finished / "latest.pt.damaged")
    r = run_script(*train_args(data_dir, finished, "--init_from=resume", "--max_iters=30"))
    assert r.returncode == 0 and f"resuming from {finished / 'ckpt.pt'} at step 20" in r.stdout, r.stdout + r.stderr


def test_a_checkpoint_name_that_is_not_there_lists_those_that_are(finished):
    r = run_script("sample.py", f"--out_dir={finished}", "--checkpoint=ckpt", "--max_new_tokens=5")
    assert_one_line_error(r, f"no ckpt in {finished} (its checkpoints: ckpt.pt, latest.pt): pass one of them to "
                             f"--checkpoint")


def test_flipped_bytes_in_the_weights_stop_sample_evaluate_and_export(data_dir, finished, tmp_path):
    shutil.copy(finished / "latest.pt", finished / "ckpt_step00000020.pt")  # another checkpoint to point at
    weights = load_checkpoint(finished / "ckpt.pt")["model"]["transformer.wte.weight"]
    (finished / "ckpt.pt").unlink()  # its own file, not latest.pt's
    shutil.copy(finished / "latest.pt", finished / "ckpt.pt")
    flip_bytes_of(finished / "ckpt.pt", weights)
    for script, args in (("sample.py", ["--max_new_tokens=5", "--num_samples=1"]), ("tools/evaluate.py", []),
                         ("tools/export_hf.py", [f"--to={tmp_path / 'hf'}"])):
        r = run_script(script, f"--out_dir={finished}", *args)
        line = assert_one_line_error(r, "ckpt.pt fails its checksum", "ckpt_step00000020.pt")
        assert "latest.pt" in line, line
    assert not (tmp_path / "hf").exists()


def test_nanogpt_reads_our_checkpoint_with_its_checksum(finished):
    """nanoGPT loads with torch.load and takes the keys it knows: our checksum is one more plain entry."""
    ckpt = torch.load(finished / "ckpt.pt", map_location="cpu", weights_only=True)
    assert set(ckpt["checksum"]) == {"sha256", "weights_sha256"} and all(isinstance(v, str) for v in ckpt["checksum"].values())
    assert {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"} <= set(ckpt)


def test_a_hostile_checkpoint_is_named_in_a_whole_sentence(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    out = tmp_path / "evil"
    out.mkdir()
    torch.save({"model": Payload(), "model_args": {}}, out / "ckpt.pt")
    r = run_script("sample.py", f"--out_dir={out}")
    line = assert_one_line_error(r, "holds a Python object that weights-only loading refuses (posix.system)",
                                 "load only checkpoints you trust")
    assert "pwned" not in r.stdout + r.stderr and line.endswith("trust")


# ----------------------------------------------------------------------------- logs that survive

@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as Linux applies it")
def test_a_log_that_hits_the_file_size_limit_stops_the_run_after_saving(data_dir, tmp_path):
    out = tmp_path / "full"
    tiny = ["--n_layer=1", "--n_embd=16", "--n_head=2", "--grad_monitor_interval=1", "--log_interval=1",
            "--max_iters=1000", "--lr_decay_iters=1000", "--eval_interval=1000"]
    limit = 200_000  # the checkpoint (~70 KB) fits; metrics.jsonl (a gradient histogram per step) does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    r = subprocess.run([sys.executable, *train_args(data_dir, out, *tiny)], cwd=ROOT, capture_output=True, text=True,
                       preexec_fn=small_files, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: could not write {out / 'metrics.jsonl'} (File too large): saved "
                               f"{out / 'latest.pt'} at step "), lines[0]
    step = int(lines[0].split(" at step ")[1].split(";")[0])
    assert load_checkpoint(out / "latest.pt")["iter_num"] == step > 0
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())  # whole records only
    r = run_script(*train_args(data_dir, out, *tiny, "--init_from=resume", f"--max_iters={step + 3}",
                                "--grad_monitor_interval=0"))
    assert r.returncode == 0, r.stderr


def test_a_resume_drops_the_log_records_it_will_write_again(data_dir, finished):
    metrics = finished / "metrics.jsonl"
    records, _ = read_metrics(metrics)
    with open(metrics, "a", encoding="utf-8") as f:  # what a run killed after step 23's log line leaves behind
        for i in range(20, 24):
            f.write(json.dumps({"type": "train", "iter": i, "loss": 9.9, "lr": 0.0, "time_ms": 1.0, "mfu": -1.0}) + "\n")
        f.write('{"type": "train", "iter": 24, "lo')  # cut short by the kill
    r = run_script(*train_args(data_dir, finished, "--init_from=resume", "--max_iters=40", "--log_interval=1"))
    assert r.returncode == 0, r.stderr
    after, _ = read_metrics(metrics)
    iters = [r["iter"] for r in after if r["type"] == "train"]
    evals = [r["step"] for r in after if r["type"] == "eval"]
    assert len(iters) == len(set(iters)) and set(range(20, 40)) <= set(iters) and 9.9 not in [r["loss"] for r in after
                                                                                                if r["type"] == "train"]
    assert evals == [0, 20, 40]
    assert all(json.loads(line) for line in metrics.read_text().splitlines())
    assert after[:len(records)] == records  # what came before the checkpoint is kept as it was


# ----------------------------------------------------------------------------- one line, nothing lost

def test_a_full_disk_inside_torch_save_is_one_line(data_dir, finished, monkeypatch):
    before = checkpoints(finished)

    def torn(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")
    monkeypatch.setattr(torch, "save", torn)
    r = run_script(*train_args(data_dir, finished, "--init_from=resume", "--max_iters=40"))
    assert_one_line_error(r, "could not save the checkpoint", "file write failed", "the previous checkpoint is intact")
    assert checkpoints(finished) == before


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as Linux applies it")
def test_an_export_to_a_full_disk_is_one_line_and_leaves_nothing(finished, tmp_path):
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "export_hf.py"), f"--out_dir={finished}",
                        f"--to={tmp_path / 'hf'}"], capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert_one_line_error(r, f"could not write the export to {tmp_path / 'hf'}", "nothing was left behind")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_exports_and_preparations_into_places_that_cannot_be_written(finished, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    r = run_script("tools/export_hf.py", f"--out_dir={finished}", f"--to={blocker / 'hf'}")
    assert_one_line_error(r, f"could not write the export to {blocker / 'hf'}", "choose another --to")
    (tmp_path / "t.txt").write_text("some text " * 100)
    r = run_script("data/prepare_text.py", f"--input={tmp_path / 't.txt'}", "--name=x", f"--data_dir={blocker}")
    assert_one_line_error(r, "cannot create the dataset directory", "choose another --data_dir")


def test_an_export_killed_mid_write_is_cleaned_up_by_the_next(finished, tmp_path):
    left = tmp_path / f".hf.{dead_pid()}.{TEMP_MARKER}"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"\0" * 1000)
    r = run_script("tools/export_hf.py", f"--out_dir={finished}", f"--to={tmp_path / 'hf2'}")
    assert r.returncode == 0, r.stderr
    assert not left.exists() and (tmp_path / "hf2" / "model.safetensors").exists()


def edit_checkpoint(out, change):
    """Edit the checkpoints as a user's script might (saved back through save_checkpoint: a valid checksum)."""
    for name in ("ckpt.pt", "latest.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        change(ckpt)
        (out / name).unlink()
        save_checkpoint(ckpt, out / name)


EDITED = [
    ("no optimizer", lambda c: c.pop("optimizer"), "resume", "has no optimizer state or step"),
    ("n_head not dividing n_embd", lambda c: c["model_args"].update(n_head=3), "sample", "not divisible by n_head=3"),
    ("n_embd changed", lambda c: c["model_args"].update(n_embd=64, n_head=2), "evaluate",
     "the checkpoint's weights do not fit its model_args"),
    ("n_embd changed", lambda c: c["model_args"].update(n_embd=64, n_head=2), "export",
     "the checkpoint's weights do not fit its model_args"),
    ("meta without itos", lambda c: c["meta"].pop("itos"), "sample", "has no list 'itos' of its 65 characters"),
    ("config not a dict", lambda c: c.update(config=["x"]), "sample", "'config' is not a dict"),
]


@pytest.mark.parametrize("what, change, script, message", EDITED, ids=[f"{e[0]} ({e[2]})" for e in EDITED])
def test_edited_checkpoints_are_one_line(data_dir, finished, tmp_path, what, change, script, message):
    edit_checkpoint(finished, change)
    args = {"resume": train_args(data_dir, finished, "--init_from=resume", "--max_iters=30"),
            "sample": ["sample.py", f"--out_dir={finished}", "--max_new_tokens=5"],
            "evaluate": ["tools/evaluate.py", f"--out_dir={finished}", f"--data_dir={data_dir}"],
            "export": ["tools/export_hf.py", f"--out_dir={finished}", f"--to={tmp_path / 'hf'}"]}[script]
    assert_one_line_error(run_script(*args), message)


@pytest.mark.parametrize("meta, message", [({"tokenizer": "char", "itos": ["a"]}, "vocab_size=None, not a positive int"),
                                           ({"tokenizer": "char", "vocab_size": "65", "itos": ["a"]}, "vocab_size='65'")])
def test_an_edited_meta_json_is_one_line(data_dir, tmp_path, meta, message):
    shutil.copytree(data_dir / "shakespeare_char", tmp_path / "shakespeare_char")
    (tmp_path / "shakespeare_char" / "meta.json").write_text(json.dumps(meta))
    r = run_script(*train_args(tmp_path, tmp_path / "out"))
    assert_one_line_error(r, f"the vocabulary file in {tmp_path / 'shakespeare_char'} gives {message}",
                          "re-run that dataset's prepare.py")


def test_damaged_transformers_directories_are_one_line(finished, tmp_path):
    hf = tmp_path / "hf"
    assert run_script("tools/export_hf.py", f"--out_dir={finished}", f"--to={hf}").returncode == 0
    truncated = tmp_path / "truncated"
    shutil.copytree(hf, truncated)
    data = (hf / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:len(data) // 2])
    disagreeing = tmp_path / "disagreeing"
    shutil.copytree(hf, disagreeing)
    config = json.loads((hf / "config.json").read_text())
    (disagreeing / "config.json").write_text(json.dumps({**config, "n_embd": 64, "n_head": 4}))
    pickled = tmp_path / "pickled"
    shutil.copytree(hf, pickled)
    (pickled / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"transformer.wte.weight": Payload()}, pickled / "pytorch_model.bin")
    for directory in (truncated, disagreeing, pickled):
        r = run_script("sample.py", f"--init_from={directory}", "--max_new_tokens=5", "--num_samples=1")
        assert_one_line_error(r, f"init_from={directory}: could not load its weights")
        assert "pwned" not in r.stdout + r.stderr


def test_a_jsonl_line_with_half_a_surrogate_pair_is_one_line(tmp_path):
    (tmp_path / "docs.jsonl").write_text('{"text": "fine"}\n{"text": "hel\\ud800lo"}\n{"text": "more"}\n')
    for tokenizer in ("char", "gpt2"):
        r = run_script("data/prepare_text.py", f"--input={tmp_path / 'docs.jsonl'}", "--name=d",
                       f"--data_dir={tmp_path}", f"--tokenizer={tokenizer}")
        assert_one_line_error(r, "docs.jsonl line 2: its text holds '\\ud800' at character 3")


def test_a_plot_written_over_a_directory_is_one_line(finished, tmp_path):
    r = run_script("tools/plot_loss.py", finished, "-o", tmp_path)
    assert_one_line_error(r, f"the plot's output {tmp_path} is a directory", "-o")


SIGNAL_ON_IMPORT = """import importlib.abc, os, signal, sys
class SignalOnImport(importlib.abc.MetaPathFinder):
    sent = False
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["SIGNAL_ON_IMPORT"] and not self.sent:
            self.sent = True  # once: the import that follows a swallowed one must not get a second signal
            os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL_TO_SEND"]))  # handled inside this module's import
        return None
sys.meta_path.insert(0, SignalOnImport())
"""


@pytest.mark.slow
@pytest.mark.parametrize("module, sig", [("torch", "SIGINT"), ("numpy.__config__", "SIGINT"),
                                         ("numpy._typing._array_like", "SIGINT"), ("torch.nn.functional", "SIGINT"),
                                         ("gpt_toolkit.training.guards", "SIGINT"), ("torch", "SIGTERM"),
                                         ("gpt_toolkit.training.guards", "SIGTERM")])
def test_ctrl_c_or_sigterm_while_a_script_imports_is_one_line(tmp_path, module, sig):
    """The signal lands inside the first import of `module` (a sitecustomize's import hook sends it), at stages of
    train.py's start-up: torch's import; numpy's inside torch's C extension, which swallows the KeyboardInterrupt
    (and imports numpy again later) or leaves numpy half-imported; the toolkit's own. SIGTERM says so too (it used to
    end the process without a word)."""
    (tmp_path / "sitecustomize.py").write_text(SIGNAL_ON_IMPORT)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), SIGNAL_ON_IMPORT=module, SIGNAL_TO_SEND=sig)
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "config/train_shakespeare_char_cpu.py",
                        f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 128 + getattr(signal, sig), (r.returncode, r.stderr)
    assert r.stderr.strip().splitlines() == ["interrupted: stopped before finishing; no file was left half-written"]
    assert not (tmp_path / "out").exists()


def test_too_many_samples_at_once_is_refused_before_generating(finished):
    r = run_script("sample.py", f"--out_dir={finished}", "--num_samples=100000000", "--max_new_tokens=5")
    assert_one_line_error(r, "num_samples=100,000,000 generated as one batch needs about", "use --num_samples=")


@pytest.mark.parametrize("key", ["eval_iters", "gradient_accumulation_steps"])
def test_rows_that_cannot_be_held_name_their_key(data_dir, tmp_path, key):
    r = run_script(*train_args(data_dir, tmp_path / "out", f"--{key}=1000000000000"))
    assert_one_line_error(r, f"{key}=1000000000000", f"use a smaller --{key}")
    assert not (tmp_path / "out").exists()


def test_a_model_scored_on_another_vocabulary_is_told_so(finished, data_dir, tmp_path, shakespeare_text):
    build_dataset(shakespeare_text[:30000], tmp_path / "shakespeare", "gpt2")
    r = run_script("tools/evaluate.py", f"--out_dir={finished}", "--dataset=shakespeare", f"--data_dir={tmp_path}")
    assert_one_line_error(r, "the model's vocabulary (char, 65 tokens (characters ", "from dataset 'shakespeare_char') "
                             "is not dataset 'shakespeare''s (gpt2, 50,257 tokens)", "--dataset=shakespeare_char")


def test_huge_losses_print_as_inf(finished, data_dir, monkeypatch):
    from gpt_toolkit.training.evaluation import Score, Scoring
    monkeypatch.setattr(Scoring, "score", lambda *a, **k: Score(812.5, 1000, 1000))
    r = run_script("tools/evaluate.py", f"--out_dir={finished}", f"--data_dir={data_dir}")
    assert r.returncode == 0, r.stderr
    assert "val loss 812.5000 (perplexity inf) over 1,000 tokens; 1172.1897 bits per byte over 1,000 bytes" in r.stdout
