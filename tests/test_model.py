"""The GPT model: shapes, initial loss, gradient accumulation, parameter count, generation, HF conversion."""
import math

import pytest
import torch

from gpt_toolkit.core import hardware
from model import GPT, GPTConfig, state_dict_from_hf

SMALL = GPTConfig(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)


def batch(b=8, t=32, vocab=65, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


def test_forward_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(SMALL)
    X, Y = batch()
    logits, loss = model(X, Y)
    assert logits.shape == (8, 32, 65)
    assert abs(loss.item() - math.log(65)) < 0.3
    logits, loss = model(X)
    assert logits.shape == (8, 1, 65) and loss is None


def test_sequence_longer_than_block_size_is_an_error():
    with pytest.raises(ValueError, match="longer than block_size 32"):
        GPT(SMALL)(torch.zeros(1, 33, dtype=torch.long))


def forward_backward(model, micro_batches):
    """train.py's micro-step loop: each micro-batch's loss divided by their number, the gradients added up."""
    ctx, scaler = hardware.autocast("cpu", "float32"), hardware.grad_scaler("cpu", "float32")
    total = torch.zeros(())
    for X, Y in micro_batches:
        with ctx:
            _, loss = model(X, Y)
            loss = loss / len(micro_batches)
        scaler.scale(loss).backward()
        total += loss.detach()
    return total


def test_accumulated_gradients_equal_one_big_batch():
    torch.manual_seed(0)
    model = GPT(SMALL)
    X, Y = batch()
    loss_one = forward_backward(model, [(X, Y)])
    grads_one = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss_two = forward_backward(model, [(X[:4], Y[:4]), (X[4:], Y[4:])])
    grads_two = [p.grad.clone() for p in model.parameters()]
    assert loss_one.item() == pytest.approx(loss_two.item(), abs=1e-6)
    for a, b in zip(grads_one, grads_two):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_parameter_count_matches_nanogpt():
    model = GPT(GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384, bias=False))
    assert model.get_num_params() == 10_646_784  # nanoGPT prints 10.65M for config/train_shakespeare_char.py
    assert model.get_num_params(non_embedding=False) == 10_646_784 + 256 * 384
    assert model.get_num_params(non_embedding=False) == sum(p.numel() for p in model.parameters())


def test_nanogpt_init_and_tied_embeddings():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=256, bias=True))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.bias.abs().max().item() == 0


def test_state_dict_names_are_nanogpts():
    names = set(GPT(SMALL).state_dict())
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
            "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight", "transformer.h.1.mlp.c_fc.weight",
            "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.weight", "lm_head.weight"} <= names
    assert not any(n.endswith(".attn.bias") for n in names)


def test_crop_block_size():
    torch.manual_seed(0)
    model = GPT(SMALL)
    wpe = model.transformer.wpe.weight[:16].clone()
    model.crop_block_size(16)
    assert model.config.block_size == 16 and torch.equal(model.transformer.wpe.weight, wpe)
    assert model(torch.zeros(1, 16, dtype=torch.long))[0].shape == (1, 1, 65)


def test_generate_length_determinism_and_top_k_1_is_greedy():
    torch.manual_seed(0)
    model = GPT(SMALL).eval()
    idx = torch.tensor([[1, 2, 3]])
    torch.manual_seed(5)
    a = model.generate(idx, 40, temperature=0.8, top_k=10)  # runs past block_size 32: context is cropped
    torch.manual_seed(5)
    b = model.generate(idx, 40, temperature=0.8, top_k=10)
    assert a.shape == (1, 43) and torch.equal(a, b) and torch.equal(a[:, :3], idx)
    greedy = model.generate(idx, 5, top_k=1)
    manual = idx
    for _ in range(5):
        manual = torch.cat([manual, model(manual)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy, manual)


def test_weight_decay_only_on_2d_tensors():
    model = GPT(SMALL)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert decay["fused"] is True


def test_conversion_from_huggingface_gpt2_matches_logits():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # GPT-2 proper uses tanh-approximated GELU; nanoGPT (and we) use the exact one, so compare like with like
    hf_config = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=3, n_head=4,
                                        activation_function="gelu", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    from model import config_from_hf
    ours = GPT(config_from_hf(hf.config)).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict()))
    X, Y = batch(2, 32, 101)
    with torch.no_grad():
        hf_logits = hf(X).logits
        our_logits, _ = ours(X, Y)
    torch.testing.assert_close(our_logits, hf_logits, rtol=1e-4, atol=1e-4)
