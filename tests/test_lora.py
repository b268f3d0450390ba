"""LoRA: the base's weights frozen bit for bit while only the adapters train; adapters that start at zero (the first
forward is the base model's); merged equals unmerged; checkpoints of adapters that name their base and refuse a changed
one; exact resume; the readers (sample.py, evaluate, merge) take a LoRA run's out_dir; peft loads the adapter export
onto the base's export with the merged model's logits."""
import json
import re
import shutil

import pytest
import torch
from conftest import ROOT, TINY_TRAIN, assert_one_line_error, run_script, run_torchrun

from gpt_toolkit.core.config import load_config, validate_lora
from gpt_toolkit.core.errors import ConfigError
from gpt_toolkit.data.dataset import Dataset
from gpt_toolkit.models import lora
from gpt_toolkit.models.checkpoint import load_checkpoint
from gpt_toolkit.models.memory import memory_estimate
from gpt_toolkit.models.source import ModelSource, load_model, lora_model, model_from_checkpoint
from gpt_toolkit.training.guards import Guard
from gpt_toolkit.training.init_from import check_resume
from model import GPT, GPTConfig

pytestmark = pytest.mark.precision  # training follows the precision dtype=auto picks (.ci/run runs it in both)

# dropout and accumulation on, so that a resume must restore the adapters' dropout masks and the micro-batches too
LORA = ["--block_size=64", "--lora_rank=4", "--lora_dropout=0.1", "--gradient_accumulation_steps=2", "--max_iters=30",
        "--lr_decay_iters=30", "--eval_interval=10", "--log_interval=1", "--always_save_checkpoint=True"]


def tiny_gpt(seed=0, vocab_size=65):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=vocab_size, bias=True)).eval()


def settings(rank=4, targets=lora.DEFAULT_TARGETS):
    return lora.LoRASettings(rank=rank, alpha=8.0, dropout=0.0, targets=lora.parse_targets(targets))


def evals(out_dir):
    return {r["step"]: (r["train_loss"], r["val_loss"]) for r in map(json.loads, (out_dir / "metrics.jsonl").open())
            if r["type"] == "eval"}


def train_losses(out_dir):
    return {r["iter"]: r["loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").open()) if r["type"] == "train"}


@pytest.fixture(scope="module")
def base(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "base"
    r = run_script("train.py", *TINY_TRAIN, "--block_size=64", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return out


class Kept(Guard):
    """Keeps the run's model and optimizer, to look at once it has trained."""
    seen = {}

    def start(self, run, state):
        Kept.seen.update(model=run.model, optimizer=run.training.optimizer)


def lora_run(data_dir, base, out, *extra, guard=None):
    r = run_script("train.py", *TINY_TRAIN, *LORA, f"--init_from={base}", f"--data_dir={data_dir}", f"--out_dir={out}",
                   *extra, guard=guard)
    assert r.returncode == 0, r.stderr
    return r


def assert_only_adapters_trained(model, optimizer, base_state):
    """The model as it trained: its frozen weights still the base's, bit for bit, and none of them in the optimizer."""
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(torch.equal(p.detach().cpu(), base_state[n]) for n, p in frozen.items())
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert not optimized & {id(p) for p in frozen.values()}


@pytest.fixture(scope="module")
def tuned(data_dir, base):
    out = base.parent / "tuned"
    stdout = lora_run(data_dir, base, out, guard=Kept()).stdout
    return out, stdout, dict(Kept.seen)


def test_adapters_start_at_zero_so_the_first_forward_is_the_base_models():
    model, x = tiny_gpt(), torch.randint(0, 65, (2, 16))
    before = model(x, x)[0]
    names = lora.add_lora(model, settings())
    assert names == [f"transformer.h.{i}.{m}" for i in range(2) for m in lora.BLOCK_LINEARS]
    assert torch.equal(model(x, x)[0], before)
    a = model.transformer.h[0].attn.c_attn
    assert a.lora_A.abs().sum() > 0 and torch.count_nonzero(a.lora_B) == 0 and a.lora_A.shape == (4, 32)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A" in n or ".lora_B" in n for n in trained)
    assert lora.trainable_count(model) == lora.param_count(n_layer=2, n_embd=32, rank=4, targets=settings().targets)
    only_attn = tiny_gpt()
    assert lora.add_lora(only_attn, settings(targets="attn.c_proj")) == ["transformer.h.0.attn.c_proj",
                                                                         "transformer.h.1.attn.c_proj"]


def test_frozen_weights_count_four_flops_not_six():
    model = tiny_gpt()
    full = model.flops_per_token(32)
    lora.add_lora(model, settings())
    frozen = model.get_num_params() - lora.trainable_count(model)
    assert model.flops_per_token(32) == full + 6 * lora.trainable_count(model) - 2 * frozen


def test_merged_equals_unmerged_with_trained_adapters_and_token_rows():
    model, x = tiny_gpt(vocab_size=70), torch.randint(0, 70, (2, 16))
    lora.add_lora(model, settings(), token_ids=[66, 68])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    unmerged = model(x, x)[0]
    merged = lora.merged_model(model).eval()
    assert not any(lora.is_adapter_key(k) for k in merged.state_dict())
    assert torch.allclose(merged(x, x)[0], unmerged, atol=1e-5)
    assert (unmerged - tiny_gpt(vocab_size=70)(x, x)[0]).abs().max() > 1e-2  # the adapters did change the model
    rows = model.lora_token_rows.rows
    assert torch.equal(merged.transformer.wte.weight[[66, 68]], rows) and merged.lm_head.weight is merged.transformer.wte.weight


def test_memory_estimate_counts_gradients_and_optimizer_state_of_the_adapters_only():
    full, _ = load_config(["--init_from=gpt2", "--n_layer=12", "--n_embd=768"])
    low, _ = load_config(["--init_from=gpt2", "--n_layer=12", "--n_embd=768", "--lora_rank=8"])
    n = 124_000_000
    a, b = (memory_estimate(c, n_params=n, vocab_size=50304, dtype="float32") for c in (full, low))
    adapters = lora.param_count(n_layer=12, n_embd=768, rank=8, targets=lora.parse_targets(lora.DEFAULT_TARGETS))
    assert adapters == 12 * 8 * (4 + 2 + 5 + 5) * 768
    assert (a["gradients"], a["AdamW state"]) == (4 * n, 8 * n)
    assert (b["gradients"], b["AdamW state"]) == (4 * adapters, 8 * adapters)


@pytest.mark.slow  # trains (the fast tests above check the maths)
def test_only_the_adapters_train_the_base_stays_bit_identical(tuned, base):
    out, stdout, seen = tuned
    assert_only_adapters_trained(seen["model"], seen["optimizer"], load_checkpoint(base / "ckpt.pt")["model"])
    ckpt, base_ckpt = load_checkpoint(out / "latest.pt"), load_checkpoint(base / "ckpt.pt")
    trained = lora.param_count(n_layer=2, n_embd=32, rank=4, targets=lora.parse_targets(lora.DEFAULT_TARGETS))
    total = trained + sum(v.numel() for k, v in base_ckpt["model"].items() if k != "lm_head.weight")
    assert f"LoRA: {trained:,} of {total:,} parameters train ({100 * trained / total:.2f}%)" in stdout
    assert "LoRA rank 4, alpha 16, on c_attn, c_proj, c_fc (8 matrices)" in stdout
    # the checkpoint holds the adapters and their optimizer state, and names the base
    assert ckpt["model"] and all(lora.is_adapter_key(k) for k in ckpt["model"])
    assert sum(v.numel() for v in ckpt["model"].values()) == trained
    assert all(s["exp_avg"].numel() in (4 * 32, 96 * 4, 32 * 4, 128 * 4) for s in ckpt["optimizer"]["state"].values())
    assert ckpt["lora"]["base"] == {"kind": "run", "path": str((base / "ckpt.pt").resolve()),
                                    "fingerprint": lora.fingerprint(model_from_checkpoint(base_ckpt).state_dict())}
    model = lora_model(ckpt)
    for key, value in base_ckpt["model"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.count_nonzero(model.transformer.h[0].attn.c_attn.lora_B) > 0
    # the adapters start at zero: the LoRA run's first evaluation is the base's last, to the bit (the same batches)
    assert evals(out)[0] == evals(base)[max(evals(base))]
    assert evals(out)[30][1] < evals(out)[0][1]


@pytest.mark.slow  # trains (the fast tests above check the maths)
def test_a_stopped_lora_run_resumes_exactly(data_dir, base, tuned, tmp_path):
    out = tmp_path / "b"
    lora_run(data_dir, base, out, "--max_iters=10")
    r = lora_run(data_dir, base, out, "--init_from=resume")
    assert "resuming from" in r.stdout and "at step 10" in r.stdout
    reference = train_losses(tuned[0])
    assert {k: v for k, v in train_losses(out).items() if k >= 10} == {k: v for k, v in reference.items() if k >= 10}
    assert evals(out) == evals(tuned[0])


@pytest.mark.slow  # trains (the fast tests above check the maths)
def test_readers_take_a_lora_out_dir_and_merging_changes_nothing(data_dir, tuned, tmp_path):
    out = tuned[0]
    merged = tmp_path / "merged"
    r = run_script("tools/merge_lora.py", f"--out_dir={out}", f"--to={merged}")
    assert r.returncode == 0 and f"wrote {merged / 'ckpt.pt'}" in r.stdout, r.stderr
    plain = load_checkpoint(merged / "ckpt.pt")
    assert "lora" not in plain and plain["config"]["lora_rank"] == 0 and "lm_head.weight" in plain["model"]
    sample = ["--num_samples=1", "--max_new_tokens=40", "--seed=3", "--start=ROMEO:"]
    a, b = (run_script("sample.py", f"--out_dir={d}", *sample) for d in (out, merged))
    assert a.returncode == 0 and a.stdout == b.stdout and len(a.stdout) > 40, a.stderr
    scores = [run_script("tools/evaluate.py", f"--out_dir={d}", f"--data_dir={data_dir}") for d in (out, merged)]
    assert scores[0].returncode == 0 and re.match(r"val loss \d\.\d{4}", scores[0].stdout), scores[0].stderr
    assert scores[0].stdout == scores[1].stdout
    # what tools/serve.py and --chat load a run with
    served, _ = load_model(ModelSource.run(str(out)), "cpu", checkpoint="ckpt.pt")
    x = torch.randint(0, 65, (1, 16))
    assert torch.equal(served(x, x)[0], model_from_checkpoint(plain).eval()(x, x)[0])
    # a merged run is an ordinary one: fine-tune it further from its weights
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=2", f"--init_from={merged}", f"--data_dir={data_dir}",
                   f"--out_dir={tmp_path / 'again'}")
    assert r.returncode == 0 and "initializing from the run in" in r.stdout, r.stderr


@pytest.mark.slow  # trains (the fast tests above check the maths)
def test_a_changed_or_missing_base_is_a_one_line_error(data_dir, base, tmp_path):
    own_base = tmp_path / "base"
    shutil.copytree(base, own_base)
    out = tmp_path / "tuned"
    lora_run(data_dir, own_base, out, "--max_iters=2", "--eval_interval=2")
    r = run_script("train.py", *TINY_TRAIN, "--block_size=64", "--max_iters=4", "--seed=5", f"--data_dir={data_dir}",
                   f"--out_dir={own_base}", "--overwrite=True")
    assert r.returncode == 0, r.stderr
    for script in (["sample.py"], ["tools/evaluate.py", f"--data_dir={data_dir}"]):
        assert_one_line_error(run_script(*script, f"--out_dir={out}"),
                              f"base {(own_base / 'ckpt.pt').resolve()} has changed since the run started",
                              "restore that base")
    resume = run_script("train.py", *TINY_TRAIN, *LORA, "--init_from=resume", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert_one_line_error(resume, "has changed since the run started")
    shutil.rmtree(own_base)
    assert_one_line_error(run_script("sample.py", f"--out_dir={out}"), "base model", "is gone", "put the base back")


@pytest.mark.slow  # trains (the fast tests above check the maths)
def test_bad_lora_settings_are_one_line_errors(data_dir, base, tuned, tmp_path):
    train = ["train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'x'}"]
    assert_one_line_error(run_script(*train, "--lora_rank=4"), "init_from=scratch has none", "--init_from=OUT_DIR")
    assert_one_line_error(run_script(*train, f"--init_from={base}", "--lora_rank=4", "--lora_targets=q_proj"),
                          "q_proj is not a matrix of a block", "mlp.c_fc")
    assert_one_line_error(run_script(*train, f"--init_from={base}", "--lora_rank=-1"), "lora_rank=-1")
    assert_one_line_error(run_script(*train, f"--init_from={base}", "--lora_rank=4", "--lora_alpha=0"), "lora_alpha=0")
    assert_one_line_error(run_script(*train, f"--init_from={base}", "--lora_rank=4", "--parallel=fsdp"),
                          "--parallel=ddp")
    shutil.copytree(tuned[0], tmp_path / "copy")
    resume = run_script("train.py", *TINY_TRAIN, *LORA, "--init_from=resume", "--lora_rank=8", f"--data_dir={data_dir}",
                        f"--out_dir={tmp_path / 'copy'}")
    assert_one_line_error(resume, "trained with lora_rank=4 but --lora_rank=8", "drop --lora_rank")
    r = run_script("train.py", *TINY_TRAIN, *LORA[:-4], "--max_iters=40", "--init_from=resume", f"--data_dir={data_dir}",
                   f"--out_dir={tmp_path / 'copy'}", "--lora_dropout=0.3")
    assert_one_line_error(r, "lora_dropout=0.1 but --lora_dropout=0.3")
    # a resume takes the run's LoRA settings from its checkpoint, and they are checked as given ones are
    cfg, cli_keys = load_config(["--init_from=resume", "--parallel=fsdp", "--dataset=shakespeare_char"])
    resumed = check_resume(load_checkpoint(tuned[0] / "latest.pt"), cfg, cli_keys, Dataset(data_dir, "shakespeare_char"))
    assert (resumed.lora_rank, resumed.lora_dropout, resumed.lora_targets) == (4, 0.1, "c_attn,c_proj,c_fc")
    with pytest.raises(ConfigError, match="--parallel=ddp"):
        validate_lora(resumed)
    reordered = run_script("train.py", *TINY_TRAIN, *LORA[:-4], "--max_iters=32", "--lr_decay_iters=30",
                           "--init_from=resume", "--lora_targets=c_fc, c_proj ,c_attn", f"--data_dir={data_dir}",
                           f"--out_dir={tmp_path / 'copy'}")
    assert reordered.returncode == 0 and "resuming from" in reordered.stdout, reordered.stderr
    assert_one_line_error(run_script(*train, f"--init_from={base}", "--lora_rank=4", f"--out_dir={base}"),
                          "the same out_dir", "another --out_dir")
    assert_one_line_error(run_script("tools/merge_lora.py", f"--out_dir={base}", f"--to={tmp_path / 'm'}"),
                          "is not a LoRA run's checkpoint")
    assert_one_line_error(run_script("tools/export_hf.py", f"--out_dir={base}", f"--to={tmp_path / 'a'}", "--lora=adapter"),
                          "is not a LoRA run's checkpoint", "drop --lora=adapter")
    assert not (tmp_path / "m").exists() and not (tmp_path / "a").exists()


@pytest.mark.slow  # trains (the fast tests above check the maths)
def test_muon_trains_the_adapters_and_checkpointing_changes_nothing(data_dir, base, tuned, tmp_path):
    muon = tmp_path / "muon"
    lora_run(data_dir, base, muon, "--optimizer=muon")
    ckpt = load_checkpoint(muon / "latest.pt")
    assert [g["kind"] for g in ckpt["optimizer"]["param_groups"]] == ["muon", "adamw", "adamw"]
    assert len(ckpt["optimizer"]["param_groups"][0]["params"]) == 16  # A and B of 8 matrices
    assert evals(muon)[30][1] < evals(muon)[0][1]
    recomputed = tmp_path / "ckpt"
    lora_run(data_dir, base, recomputed, "--activation_checkpointing=True")
    assert train_losses(recomputed) == train_losses(tuned[0])


@pytest.mark.slow  # trains (the fast tests above check the maths)
def test_peft_loads_the_adapter_onto_the_base_export_with_the_merged_logits(tuned, base, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    out = tuned[0]
    for args in ((base, "hf-base"), (out, "hf-merged"), (out, "hf-adapter", "--lora=adapter")):
        r = run_script("tools/export_hf.py", f"--out_dir={args[0]}", f"--to={tmp_path / args[1]}", *args[2:])
        assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "hf-adapter").iterdir()) == ["adapter_config.json",
                                                                          "adapter_model.safetensors"]
    hf = transformers.GPT2LMHeadModel.from_pretrained
    adapted = peft.PeftModel.from_pretrained(hf(tmp_path / "hf-base"), tmp_path / "hf-adapter").eval()
    merged, plain = hf(tmp_path / "hf-merged").eval(), hf(tmp_path / "hf-base").eval()
    ours = model_from_checkpoint(load_checkpoint(out / "ckpt.pt")).eval()
    x = torch.randint(0, 65, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, m, p, o = adapted(x).logits, merged(x).logits, plain(x).logits, ours(x, x)[0]
    assert (a - m).abs().max() < 1e-4 and (m - o).abs().max() < 1e-4
    assert (a - p).abs().max() > 1e-3  # the adapter is really applied


@pytest.mark.slow
def test_lora_trains_under_ddp_like_one_process(data_dir, base, tmp_path):
    args = [*TINY_TRAIN, *LORA, "--lora_dropout=0.0", f"--init_from={base}", f"--data_dir={data_dir}"]
    r = run_torchrun(ROOT / "train.py", *args, f"--out_dir={tmp_path / 'ddp'}")
    assert "2 process(es)" in r.stdout and "LoRA: " in r.stdout
    one = run_script("train.py", *args, f"--out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    val = {name: {step: v[1] for step, v in evals(tmp_path / name).items()} for name in ("ddp", "one")}
    assert sorted(val["ddp"]) == [0, 10, 20, 30] and val["ddp"] == pytest.approx(val["one"], abs=2e-3)
    assert all(lora.is_adapter_key(k) for k in load_checkpoint(tmp_path / "ddp" / "latest.pt")["model"])


@pytest.mark.slow
def test_lora_on_chat_data_trains_the_chat_tokens_rows_and_answers(data_dir, base, tmp_path):
    from test_chat import conversations, write_jsonl
    r = run_script("data/prepare_chat.py", f"--input={write_jsonl(tmp_path / 'chats.jsonl', conversations())}",
                   "--name=lora_chat", f"--tokenizer_from={base}", f"--data_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "chat"
    r = run_script("train.py", *TINY_TRAIN, "--block_size=64", "--dataset=lora_chat", "--lora_rank=4", "--max_iters=20",
                   f"--init_from={base}", f"--data_dir={tmp_path}", f"--out_dir={out}", guard=Kept())
    assert r.returncode == 0, r.stderr
    grown = lora_model(load_checkpoint(out / "ckpt.pt")).state_dict()  # the base's rows, and the chat rows' start
    assert_only_adapters_trained(Kept.seen["model"], Kept.seen["optimizer"], grown)
    assert "and the embedding rows of the 5 chat tokens" in r.stdout and "padded (--padding=True" in r.stdout
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["lora"]["token_ids"] == [65, 66, 67, 68, 69] and ckpt["model_args"]["vocab_size"] == 70
    model, base_weight = lora_model(ckpt), load_checkpoint(base / "ckpt.pt")["model"]["lm_head.weight"]
    assert torch.equal(model.lm_head.weight[:65], base_weight)  # the base's rows stay frozen
    mean_start = base_weight.mean(dim=0)
    assert all((model.lora_token_rows.rows[i] - mean_start).abs().max() > 1e-4 for i in range(5))  # the new ones train
    r = run_script("tools/evaluate.py", f"--out_dir={out}", f"--data_dir={tmp_path}")
    assert r.returncode == 0 and "(the assistant's tokens)" in r.stdout, r.stderr
    assert_one_line_error(run_script("tools/export_hf.py", f"--out_dir={out}", f"--to={tmp_path / 'a'}", "--lora=adapter"),
                          "embedding rows of its 5 chat tokens", "export the merged model")
