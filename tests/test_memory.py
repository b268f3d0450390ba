"""Memory: the pre-flight check refuses runs that cannot fit (with the tutorial's fix), and an out-of-memory error
during training is one line with the same advice, leaving the last checkpoint as it was."""
import hashlib
import re
import resource
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_TRAIN, assert_one_line_error, run_script

from gpt_toolkit.core.config import load_config
from gpt_toolkit.core.errors import UserError
from gpt_toolkit.models import memory
from gpt_toolkit.training.guards import Guard
from model import GPT, GPTConfig

pytestmark = pytest.mark.precision  # its code path depends on the precision dtype=auto picks (.ci/run runs it in both)


@pytest.mark.parametrize("bias", [True, False])
def test_param_count_is_exact_without_building_the_model(bias):
    for n_layer, n_embd, block_size, vocab_size in ((2, 32, 16, 65), (3, 48, 40, 101)):
        model = GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size,
                              bias=bias))
        assert memory.param_count(n_layer=n_layer, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size,
                                  bias=bias) == sum(p.numel() for p in model.parameters())


def fake_memory(monkeypatch, gb):
    monkeypatch.setattr(memory, "available_memory", lambda device: (gb * 2**30, "available RAM"))


def test_a_run_that_cannot_fit_gets_the_split_that_keeps_the_effective_batch(monkeypatch):
    cfg, _ = load_config(["config/train_shakespeare_char.py", "--dropout=0"])
    fake_memory(monkeypatch, 1.0)
    with pytest.raises(UserError) as e:
        memory.check_fits(cfg, n_params=10_745_088, vocab_size=65, dtype="float32", device="cpu")
    message = str(e.value)
    assert re.match(r"this run needs about 3\.\d\d GB but cpu has 1\.00 GB \(available RAM\): use --batch_size=(\d+) "
                    r"--gradient_accumulation_steps=(\d+) \(the same effective batch of 64\)", message), message
    b, accum = map(int, re.search(r"--batch_size=(\d+) --gradient_accumulation_steps=(\d+)", message).groups())
    assert b * accum == 64
    assert memory.memory_estimate(cfg, n_params=10_745_088, vocab_size=65, dtype="float32", batch_size=b)["total"] <= 2**30
    fake_memory(monkeypatch, 3.0)  # within the estimate's margin: it might fit, so it starts
    need, have = memory.check_fits(cfg, n_params=10_745_088, vocab_size=65, dtype="float32", device="cpu")
    assert need > have and 0.8 * need <= have
    with pytest.raises(UserError, match=r"needs about 6\.\d\d GB \(2 processes\)"):  # DDP ranks share one machine
        memory.check_fits(cfg, n_params=10_745_088, vocab_size=65, dtype="float32", device="cpu", processes=2)


def test_refused_before_any_work_and_nothing_written(data_dir, tmp_path):
    out = tmp_path / "big"
    r = run_script("train.py", *TINY_TRAIN, "--n_layer=1000", "--n_embd=4096", "--n_head=32", f"--data_dir={data_dir}",
                   f"--out_dir={out}")
    assert_one_line_error(r, "this run needs about ", " TB but cpu has ", "use a smaller model", code=1)
    assert not out.exists()
    # the check is a setting: switched off, the same run is not refused by it (it stops at the next check here)
    r = run_script("train.py", *TINY_TRAIN, "--n_layer=1000", "--n_embd=4096", "--n_head=32", "--check_memory=False",
                   "--n_head=33", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert_one_line_error(r, "n_embd=4096 is not divisible by n_head=33")


def test_out_of_memory_during_training_is_one_line_and_keeps_the_checkpoint(data_dir, tmp_path):
    out = tmp_path / "oom"
    assert run_script("train.py", *TINY_TRAIN, "--max_iters=20", f"--data_dir={data_dir}", f"--out_dir={out}").returncode == 0
    saved = {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in out.glob("*.pt")}

    class AllocationFails(Guard):
        def after_backward(self, step, module):
            if step == 23:  # the 4th step after the resume
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                                   "memory: you tried to allocate 320000000000 bytes. Error code 12 (Cannot allocate "
                                   "memory)")
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=40", "--init_from=resume", f"--data_dir={data_dir}",
                   f"--out_dir={out}", guard=AllocationFails())
    line = assert_one_line_error(r, "out of memory at step 23 (asked for 298.02 GB more): ",
                                 f"the last checkpoint ({out / 'latest.pt'}, step 20) is from before and untouched")
    assert "--batch_size=" in line
    assert {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in out.glob("*.pt")} == saved


@pytest.mark.slow
def test_a_real_allocation_failure_is_one_line(data_dir, tmp_path):
    """The allocator's own failure, with the pre-flight check off: an address-space limit makes the first large
    allocation fail at once on any machine, as it does on one without the memory."""
    limit = 2 * 2**30

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = tmp_path / "real"
    # 500,000 rows of 32 tokens: the embedding's output alone is 2 GB
    cmd = [sys.executable, "train.py", *TINY_TRAIN, "--batch_size=500000", "--eval_iters=1", "--check_memory=False",
           f"--data_dir={data_dir}", f"--out_dir={out}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=cap)
    assert_one_line_error(r, "out of memory at step 0 (asked for 1.91 GB more): use --activation_checkpointing=True "
                          "(the same batch, less memory), or --batch_size=250000 "
                          "--gradient_accumulation_steps=2 (the same effective batch of 500000)",
                          "no checkpoint had been saved yet")
    assert not list(out.glob("*.pt"))


def test_out_of_memory_messages_are_recognised():
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2147483648 bytes.")
    assert memory.out_of_memory_request(cpu) == "2.00 GB"
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 7.79 GiB")
    assert memory.out_of_memory_request(cuda) == "20.00 MB"
    mps = RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB, other allocations: 2 MB, max allowed: 9 GB).")
    assert memory.out_of_memory_request(mps) == ""
    assert memory.out_of_memory_request(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert memory.out_of_memory_request(ValueError("out of memory")) is None
    assert memory.out_of_memory_request(MemoryError()) == ""


def test_fsdp_comes_before_a_shorter_context_when_the_weights_are_the_problem():
    cfg, _ = load_config(["config/train_shakespeare_char.py", "--dropout=0"])
    sizes = dict(n_params=10_745_088, vocab_size=65, dtype="float32", device_type="cpu")
    one_row = memory.memory_estimate(cfg, batch_size=1, **sizes)["total"]
    budget = one_row - 2**20  # batch_size=1 at block 256 does not fit, a shorter block would
    assert memory.memory_estimate(cfg, batch_size=1, block_size=128, **sizes)["total"] <= budget
    assert 16 * 10_745_088 >= budget / 2  # the weights, gradients and AdamW state are most of it
    advice = memory.fit_advice(cfg, budget=budget, **sizes)
    assert advice.startswith("the model's weights, gradients and AdamW state alone need 163.96 MB: shard them over "
                             "several GPUs with torchrun and --parallel=fsdp"), advice
    small = dict(sizes, n_params=100_000)  # a small model with a long context: the context is the problem
    budget = memory.memory_estimate(cfg, batch_size=1, **small)["total"] - 2**20
    assert memory.fit_advice(cfg, budget=budget, **small).startswith("even batch_size=1 does not fit at block_size=256")
