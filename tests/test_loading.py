"""A reader's load (sampling, serving, evaluation, exports, another run's weights) reads the weights only: the file is
memory-mapped and the optimizer's state, twice the weights in a trained run, is never read; its own checksum still
catches a changed weight. A resume reads everything."""
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from gpt_toolkit.core.errors import UserError
from gpt_toolkit.models.checkpoint import load_checkpoint, save_checkpoint
from gpt_toolkit.models.source import ModelSource, load_model
from model import GPT, GPTConfig

ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=65, dropout=0.0)


def trained_run(path, optimizer_mb):
    """A run directory whose checkpoint holds a small model and an optimizer state of optimizer_mb megabytes."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**ARGS))
    state = {"state": {0: {"exp_avg": torch.ones(optimizer_mb * 2**18)}}, "param_groups": [{"params": [0]}]}
    path.mkdir()
    save_checkpoint({"model": model.state_dict(), "optimizer": state, "model_args": ARGS, "iter_num": 1,
                     "best_val_loss": 2.0, "config": {}, "meta": {"tokenizer": "gpt2", "vocab_size": 50257}},
                    path / "ckpt.pt")
    return model


PEAK = """import sys
sys.path.insert(0, {root!r})
from gpt_toolkit.models.checkpoint import load_checkpoint
def high_water():  # this process's peak resident set (ru_maxrss would include the parent's: Linux keeps it across exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
before = high_water()
ckpt = load_checkpoint({path!r}, optimizer={optimizer})
print(sorted(ckpt), (high_water() - before) // 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from Linux's /proc/self/status")
@pytest.mark.parametrize("optimizer", [False, True])
def test_a_readers_load_never_reads_the_optimizer_state(tmp_path, optimizer):
    """300 MB of optimizer state: a reader's peak grows by a few MB, a resume's by the 300 MB (the same file)."""
    trained_run(tmp_path / "run", optimizer_mb=300)
    code = PEAK.format(root=str(ROOT), path=str(tmp_path / "run" / "ckpt.pt"), optimizer=optimizer)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    keys, grown_mb = r.stdout.rsplit(" ", 1)
    assert ("'optimizer'" in keys) == optimizer
    assert int(grown_mb) > 250 if optimizer else int(grown_mb) < 50, r.stdout


def test_a_readers_checksum_covers_the_weights_and_a_resume_covers_everything(tmp_path):
    model = trained_run(tmp_path / "run", optimizer_mb=1)
    path = tmp_path / "run" / "ckpt.pt"
    whole = torch.load(path, weights_only=True)
    whole["optimizer"]["state"][0]["exp_avg"][0] = 5.0  # the optimizer's bytes changed: a reader never sees them
    torch.save(whole, path)
    loaded, _ = load_model(ModelSource.run(tmp_path / "run"), "cpu", checkpoint="ckpt.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    with pytest.raises(UserError, match="fails its checksum"):
        load_checkpoint(path)  # what a resume reads
    whole["model"]["lm_head.weight"][0, 0] += 1.0  # a weight changed: the reader's own checksum catches it
    torch.save(whole, path)
    with pytest.raises(UserError, match="fails its checksum"):
        load_model(ModelSource.run(tmp_path / "run"), "cpu", checkpoint="ckpt.pt")


def test_a_checkpoint_from_before_the_weights_checksum_is_verified_whole(tmp_path):
    trained_run(tmp_path / "run", optimizer_mb=1)
    path = tmp_path / "run" / "ckpt.pt"
    whole = torch.load(path, weights_only=True)
    whole["checksum"] = {"sha256": whole["checksum"]["sha256"]}  # as the toolkit wrote them until now
    whole["optimizer"]["state"][0]["exp_avg"][0] = 5.0
    torch.save(whole, path)
    with pytest.raises(UserError, match="fails its checksum"):
        load_checkpoint(path, optimizer=False)
    assert "optimizer" not in load_checkpoint(path, optimizer=False, verify=False)


def test_a_bf16_reader_holds_the_blocks_in_bf16_and_generates_the_same(tmp_path):
    """Under bf16 autocast on a CPU, load_model holds the blocks' matrices in bfloat16 (autocast rounds them so at
    every call anyway): the same logits and the same greedy and seeded text, from half their bytes."""
    trained_run(tmp_path / "run", optimizer_mb=1)
    plain, _ = load_model(ModelSource.run(tmp_path / "run"), "cpu", checkpoint="ckpt.pt")
    held, _ = load_model(ModelSource.run(tmp_path / "run"), "cpu", checkpoint="ckpt.pt", dtype="bfloat16")
    assert held.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    assert held.transformer.wte.weight.dtype == torch.float32  # the embedding (and the tied head) as trained
    assert plain.transformer.h[0].mlp.c_fc.weight.dtype == torch.float32
    x = torch.randint(0, 65, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(plain(x)[0], held(x)[0])
        for temperature in (0.0, 1.0):
            texts = [m.generate(x[:1], 30, temperature=temperature, generator=torch.Generator().manual_seed(1))
                     for m in (plain, held)]
            assert torch.equal(*texts)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak from Linux's /proc/self/status")
def test_verifying_a_mapped_checkpoint_does_not_keep_it_in_memory(tmp_path):
    """The checksum reads every weight of a 300 MB model file; each one's pages are given back once hashed."""
    torch.manual_seed(0)
    args = dict(ARGS, n_embd=1024, n_head=8, n_layer=6)  # ~76M parameters: 300 MB in float32
    model = GPT(GPTConfig(**args))
    (tmp_path / "run").mkdir()
    save_checkpoint({"model": model.state_dict(), "model_args": args, "iter_num": 1, "best_val_loss": 2.0,
                     "config": {}, "meta": None}, tmp_path / "run" / "ckpt.pt")
    del model
    code = PEAK.format(root=str(ROOT), path=str(tmp_path / "run" / "ckpt.pt"), optimizer=False)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.rsplit(" ", 1)[1]) < 100, r.stdout  # the largest tensor's pages at most, not 300 MB
