"""Faults on one torchrun process that the others must hear of: rank 0 writes the logs and checkpoints, so a write
that fails there (a file-size limit here, a full disk for a user) must stop every process without a hang or a
traceback. The launches run at once (their start-ups overlap)."""
import json
import re
import resource
import signal

import pytest
from conftest import DDP_RUN as RUN
from conftest import ROOT, run_script, torchrun_commands, wait_all

from gpt_toolkit.models.checkpoint import load_checkpoint

TINIER = ["--n_layer=1", "--n_embd=16", "--max_iters=1000", "--lr_decay_iters=1000", "--eval_interval=1000"]


def small_files(limit):
    """A preexec_fn: every file the processes write is capped at `limit` bytes, as on a disk that fills up."""
    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG (as Python has it)
    return cap


@pytest.fixture(scope="module")
def full(data_dir, tmp_path_factory):
    """Two runs on a small disk: one whose metrics.jsonl (a gradient histogram a step) outgrows a 200 kB limit that
    its checkpoint (~70 kB) fits, and one whose first checkpoint (~300 kB) does not fit 100 kB.
    Returns {name: (out_dir, result)}."""
    root = tmp_path_factory.mktemp("full")
    log = root / "log"
    [log_cmd] = torchrun_commands(ROOT / "train.py", *RUN, *TINIER, "--grad_monitor_interval=1", "--log_interval=5",
                                  f"--data_dir={data_dir}", f"--out_dir={log}")
    save = root / "save"
    [save_cmd] = torchrun_commands(ROOT / "train.py", *RUN, f"--data_dir={data_dir}", f"--out_dir={save}")
    log_result, save_result = wait_all([log_cmd, save_cmd], 240, preexec_fns=[small_files(200_000), small_files(100_000)],
                                       check=False)
    return {"log": (log, log_result), "save": (save, save_result)}


def said(stderr):
    """The 'error: ' lines, and whether a worker printed a traceback ([rankN]: lines; torchrun's own failure summary
    after them is its own, docs/distributed.md)."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")], "]: Traceback" in stderr


@pytest.mark.slow
def test_a_log_that_fails_on_rank_0_stops_every_process_after_saving_the_state(full, data_dir):
    """The other process learns of it once a multiple of log_interval steps is done, and both save together (the
    save gathers every process's RNG state): none waits forever in a collective that the other never joins. One line
    says what was saved, and a run resumes from it."""
    out, r = full["log"]
    errors, traceback = said(r.stderr)
    assert r.returncode != 0 and not traceback and len(errors) == 1, r.stderr[-3000:]
    m = re.fullmatch(rf"error: could not write {re.escape(str(out / 'metrics.jsonl'))} \(File too large\): saved "
                     rf"{re.escape(str(out / 'latest.pt'))} at step (\d+); continue with --init_from=resume once there "
                     rf"is space", errors[0])
    assert m, errors[0]
    ckpt = load_checkpoint(out / "latest.pt")
    assert ckpt["iter_num"] == int(m.group(1)) > 0 and len(ckpt["rng"]) == 2  # both processes' RNG states
    assert ckpt["iter_num"] % 5 == 0  # where the processes agree
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())  # whole records only
    r = run_script("train.py", *RUN, *TINIER, "--init_from=resume", f"--max_iters={ckpt['iter_num'] + 2}",
                   f"--data_dir={data_dir}", f"--out_dir={out}")  # one process resumes it too
    assert r.returncode == 0 and f"at step {ckpt['iter_num']}" in r.stdout, r.stderr


@pytest.mark.slow
def test_a_save_that_fails_on_rank_0_is_one_line_from_rank_0_alone(full):
    """Rank 0 says so and exits; the other process, whose next collective then finds rank 0 gone, stops without a
    traceback of its own (torchrun stops it, or it says one line)."""
    out, r = full["save"]
    errors, traceback = said(r.stderr)
    assert r.returncode != 0 and not traceback, r.stderr[-3000:]
    assert errors[0].startswith(f"error: could not save the checkpoint to {out / 'latest.pt'} (File too large)"), errors
    assert errors[1:] in ([], ["error: another process of this torchrun job failed (its error is above), so this one "
                               "stopped too (gloo: Connection closed by peer)"]), errors


GLOO_PEER_GONE = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                  "[127.0.0.1]:12676. This is typically caused by a remote worker crashing.")


@pytest.mark.parametrize("world_size, error, said", [
    ("2", RuntimeError(GLOO_PEER_GONE), True),
    ("1", RuntimeError(GLOO_PEER_GONE), False),  # one process: not a peer's exit
    ("2", ConnectionResetError(104, "Connection reset by peer"), False),  # a network error of another kind (a tracker)
    ("2", RuntimeError("[gloo] Timed out waiting 1800000ms for recv operation"), False),  # a real desync
])
def test_a_collective_whose_peer_exited_is_one_line_after_the_wait(monkeypatch, capsys, world_size, error, said):
    """Under torchrun, gloo's error for a peer that exited (that peer's own error is the one to read) waits, then is
    one line; any other error stays what it is."""
    import time

    from gpt_toolkit.core import errors
    monkeypatch.setattr(errors, "OTHER_RANKS_WAIT_S", 0.5)
    monkeypatch.setenv("WORLD_SIZE", world_size)

    def main(argv):
        raise error
    start = time.monotonic()
    with pytest.raises(SystemExit if said else type(error)) as raised:
        errors.run_main(main, [])
    if said:
        assert raised.value.code == 1 and time.monotonic() - start >= 0.5
        assert capsys.readouterr().err == ("error: another process of this torchrun job failed (its error is above), "
                                           "so this one stopped too (gloo: Connection closed by peer)\n")
