"""Beyond one process: DDP across two "nodes" (two torchrun launches on 127.0.0.1, as on two machines), and FSDP,
which shards weights, gradients and AdamW state and trains to the same losses as DDP."""
import json
import re
import subprocess

import pytest
from conftest import AUTO_DTYPE, ROOT, assert_one_line_error, run_script, run_torchrun, torchrun_commands, wait_all
from conftest import DDP_RUN as RUN

from gpt_toolkit.models.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # every test here launches torchrun


def losses(out_dir):
    """Every logged loss, by (kind, step)."""
    out = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["type"] == "eval":
            out[("eval", r["step"])] = r["val_loss"]
            out[("train_eval", r["step"])] = r["train_loss"]
        else:
            out[("iter", r["iter"])] = r["loss"]
    return out


@pytest.fixture(scope="module")
def launched(data_dir, tmp_path_factory):
    """Every run the tests below compare, launched at once (their start-ups overlap): a DDP run as two nodes of one
    process each, recomputing its blocks in the backward pass (activation checkpointing under DDP: the comparisons with
    one process and with FSDP hold with it); an FSDP run; and the same FSDP run stopped at step 10 with activation
    checkpointing (which must not change a single loss). Returns {name: (out_dir, stdout)}."""
    root = tmp_path_factory.mktemp("launched")
    ddp = torchrun_commands(ROOT / "train.py", *RUN, "--activation_checkpointing=True", f"--data_dir={data_dir}",
                            f"--out_dir={root / 'ddp'}", nproc=1, nodes=2)
    fsdp = [ROOT / "train.py", *RUN, "--parallel=fsdp", f"--data_dir={data_dir}"]
    full = torchrun_commands(*fsdp, f"--out_dir={root / 'full'}")
    stopped = torchrun_commands(*fsdp, "--max_iters=10", "--activation_checkpointing=True", f"--out_dir={root / 'stopped'}")
    results = wait_all([*ddp, *full, *stopped], timeout=300)
    return {"ddp": (root / "ddp", results[0].stdout), "full": (root / "full", results[2].stdout),
            "stopped": (root / "stopped", results[3].stdout)}


@pytest.fixture(scope="module")
def ddp_run(launched):
    return launched["ddp"]


@pytest.fixture(scope="module")
def fsdp_run(launched):
    return launched


def test_ddp_across_two_nodes_trains_saves_and_samples(ddp_run, data_dir, tmp_path):
    out, stdout = ddp_run
    assert stdout.count("step 0: train loss") == 1, "only rank 0 logs"
    assert "2 process(es)" in stdout and "ddp: weights, gradients and AdamW state take" in stdout
    evals = {k[1]: v for k, v in losses(out).items() if k[0] == "eval"}
    assert sorted(evals) == [0, 10, 20] and evals[20] < evals[0]
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 20 and len(load_checkpoint(out / "latest.pt")["rng"]) == 2
    r = run_script("sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=20", "--start=KING:")
    assert r.returncode == 0 and r.stdout.startswith("KING:"), r.stderr
    # the same rows and maths as one process with the same accumulation: the losses agree
    single = run_script("train.py", *RUN, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr
    one = {k[1]: v for k, v in losses(tmp_path / "single").items() if k[0] == "eval"}
    assert one == pytest.approx(evals, abs=2e-3)


def test_fsdp_trains_like_ddp_and_holds_a_shard(ddp_run, fsdp_run):
    (ddp_out, ddp_stdout), (out, stdout) = ddp_run, fsdp_run["full"]
    ddp, fsdp = losses(ddp_out), losses(out)
    assert set(ddp) == set(fsdp) and len(ddp) == 20 + 2 * 3
    assert fsdp == pytest.approx(ddp, abs=1e-5)
    per_process = {name: float(re.search(r"weights, gradients and AdamW state take ([\d.]+) MB per process", text).group(1))
                   for name, text in (("ddp", ddp_stdout), ("fsdp", stdout))}
    assert per_process["fsdp"] == pytest.approx(per_process["ddp"] / 2, rel=0.05)  # two shards


def test_fsdp_resume_is_exact_and_its_checkpoint_is_the_usual_one(fsdp_run, data_dir):
    """Stop an FSDP run at step 10 and resume it under FSDP: the very same losses as the run that never stopped
    (the optimizer state cut back into shards), although it recomputes its blocks (activation checkpointing) and the
    reference does not. The checkpoint holds full tensors: one process resumes it too."""
    (ref, _), (out, _) = fsdp_run["full"], fsdp_run["stopped"]
    ckpt = load_checkpoint(out / "latest.pt")
    assert ckpt["model"]["lm_head.weight"].shape == (65, 32) and ckpt["optimizer"]["state"][0]["exp_avg"].shape == (65, 32)
    r = run_torchrun(ROOT / "train.py", *RUN, "--parallel=fsdp", "--init_from=resume", "--activation_checkpointing=True",
                     f"--data_dir={data_dir}", f"--out_dir={out}")
    assert "resuming from" in r.stdout and "at step 10" in r.stdout
    expected = {k: v for k, v in losses(ref).items() if k[1] >= 10}
    got = losses(out)
    assert {k: got[k] for k in expected} == expected  # bit for bit
    r = run_script("train.py", *RUN, "--init_from=resume", "--max_iters=25", "--lr_decay_iters=25",
                   f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "no RNG state for 1 process(es)" in r.stdout and "step 25:" in r.stdout


@pytest.mark.parametrize("extra, fragment", [
    ([], "parallel=fsdp shards the model across torchrun processes: launch it with torchrun"),
    (["--grad_monitor_interval=5"], "grad_monitor_interval looks at the whole model in one process"),
    (["--parallel=zero"], "parallel must be one of ddp, fsdp"),
])
def test_fsdp_refusals_before_any_work(data_dir, tmp_path, extra, fragment):
    out = tmp_path / "refused"
    r = run_script("train.py", *RUN, "--parallel=fsdp", *extra, f"--data_dir={data_dir}", f"--out_dir={out}")
    assert_one_line_error(r, fragment, code=2)
    assert not out.exists()


def test_fsdp_with_the_default_dtype_and_early_stopping(data_dir, tmp_path):
    """dtype=auto over sharded weights (bf16 autocast on CPUs with bf16), and early stopping decided on rank 0 and
    followed by every process: on 2000 training tokens the model overfits and stops, and the best model is saved whole."""
    out = tmp_path / "early"
    r = run_torchrun(ROOT / "train.py", *RUN, "--parallel=fsdp", "--dtype=auto", "--max_iters=400", "--lr_decay_iters=400",
                     "--gradient_accumulation_steps=2", "--log_interval=50", "--max_train_tokens=2000",
                     "--learning_rate=1e-2", "--early_stop_patience=2", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert f"dtype {AUTO_DTYPE}" in r.stdout
    stopped = re.search(r"early stopping at step (\d+): .*\(best ([\d.]+) at step (\d+)\)", r.stdout)
    assert stopped, r.stdout[-2000:]
    assert int(stopped.group(1)) == int(stopped.group(3)) + 2 * 10 < 400
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == int(stopped.group(3))


@pytest.mark.parametrize("local_rank, waits", [("0", False), ("1", True)])
def test_a_settings_error_on_another_rank_waits_for_the_first_to_say_it(monkeypatch, capsys, local_rank, waits):
    """A process other than a node's first waits before it exits (torchrun stops it once the first has said the error
    and exited: one that exited first had torchrun stop the first before its line); still here after the wait, it
    found an error of its own, and says it. The wait is counted (errors' time.sleep recorded), not timed."""
    import types

    from gpt_toolkit.core import errors
    slept = []
    monkeypatch.setattr(errors, "time", types.SimpleNamespace(sleep=slept.append))
    monkeypatch.setenv("LOCAL_RANK", local_rank)

    def main(argv):
        raise errors.ConfigError("bad setting: use --good")
    with pytest.raises(SystemExit) as exit_:
        errors.run_main(main, [])
    assert exit_.value.code == 2 and capsys.readouterr().err == "error: bad setting: use --good\n"
    assert slept == ([errors.OTHER_RANKS_WAIT_S] if waits else [])


@pytest.mark.parametrize("accum, world, use", [(1, 2, 2), (3, 2, 4), (5, 4, 4), (7, 4, 8)])
def test_accumulation_that_does_not_split_over_the_processes_names_the_value_to_use(monkeypatch, accum, world, use):
    from gpt_toolkit.core.config import load_config
    from gpt_toolkit.core.errors import UserError
    from gpt_toolkit.training.distributed import ranks
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg, _ = load_config([f"--gradient_accumulation_steps={accum}"])
    with pytest.raises(UserError, match=rf"must be a multiple of the {world} DDP processes .*: use "
                                        rf"--gradient_accumulation_steps={use}$"):
        ranks(cfg)


@pytest.mark.slow
def test_a_settings_error_under_torchrun_is_said_once(data_dir, tmp_path):
    """Both processes find it; the first says it (torchrun's own failure summary follows, docs/distributed.md)."""
    [cmd] = torchrun_commands(ROOT / "train.py", *RUN, "--gradient_accumulation_steps=3", f"--data_dir={data_dir}",
                              f"--out_dir={tmp_path / 'o'}")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    said = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert said == ["error: gradient_accumulation_steps=3 must be a multiple of the 2 DDP processes (each runs an equal "
                    "share of the micro-steps): use --gradient_accumulation_steps=4"], r.stderr[-3000:]
