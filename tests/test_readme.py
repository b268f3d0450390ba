"""The README's commands, top to bottom, as a reader types them in a fresh copy of the toolkit: each one runs (a few
steps where it trains), and none trips over what an earlier one left behind (an out_dir that already holds a
checkpoint, a run or a log that only a later section makes). The list comes from the README itself, so a command
added there is run here, or must say here why not."""
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, run_script

README = (ROOT / "README.md").read_text(encoding="utf-8")

# Commands this test leaves to others, each with why (a fragment of the command: the reason).
SKIP = {
    "pip install": "installs packages: .ci/run does, in a fresh virtualenv",
    "python -m pytest": "the suite itself",
    "--init_from=gpt2": "OpenAI's weights: a download (tests/test_validation.py: offline, one line)",
    "config/finetune_shakespeare.py": "fine-tunes OpenAI's GPT-2: a download",
    "torchrun": "several processes: tests/test_distributed.py runs DDP and FSDP",
    "tools/serve.py": "a server that runs until stopped: tests/test_serve.py starts it and talks to it",
    "curl ": "talks to that server",
    "tools/time_to_quality.py": "needs a checkout of nanoGPT",
}
# What makes a training command a few steps long, and every experiment's run (EXTRA, which the runs take last).
STEPS = {"max_iters": 4, "eval_interval": 2, "eval_iters": 2, "log_interval": 1, "warmup_iters": 1, "lr_decay_iters": 4}
# And a smaller model where a command builds a new one (a resume or a fine-tune takes its run's): the order of the
# commands is what is tested here, not their models.
SMALL = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=4"]
EXTRA = " ".join(["--max_iters=4 --eval_interval=2 --eval_iters=2 --log_interval=1 --warmup_iters=1 --lr_decay_iters=4",
                  *SMALL, "--block_size=32"])
STDIN = {"--interactive=True": "ROMEO:\n\n", "--chat=True": "Good morrow, sir.\n\n"}


def readme_commands(guide=README):
    """Every command line of a guide's code blocks (the README's unless guide names another), in order: joined where a
    line ends in a backslash, split at &&, without a leading '$ ' (an example with its output) or a trailing comment."""
    commands, pending = [], ""
    for line in guide.splitlines():
        if not line.startswith("    ") and not pending:
            continue
        text = pending + line.strip()
        pending = ""
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        text = text.removeprefix("$ ")
        if text.split(" ", 1)[0] in ("python", "bash", "torchrun", "pip", "curl") or text.startswith("SCALE="):
            commands += [shlex.split(part, comments=True) for part in text.split(" && ")]
    return commands


def skipped(words, skip=SKIP):
    line = " ".join(words)
    return next((why for fragment, why in skip.items() if fragment in line), None)


def shortened(words):
    """A training command with at most a few steps (a resume two more than the run it continues); evaluation
    intervals that would fall beyond them brought inside."""
    keys = {w[2:].split("=", 1)[0]: w for w in words if w.startswith("--")}
    steps = dict(STEPS)
    if "--init_from=resume" in words:
        steps.update(max_iters=6, lr_decay_iters=6)
    if "max_iters" in keys and int(keys["max_iters"].split("=")[1]) == 0:
        steps["max_iters"] = 0
    extra = [f"--{k}={v}" for k, v in steps.items()]
    if "--init_from=resume" not in words and not any("finetune" in w for w in words):
        extra += SMALL
    if "grad_monitor_interval" in keys:
        extra.append("--grad_monitor_interval=2")
    return [*words, *extra]


@pytest.fixture(scope="module")
def clone(tmp_path_factory, shakespeare_text):
    return fresh_clone(tmp_path_factory.mktemp("readme"), shakespeare_text)


def fresh_clone(parent, shakespeare_text):
    """The toolkit's files as a fresh clone has them (no prepared data, runs or exports), in parent/toolkit:
    tiny-shakespeare where prepare.py looks for it (offline), the files a reader brings (notes.txt, corpus/ and
    dump.jsonl), and the standard tasks as if downloaded already, in parent/tasks."""
    root = parent / "toolkit"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True)  # what a clone has, and the files a developer has not added yet
    if listed.returncode != 0:
        pytest.skip("not a git checkout: nothing says which files a clone has")
    for name in listed.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, root / name)
    for d in ("shakespeare_char", "shakespeare"):
        (root / "data" / d / "input.txt").write_text(shakespeare_text, encoding="utf-8")
    (root / "notes.txt").write_text(shakespeare_text[:60_000], encoding="utf-8")
    (root / "corpus").mkdir()
    for i in range(3):
        (root / "corpus" / f"{i}.txt").write_text(shakespeare_text[i * 20_000:(i + 1) * 20_000], encoding="utf-8")
    (root / "dump.jsonl").write_text("".join(json.dumps({"text": shakespeare_text[i:i + 2000]}) + "\n"
                                             for i in range(0, 60_000, 2000)), encoding="utf-8")
    # the standard tasks as if downloaded already (tests never download): the tests' own items, under their names
    tasks = root.parent / "tasks"
    tasks.mkdir()
    for name, own in (("hellaswag", "mc"), ("arc_easy", "mc"), ("piqa", "mc"), ("lambada", "words")):
        shutil.copy2(ROOT / "tests" / "data" / "tasks" / f"shakespeare_{own}.jsonl", tasks / f"{name}.jsonl")
    return root


def run(words, clone, monkeypatch):
    """One README command in the clone: the scripts that have a main() in this process (their cwd the clone), the
    rest (dataset scripts, whose data/ is their own folder; bash) as a new process there. A command ending in the
    tutorial's `2>&1 | tee FILE` also leaves its output, both streams, in FILE."""
    if "|" in words:
        at = words.index("|")
        assert words[at - 1:at + 2] == ["2>&1", "|", "tee"] and len(words) == at + 3, words  # nothing else piped
        r = run(words[:at - 1], clone, monkeypatch)
        (clone / words[at + 2]).write_text(r.stdout + r.stderr, encoding="utf-8")
        return r
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if words[0] == "bash":
        return subprocess.run(["bash", *words[1:]], cwd=clone, capture_output=True, text=True, timeout=600,
                              env={**os.environ, **env, "EXTRA": EXTRA, "PYTHONUNBUFFERED": "1"})
    assert words[0] == "python", words
    script, args = words[1], words[2:]
    if script == "train.py" and "--help" not in args and "--block_size=100000" not in args:  # that one: as shown
        args = shortened(args)
    if script == "sample.py":
        args = [*args, "--max_new_tokens=20", "--num_samples=1"]
        for flag, text in STDIN.items():
            if flag in args:
                monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    if script == "tools/lr_finder.py":
        args = [*args, "--steps=40", *SMALL]
    if script.startswith("data/"):
        return subprocess.run([sys.executable, str(clone / script), *args], cwd=clone, capture_output=True, text=True,
                              timeout=600, env={**os.environ, **env})
    return run_script(script, *args, cwd=clone)


def test_the_readme_lists_what_this_test_runs():
    commands = [" ".join(c) for c in readme_commands()]
    assert commands[0] == "pip install -r requirements.txt"  # the first of the two commands
    assert "python train.py config/train_shakespeare_char_fast.py" in commands
    assert sum(1 for c in commands if skipped(c.split()) is None) >= 25, commands
    assert all(any(fragment in c for c in commands) for fragment in SKIP)  # no reason kept for a command gone


def run_in_order(commands, clone, monkeypatch, skip):
    """(command line, its result) of each of a guide's commands that skip() lets through, run in the clone in order,
    each timed on the test's output."""
    for words in commands:
        if skip(words):
            continue
        t0 = time.time()
        r = run(list(words), clone, monkeypatch)
        line = " ".join(words)
        print(f"{time.time() - t0:5.1f} s  {line}")
        yield line, r


def failed(line, r):
    return f"{line}\n--- stdout ---\n{r.stdout[-2000:]}\n--- stderr ---\n{r.stderr[-3000:]}"


@pytest.mark.slow
def test_the_readmes_commands_run_in_order(clone, monkeypatch):
    monkeypatch.setenv("GPT_TOOLKIT_TASKS_DIR", str(clone.parent / "tasks"))
    ran = []
    for line, r in run_in_order(readme_commands(), clone, monkeypatch, skipped):
        ran.append(line)
        if "--block_size=100000" in line:  # the README shows it refused before any work (its figures: float32's;
            # dtype=auto's bfloat16 on a CPU with bf16 units needs slightly less, 356.89 TB)
            assert r.returncode != 0 and re.match(r"error: this run needs about 35\d\.\d\d TB but cpu has .*: even "
                                                  r"batch_size=1 does not fit at block_size=100000: use --batch_size=1 "
                                                  r"--block_size=3125 \(estimate ", r.stderr), r.stderr
            continue
        assert r.returncode == 0, failed(line, r)
    assert len(ran) >= 25
    assert (clone / "out-shakespeare-char-fast" / "ckpt.pt").exists() and (clone / "hf-shakespeare").is_dir()
    assert (clone / "shakespeare.gguf").stat().st_size > 0 and (clone / "out-shakespeare-chat-merged" / "ckpt.pt").exists()
