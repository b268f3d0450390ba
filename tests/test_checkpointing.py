"""Activation checkpointing: each block recomputed in the backward pass gives the very same losses and gradients
(dropout included), resumes exactly, works compiled, and the memory estimate counts what it keeps."""
import copy

import pytest
import torch
from conftest import run_script
from test_resume import assert_same_as_reference, records, train_args

from gpt_toolkit.core.config import load_config
from gpt_toolkit.models import memory
from model import GPT, GPTConfig

pytestmark = pytest.mark.precision  # its code path depends on the precision dtype=auto picks (.ci/run runs it in both)


def loss_and_grads(model, x, seed=0):
    torch.manual_seed(seed)  # the same dropout masks for both
    model.train()
    _, loss = model(x, x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def pair():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(block_size=32, vocab_size=40, n_layer=3, n_head=2, n_embd=32, dropout=0.1, bias=True))
    checkpointed = copy.deepcopy(plain)
    checkpointed.config.activation_checkpointing = True
    x = torch.randint(0, 40, (4, 32), generator=torch.Generator().manual_seed(1))
    return plain, checkpointed, x


def test_same_loss_and_gradients_with_dropout_in_float32(pair, monkeypatch):
    plain, checkpointed, x = pair
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss_a, grads_a = loss_and_grads(plain, x)
    assert not calls
    loss_b, grads_b = loss_and_grads(checkpointed, x)
    assert len(calls) == 3  # every block went through it
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    with torch.no_grad():  # evaluation and generation never checkpoint
        checkpointed.eval()(x)
    assert len(calls) == 3


# an opt-in memory option under torch.compile (a compile of the tiny model each side): left to the whole suite
@pytest.mark.slow
def test_compiled_with_checkpointing_matches_eager(pair):
    """torch.compile traces the non-reentrant checkpoint (aot_eager: no C++ compiler needed, the same graph capture)."""
    plain, checkpointed, x = pair
    for m in (plain, checkpointed):
        m.transformer.drop.p = 0.0
        for block in m.transformer.h:
            block.attn.attn_dropout, block.attn.resid_dropout.p, block.mlp.dropout.p = 0.0, 0.0, 0.0
    loss_a, grads_a = loss_and_grads(plain, x)
    compiled = torch.compile(checkpointed, backend="aot_eager")
    torch.manual_seed(0)
    _, loss_b = compiled(x, x)
    loss_b.backward()
    torch.testing.assert_close(loss_b.detach(), loss_a, rtol=1e-5, atol=1e-6)
    for name, p in checkpointed.named_parameters():
        torch.testing.assert_close(p.grad, grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


# four training runs of an opt-in memory option: left to the whole suite
@pytest.mark.slow
def test_resume_with_checkpointing_is_bit_exact(data_dir, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "b"
    args = ["--max_iters=60", "--lr_decay_iters=60", "--activation_checkpointing=True"]
    assert run_script(*train_args(data_dir, ref, *args)).returncode == 0
    assert run_script(*train_args(data_dir, out, *args, "--max_iters=30")).returncode == 0
    assert run_script(*train_args(data_dir, out, *args, "--init_from=resume")).returncode == 0
    assert_same_as_reference(records(ref), out, 30)
    plain = tmp_path / "plain"  # and the same floats as without checkpointing
    assert run_script(*train_args(data_dir, plain, "--max_iters=60", "--lr_decay_iters=60")).returncode == 0
    assert records(plain) == records(ref)


def test_estimate_keeps_one_block_and_the_block_inputs():
    cfg, _ = load_config(["config/train_shakespeare_char.py", "--block_size=1024", "--n_layer=6", "--batch_size=4",
                          "--dropout=0"])
    sizes = dict(n_params=10_000_000, vocab_size=65, dtype="float32", device_type="cpu")
    plain = memory.memory_estimate(cfg, **sizes)
    checkpointed = memory.memory_estimate(memory.with_checkpointing(cfg), **sizes)
    tokens, d = 4 * 1024, 384
    block = memory.block_activation_bytes(cfg, tokens, "float32")
    assert plain["activations"] - checkpointed["activations"] == 6 * block - (6 * tokens * d * 4 + block)
    assert checkpointed["total"] < 0.6 * plain["total"]
