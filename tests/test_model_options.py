"""The opt-in model options (rotary, rmsnorm, qk_norm, activation=relu2, untied_head, value_embeddings,
logit_softcap): each changes the model as documented, all are off by default (a default model and its checkpoint are
nanoGPT's), and a model with them trains, resumes, samples (with and without the KV cache), evaluates, fine-tunes
(fully, and with LoRA) and refuses the GPT-2 exports in one line."""
import json
import math
import re

import pytest
import torch
from conftest import ROOT, TINY_TRAIN, assert_one_line_error, run_script
from torch.nn import functional as F

from gpt_toolkit.core.config import load_config, validate
from gpt_toolkit.core.errors import ConfigError
from gpt_toolkit.models import memory
from gpt_toolkit.models.checkpoint import MODEL_ARGS, load_checkpoint, model_args_of
from gpt_toolkit.models.source import ModelSource, load_model, model_from_checkpoint
from gpt_toolkit.training.optimizers import muon_parameters
from model import GPT, MODEL_OPTIONS, GPTConfig, apply_rotary, rotary_tables

ALL_ON = dict(rotary=True, rmsnorm=True, qk_norm=True, activation="relu2", untied_head=True, value_embeddings=True,
              logit_softcap=15.0)
ALL_ON_FLAGS = [f"--{k}={v}" for k, v in ALL_ON.items()]


def tiny(seed=0, **options):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, bias=False, **options)).eval()


def randomized(model, seed=1):
    """Every weight random (the options that start at zero, the untied head and value embeddings, too)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return model


def test_off_by_default_a_default_model_is_nanogpts():
    assert all(getattr(GPTConfig(), k) == off for k, off in MODEL_OPTIONS.items())
    m = tiny()
    assert set(model_args_of(m.config)) == set(MODEL_ARGS)  # what nanoGPT's GPTConfig(**model_args) takes
    assert "transformer.wpe.weight" in m.state_dict() and m.lm_head.weight is m.transformer.wte.weight
    assert all(isinstance(mod, torch.nn.LayerNorm) for name, mod in m.named_modules() if name.endswith(("ln_1", "ln_f")))
    assert model_args_of(tiny(rotary=True).config)["rotary"] is True


def test_rotary_attention_depends_on_relative_position_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    pos = torch.arange(8)
    scores = [apply_rotary(q, rotary_tables(pos + s, 16)) @ apply_rotary(k, rotary_tables(pos + s, 16)).transpose(-1, -2)
              for s in (0, 37)]
    assert torch.allclose(scores[0], scores[1], atol=1e-4)
    assert not torch.allclose(scores[0], q @ k.transpose(-1, -2), atol=1e-2)  # it does rotate


def test_a_rotary_model_is_invariant_to_shifting_every_absolute_position():
    m, x = randomized(tiny(rotary=True)), torch.randint(0, 65, (2, 16))
    assert "transformer.wpe.weight" not in m.state_dict()  # no learned positions
    before = m(x, x)[0]
    cos, sin = m.rope_cos, m.rope_sin
    m.rope_cos, m.rope_sin = rotary_tables(torch.arange(m.config.block_size) + 11, m.config.n_embd // m.config.n_head)
    assert not torch.equal(m.rope_cos, cos)  # every position shifted by 11
    assert torch.allclose(m(x, x)[0], before, atol=1e-4)
    m.rope_cos, m.rope_sin = cos, sin
    # the order of the tokens still matters
    assert not torch.allclose(m(x.flip(1), x)[0].flip(1), before, atol=1e-2)


def test_rotary_tables_are_made_once_not_saved_and_equal_to_computing_each_position():
    """A training step computes no cos or sin (torch.compile would fuse them into every layer, forward and backward,
    and recompute them there): the model keeps every position's in two buffers that are not in its state_dict."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    m, x = randomized(tiny(rotary=True)), torch.randint(0, 65, (2, 16))
    m.train()
    with Ops() as ops:
        m(x, x)[1].backward()
    assert "mm" in ops.seen and not {"cos", "sin"} & ops.seen
    pos = torch.tensor([0, 5, 31])
    for table, computed in zip((m.rope_cos, m.rope_sin), rotary_tables(pos, 16)):
        assert table.dtype == torch.float32 and torch.equal(table[pos], computed)  # bit for bit
    assert not any("rope" in k for k in m.state_dict())
    loaded = model_from_checkpoint({"model": m.state_dict(), "model_args": model_args_of(m.config)}).eval()
    assert loaded.rope_cos.device.type == "cpu" and torch.equal(loaded.rope_cos, m.rope_cos)  # not left on meta
    assert torch.equal(loaded(x, x)[0], m.eval()(x, x)[0])


def test_rmsnorm_matches_its_formula_and_replaces_every_layernorm():
    m = randomized(tiny(rmsnorm=True))
    assert not any(isinstance(mod, torch.nn.LayerNorm) for mod in m.modules())
    norm, x = m.transformer.h[0].ln_1, torch.randn(3, 5, 32) * 4 + 1
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-5)
    assert [name for name, _ in norm.named_parameters()] == ["weight"]  # a gain, no bias


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    x = torch.randint(0, 65, (2, 16))
    for qk_norm, same in ((True, True), (False, False)):
        m = randomized(tiny(qk_norm=qk_norm))
        before = m(x, x)[0]
        with torch.no_grad():
            for block in m.transformer.h:
                block.attn.c_attn.weight[:64] *= 7.0  # the query and key rows
        assert torch.allclose(m(x, x)[0], before, atol=1e-4) == same


def test_qk_norm_of_a_bf16_query_is_torchs_rmsnorm_bit_for_bit_without_its_warning():
    """Under bfloat16 autocast the heads' query and key are bf16 and QK-norm's gain float32: torch.rms_norm warned
    (once per run, in every speedrun and record log) and fell back to float32 math. The model's QK-norm does that math
    itself: the same outputs and gradients, no warning. A fresh interpreter: torch warns once per process."""
    import subprocess
    import sys
    code = """
import warnings, torch
from model import GPT, GPTConfig
torch.manual_seed(0)
norm = GPT(GPTConfig(block_size=64, vocab_size=65, n_layer=1, n_head=4, n_embd=128, qk_norm=True)).transformer.h[0].attn.q_norm
ref = torch.nn.RMSNorm(32, eps=1e-5)
with torch.no_grad():
    norm.weight.uniform_(0.5, 1.5)
    ref.weight.copy_(norm.weight)
x = (torch.randn(8, 4, 64, 32) * 3).bfloat16().requires_grad_()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = norm(x)
g = torch.randn_like(y)
ours = (y, *torch.autograd.grad(y, (x, norm.weight), g))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    y_ref = ref(x)
theirs = (y_ref, *torch.autograd.grad(y_ref, (x, ref.weight), g))
print(y.dtype, all(torch.equal(a, b) for a, b in zip(ours, theirs)), [str(w.message)[:40] for w in caught])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["torch.bfloat16", "True", "[]"], r.stdout + r.stderr


def test_relu2_is_relu_squared():
    m, x = tiny(activation="relu2"), torch.randn(4, 128)
    assert torch.equal(m.transformer.h[0].mlp.gelu(x), F.relu(x).square())
    gelu = tiny()
    gelu.load_state_dict(m.state_dict())
    ids = torch.randint(0, 65, (1, 8))
    assert not torch.allclose(gelu(ids, ids)[0], m(ids, ids)[0])


def test_untied_head_has_its_own_weights_starting_at_zero():
    m = tiny(untied_head=True)
    assert m.lm_head.weight is not m.transformer.wte.weight and not m.lm_head.weight.any()
    x = torch.randint(0, 65, (2, 8))
    assert m(x, x)[1].item() == pytest.approx(math.log(65), abs=1e-6)  # uniform at start
    assert "lm_head.weight" in m.state_dict() and "transformer.wte.weight" in m.state_dict()


def test_value_embeddings_start_at_zero_and_add_a_tokens_row_to_its_values():
    m = randomized(tiny(value_embeddings=True))
    plain = tiny()
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("transformer.ve.")})
    fresh = tiny(value_embeddings=True)
    assert all(not t.weight.any() for t in fresh.transformer.ve)
    x = torch.randint(0, 65, (2, 8))
    with torch.no_grad():
        for t in m.transformer.ve:
            t.weight.zero_()
        assert torch.allclose(m(x, x)[0], plain(x, x)[0], atol=1e-6)  # zero tables: the model without them
        m.transformer.ve[1].weight[x[0, 3]] = 1.0  # one token's row in one layer
    assert not torch.allclose(m(x, x)[0], plain(x, x)[0], atol=1e-3)
    assert not any(p is t.weight for p in muon_parameters(m) for t in m.transformer.ve)  # AdamW trains embeddings


def test_logit_softcap_bounds_the_logits_by_tanh():
    m = randomized(tiny(logit_softcap=5.0))
    raw = randomized(tiny())
    x = torch.randint(0, 65, (2, 8))
    capped, uncapped = m(x, x)[0], raw(x, x)[0]
    assert uncapped.abs().max() > 5 and capped.abs().max() < 5
    assert torch.allclose(capped, 5.0 * torch.tanh(uncapped / 5.0), atol=1e-5)


def test_every_option_together_trains_and_counts_its_parameters_and_flops():
    m = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, bias=True, **ALL_ON))
    assert sum(p.numel() for p in m.parameters()) == memory.param_count(
        n_layer=2, n_embd=32, block_size=32, vocab_size=65, bias=True, n_head=2, options=ALL_ON)
    for name, on in ALL_ON.items():
        one = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, bias=False, **{name: on}))
        assert sum(p.numel() for p in one.parameters()) == memory.param_count(
            n_layer=2, n_embd=32, block_size=32, vocab_size=65, bias=False, n_head=2, options={name: on}), name
    # lookups (value embeddings, the untied token embedding) cost no matmul FLOPs; the untied head does
    matmuls = sum(p.numel() for n, p in m.named_parameters() if not n.startswith(("transformer.wte", "transformer.ve")))
    assert m.flops_per_token(32) == 6 * matmuls + 12 * 2 * 32 * 32
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    x = torch.randint(0, 65, (4, 32))
    losses = []
    for _ in range(20):
        loss = m.train()(x, x)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1


def test_kv_cache_generation_equals_the_full_recompute_with_every_option():
    m = randomized(tiny(**ALL_ON), seed=3)
    prompt = torch.randint(0, 65, (2, 5))
    # 60 tokens: past block_size 32, so the cache is rebuilt (rotary positions restart) and the window slides
    a = m.generate(prompt, 60, temperature=0, kv_cache=True)
    b = m.generate(prompt, 27, temperature=0, kv_cache=False)
    assert torch.equal(a[:, :32], b)


def test_bad_option_values_are_config_errors():
    for flags, fragment in ((["--activation=swish"], "swish"),
                            (["--rotary=True", "--n_embd=36", "--n_head=4"], "even head size"),
                            (["--logit_softcap=-1"], "logit_softcap=-1")):
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            validate(load_config(["config/train_shakespeare_char.py", *flags])[0])


OPTIONS_RUN = [*TINY_TRAIN, *ALL_ON_FLAGS, "--block_size=64", "--optimizer=muon", "--max_iters=16", "--eval_interval=8",
               "--always_save_checkpoint=True", "--log_interval=1"]


@pytest.fixture(scope="module")
def options_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("options") / "run"
    r = run_script("train.py", *OPTIONS_RUN, f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return out


def train_losses(out_dir):
    return {r["iter"]: r["loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").open()) if r["type"] == "train"}


@pytest.mark.slow  # trains
def test_a_model_with_options_saves_them_resumes_exactly_and_refuses_changing_them(data_dir, options_run, tmp_path):
    ckpt = load_checkpoint(options_run / "latest.pt")
    assert {k: ckpt["model_args"][k] for k in ALL_ON} == ALL_ON
    model = model_from_checkpoint(ckpt)
    assert model.config.untied_head and model.lm_head.weight is not model.transformer.wte.weight
    out = tmp_path / "stopped"
    common = [*OPTIONS_RUN, f"--data_dir={data_dir}", f"--out_dir={out}"]
    assert run_script("train.py", *common, "--max_iters=8").returncode == 0
    r = run_script("train.py", *common, "--init_from=resume")
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr
    assert train_losses(out) == train_losses(options_run)  # steps 9-16 after the resume: the same losses to the bit
    assert_one_line_error(run_script("train.py", *common, "--max_iters=30", "--init_from=resume", "--rotary=False"),
                          "checkpoint has rotary=True but --rotary=False")


@pytest.mark.slow  # trains
def test_readers_fine_tuning_and_exports_of_a_model_with_options(data_dir, options_run, tmp_path):
    sample = run_script("sample.py", f"--out_dir={options_run}", "--num_samples=1", "--max_new_tokens=50", "--seed=1",
                        "--start=ROMEO:")
    assert sample.returncode == 0 and len(sample.stdout) > 50, sample.stderr
    score = run_script("tools/evaluate.py", f"--out_dir={options_run}", f"--data_dir={data_dir}")
    assert score.returncode == 0 and re.match(r"val loss \d\.\d{4}", score.stdout), score.stderr
    lora = run_script("train.py", *TINY_TRAIN, "--block_size=64", "--max_iters=4", "--lora_rank=4", f"--init_from={options_run}",
                      f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'lora'}")
    assert lora.returncode == 0 and "LoRA: " in lora.stdout, lora.stderr
    # what tools/serve.py and the chat load: the LoRA run merged onto its base, options and all
    served, _ = load_model(ModelSource.run(str(tmp_path / "lora")),
                           "cpu", checkpoint="ckpt.pt")
    assert served.config.rotary and served.config.value_embeddings
    assert served.generate(torch.zeros(1, 1, dtype=torch.long), 80, temperature=0).shape == (1, 81)  # past block_size
    for tool, target in (("tools/export_hf.py", "transformers' GPT2LMHeadModel"),
                         ("tools/export_gguf.py", "llama.cpp's GPT-2 architecture")):
        to = tmp_path / ("export" + (".gguf" if "gguf" in tool else ""))
        assert_one_line_error(run_script(tool, f"--out_dir={options_run}", f"--to={to}"),
                              "rotary=True", target, "train a model without those options")
        assert not to.exists()


@pytest.mark.slow  # trains
def test_chat_fine_tuning_grows_every_table_of_a_model_with_options(data_dir, options_run, tmp_path):
    from test_chat import conversations, write_jsonl
    r = run_script("data/prepare_chat.py", f"--input={write_jsonl(tmp_path / 'chats.jsonl', conversations())}",
                   "--name=options_chat", f"--tokenizer_from={options_run}", f"--data_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    train = ["train.py", *TINY_TRAIN, "--block_size=64", "--dataset=options_chat", "--max_iters=6",
             f"--init_from={options_run}", f"--data_dir={tmp_path}"]
    r = run_script(*train, f"--out_dir={tmp_path / 'chat'}")
    assert r.returncode == 0 and "grown to 70" in r.stdout, r.stderr
    tuned = model_from_checkpoint(load_checkpoint(tmp_path / "chat" / "ckpt.pt"))
    assert tuned.lm_head.weight.shape[0] == tuned.transformer.wte.weight.shape[0] == 70
    assert all(t.weight.shape[0] == 70 for t in tuned.transformer.ve)
    assert_one_line_error(run_script(*train, "--lora_rank=4", f"--out_dir={tmp_path / 'lora'}"),
                          "untied_head=True", "drop --lora_rank")


def test_estimate_and_the_memory_check_count_the_options_parameters(data_dir):
    config = ["config/train_shakespeare_char_speedrun.py", "--untied_head=True", "--value_embeddings=True",
              "--activation=relu2"]  # the config's options and the rest: every option at once
    r = run_script("tools/estimate.py", *config, f"--data_dir={data_dir}")
    assert r.returncode == 0, r.stderr
    cfg = load_config(config)[0]
    built = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                          vocab_size=65, bias=cfg.bias, **{k: getattr(cfg, k) for k in MODEL_OPTIONS}))
    exact = sum(p.numel() for p in built.parameters())
    assert f"parameters (exact, sum of p.numel()): {exact:,}" in r.stdout
    assert "model options: rotary=True, rmsnorm=True, qk_norm=True, activation=relu2, untied_head=True" in r.stdout
    # the memory check's count, made before any model is built, is the same number
    assert memory.param_count(n_layer=cfg.n_layer, n_embd=cfg.n_embd, block_size=cfg.block_size, vocab_size=65,
                              bias=cfg.bias, n_head=cfg.n_head,
                              options={k: getattr(cfg, k) for k in MODEL_OPTIONS}) == exact
