"""--optimizer=muon: Muon for the blocks' matrices, AdamW for the rest; the same update as torch.optim.Muon; its state
survives a checkpoint (exact resume); bad combinations are one-line errors."""
import copy

import pytest
import torch
from conftest import TINY_TRAIN, assert_one_line_error, run_script
from test_resume import assert_same_as_reference, records, train_args

from gpt_toolkit.models.checkpoint import load_checkpoint
from gpt_toolkit.training.optimizers import Muon, muon_parameters, muon_with_adamw
from model import GPT, GPTConfig

pytestmark = pytest.mark.precision  # its code path depends on the precision dtype=auto picks (.ci/run runs it in both)


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=30, n_layer=2, n_head=2, n_embd=16, bias=True))


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = tiny_model()
    opt = muon_with_adamw(model, weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), fused=False)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for g in opt.muon.param_groups for p in g["params"])
    assert muon == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2)
                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    decay, no_decay = ([names[id(p)] for p in g["params"]] for g in opt.adamw.param_groups)
    assert sorted(decay) == ["transformer.wpe.weight", "transformer.wte.weight"]  # wte is lm_head too (tied)
    gains = (".bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")
    assert len(no_decay) == 2 * 8 + 2 and all(name.endswith(gains) for name in no_decay)
    assert len(muon) + len(decay) + len(no_decay) == len(list(model.parameters()))
    opt.param_groups[0]["lr"] = 0.5  # the training loop sets each group's lr: it must reach the owning optimizer
    assert opt.muon.param_groups[0]["lr"] == 0.5


def test_muons_adamw_is_fused_where_plain_adamw_is():
    """--fused_adamw (on by default) reaches the AdamW beside Muon too: torch's own default leaves AdamW unfused on a
    CPU, whose per-op path gave the tied embedding a different update in about one run of eight (one half of the
    tensor rounded differently: its two threads disagreed), breaking exact resume; the fused kernel repeated in 24 of
    24 runs (docs/performance.md)."""
    from gpt_toolkit.core.config import Config
    from gpt_toolkit.training.setup import build_training
    for optimizer in ("muon", "adamw"):
        for on in (True, False):
            cfg = Config(optimizer=optimizer, fused_adamw=on)
            training = build_training(tiny_model(), cfg, device="cpu", dtype="float32")
            adamw = training.optimizer.adamw if optimizer == "muon" else training.optimizer
            assert adamw.defaults["fused"] is on, (optimizer, on)


def test_a_muon_state_saved_with_an_unfused_adamw_resumes_fused():
    """Checkpoints from before the AdamW beside Muon was fused say fused=None in its groups; loading one keeps this
    optimizer's choice (torch would restore the saved one), and the step goes on."""
    model = tiny_model()
    x = torch.randint(0, 30, (4, 16), generator=torch.Generator().manual_seed(1))
    old = muon_with_adamw(model, weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), fused=False)
    for group in old.adamw.param_groups:
        group["fused"] = None  # what build_training asked of it until now (torch's default: unfused on a CPU)
    model(x, x)[1].backward()
    old.step()
    saved = copy.deepcopy(old.state_dict())
    assert {g["fused"] for g in saved["param_groups"] if g["kind"] == "adamw"} == {None}
    new = muon_with_adamw(model, weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), fused=True)
    new.load_state_dict(saved)
    assert [g["fused"] for g in new.adamw.param_groups] == [True, True]
    model(x, x)[1].backward()
    new.step()
    assert all(s["step"].item() == 2 for s in new.adamw.state.values())


@pytest.mark.parametrize("adjust", ["match_rms_adamw", "original"])
def test_our_muon_steps_as_torch_muon(adjust):
    model = tiny_model()
    twin = copy.deepcopy(model)
    ours = Muon(muon_parameters(model), lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust, ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon(muon_parameters(twin), lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
    x = torch.randint(0, 30, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for m, opt in ((model, ours), (twin, theirs)):
            m(x, x)[1].backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):  # batched matmuls may round differently
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert ours.state_dict()["state"][0]["momentum_buffer"].shape == (48, 16)
    f32 = Muon(muon_parameters(copy.deepcopy(model)), lr=0.02, ns_dtype=torch.float32)  # the CPU fallback runs too
    assert f32.ns_dtype == torch.float32


def test_muon_orthogonalizes_tall_matrices_with_their_transposes(monkeypatch):
    """The MLP's (4C, C) and (C, 4C) matrices go through Newton-Schulz as one batch (fewer, bigger matmuls: ~1 ms of
    the main job's 39 ms step), and each matrix's update is what it gets orthogonalized alone."""
    from gpt_toolkit.training import optimizers
    batches, alone = [], []
    real = optimizers.orthogonalize

    def spy(grads, *args):
        batches.append(tuple(grads.shape))
        alone.extend(real(g[None], *args)[0] for g in grads)
        return real(grads, *args)

    monkeypatch.setattr(optimizers, "orthogonalize", spy)
    model = tiny_model()  # n_embd 16, 2 layers: c_attn (48, 16), c_proj (16, 16), c_fc (64, 16), mlp.c_proj (16, 64)
    opt = Muon(muon_parameters(model), lr=0.02, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    before = [p.detach().clone() for p in muon_parameters(model)]
    model(*[torch.randint(0, 30, (4, 16), generator=torch.Generator().manual_seed(1))] * 2)[1].backward()
    opt.step()
    assert batches == [(2, 16, 48), (2, 16, 16), (4, 16, 64)]
    # the update each matrix got, against its Newton-Schulz result alone (in batch order: c_attn, c_proj, the MLP's)
    for i, o in zip([0, 4, 1, 5, 2, 3, 6, 7], alone):
        p, b = muon_parameters(model)[i], before[i]
        expected = b - 0.02 * 0.2 * max(p.shape) ** 0.5 * (o.mT if p.size(0) > p.size(1) else o).float()
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_muon_resume_is_bit_exact_and_its_state_is_checked(data_dir, tmp_path):
    muon = ["--optimizer=muon", "--max_iters=60", "--lr_decay_iters=60"]
    ref = tmp_path / "ref"
    assert run_script(*train_args(data_dir, ref, *muon)).returncode == 0
    out = tmp_path / "b"
    assert run_script(*train_args(data_dir, out, *muon, "--max_iters=30")).returncode == 0
    state = load_checkpoint(out / "latest.pt")["optimizer"]
    assert [g["kind"] for g in state["param_groups"]] == ["muon", "adamw", "adamw"]
    r = run_script(*train_args(data_dir, out, "--max_iters=60", "--lr_decay_iters=60", "--init_from=resume"))
    assert r.returncode == 0, r.stderr
    assert_same_as_reference(records(ref), out, 30)
    assert_one_line_error(run_script(*train_args(data_dir, out, "--optimizer=adamw", "--max_iters=90",
                                                  "--init_from=resume")), "trained with optimizer=muon")
    assert_one_line_error(run_script("train.py", *TINY_TRAIN, "--optimizer=muon", "--parallel=fsdp"),
                          "optimizer=muon needs each weight matrix whole", code=2)
