"""The CUDA path on a CUDA GPU: the main job and the tutorial's config with the defaults (bf16 where supported, compile
on), float16 with its GradScaler, exact resume, compile falling back, the memory check and a real out-of-memory,
activation checkpointing's memory, sampling (KV cache, streaming, greedy against transformers) and export, NCCL.
Collected everywhere; skipped where torch sees no CUDA device (CI has none). tools/gpu_check.py measures speed."""
import hashlib
import json
import re

import pytest
import torch
from conftest import TINY_TRAIN, assert_one_line_error, run_script, run_torchrun

from gpt_toolkit.core.tokenizer import CharTokenizer, read_meta
from gpt_toolkit.models.checkpoint import load_checkpoint
from gpt_toolkit.models.source import model_from_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device (torch.cuda.is_available() is False): these tests need an NVIDIA "
                                       "GPU; on CPU the rest of the suite covers the same code")

# TINY_TRAIN's size on the GPU, with every other setting at the user's default (dtype=auto, compile=auto)
GPU_TINY = [a for a in TINY_TRAIN if a != "--device=cpu"] + ["--device=cuda"]


def evals(out_dir):
    return [(r["step"], r["val_loss"]) for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "eval"]


def train_records(out_dir):
    return [(r["iter"], r["loss"]) for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "train"]


@pytest.mark.parametrize("config, extra", [
    ("config/train_shakespeare_char_fast.py", ["--device=cuda", "--compile=auto"]),  # the main job, off its CPU pin
    ("config/train_shakespeare_char.py", ["--max_iters=60", "--lr_decay_iters=60", "--warmup_iters=10",
                                          "--eval_interval=30", "--eval_iters=10", "--log_interval=10"]),
])
def test_configs_train_with_the_defaults_and_report_mfu_against_the_spec(config, extra, data_dir, tmp_path):
    r = run_script("train.py", config, *extra, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}")
    assert r.returncode == 0, r.stderr[-3000:]
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert re.search(rf"device cuda\S*, dtype {expected}, compile True", r.stdout), r.stdout[:3000]
    # the GPU table's peak for the GPUs it lists; a measured matmul for others
    assert re.search(r"MFU is measured against [\d,.]+ TFLOP/s \((.+ spec|measured \w+ matmul on cuda\S*)\)", r.stdout)
    assert re.search(r"iter \d+: loss [\d.]+, time [\d.]+ms, mfu [\d.]+%", r.stdout)
    losses = [v for _, v in evals(tmp_path / "out")]
    assert losses[-1] < losses[0] - 0.5


def test_float16_trains_with_its_grad_scaler(data_dir, tmp_path):
    r = run_script("train.py", *GPU_TINY, "--dtype=float16", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'fp16'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dtype float16" in r.stdout
    losses = [v for _, v in evals(tmp_path / "fp16")]
    assert all(v == v for v in losses) and losses[-1] < losses[0] - 0.3  # finite, and learning
    assert load_checkpoint(tmp_path / "fp16" / "latest.pt")["scaler"]["scale"] > 0  # the scale travels with it


def test_exact_resume_on_cuda(data_dir, tmp_path):
    """Bit-exact: the CUDA RNG state (dropout) is saved and restored, and the kernels used here (flash attention's
    backward, fused AdamW, embedding backward) are deterministic for a fixed shape."""
    args = ["train.py", *GPU_TINY, "--dropout=0.1", "--log_interval=1", "--eval_interval=20",
            "--always_save_checkpoint=True", f"--data_dir={data_dir}"]
    r = run_script(*args, f"--out_dir={tmp_path / 'whole'}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script(*args, "--max_iters=20", f"--out_dir={tmp_path / 'split'}")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script(*args, "--init_from=resume", f"--out_dir={tmp_path / 'split'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert train_records(tmp_path / "whole") == train_records(tmp_path / "split")
    assert evals(tmp_path / "whole") == evals(tmp_path / "split")


def test_compile_that_fails_falls_back_to_eager(data_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("inductor failed (forced by the test)")
    monkeypatch.setattr(torch, "compile", broken)
    r = run_script("train.py", *GPU_TINY, "--max_iters=10", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'c'}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len([x for x in r.stdout.splitlines() if x.startswith("warning: torch.compile failed")]) == 1


def test_memory_check_refuses_what_the_gpu_cannot_hold(data_dir, tmp_path):
    r = run_script("train.py", *GPU_TINY, "--n_layer=1000", "--n_embd=4096", "--n_head=32", f"--data_dir={data_dir}",
                   f"--out_dir={tmp_path / 'big'}")
    assert_one_line_error(r, "this run needs about ", " but cuda", "use a smaller model", code=1)
    assert not (tmp_path / "big").exists()


def test_a_real_cuda_out_of_memory_is_one_line_and_keeps_the_checkpoint(data_dir, tmp_path):
    out = tmp_path / "oom"
    big = ["--n_layer=4", "--n_head=8", "--n_embd=1024", "--block_size=256"]
    r = run_script("train.py", *GPU_TINY, *big, "--max_iters=20", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    saved = {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in out.glob("*.pt")}
    # about 40 GB of activations per 100,000 rows of 256 tokens: no GPU holds a million
    r = run_script("train.py", *GPU_TINY, *big, "--max_iters=40", "--init_from=resume", "--batch_size=1000000",
                   "--check_memory=False", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert_one_line_error(r, "out of memory", "untouched", "--batch_size=")
    assert {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in out.glob("*.pt")} == saved


def test_activation_checkpointing_holds_less_memory_on_the_gpu(data_dir):
    r = run_script("tools/bench.py", "--checkpointing", "config/train_shakespeare_char.py", "--device=cuda",
                   "--block_size=1024", "--n_layer=6", "--batch_size=8", "--iters=3", "--rounds=1", "--warmup=2",
                   f"--data_dir={data_dir}", subprocess_only=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ratio = float(re.search(r"activation checkpointing: ([\d.]+)x the peak memory", r.stdout).group(1))
    assert ratio < 0.6, r.stdout


@pytest.fixture(scope="module")
def gpu_trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "out"
    r = run_script("train.py", *GPU_TINY, "--max_iters=60", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return out, CharTokenizer(read_meta(data_dir / "shakespeare_char")["itos"])


def test_sampling_on_the_gpu_streams_with_the_kv_cache(gpu_trained):
    out, _ = gpu_trained
    args = [f"--out_dir={out}", "--device=cuda", "--dtype=float32", "--start=ROMEO:", "--max_new_tokens=26",
            "--num_samples=1"]
    on, off = run_script("sample.py", *args), run_script("sample.py", *args, "--kv_cache=False")
    assert on.returncode == off.returncode == 0, on.stderr
    assert on.stdout == off.stdout and on.stdout.startswith("ROMEO:")


def test_greedy_on_the_gpu_equals_transformers(gpu_trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    out, tok = gpu_trained
    r = run_script("tools/export_hf.py", f"--out_dir={out}", f"--to={tmp_path / 'hf'}")
    assert r.returncode == 0, r.stderr
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).cuda().eval()
    ours = model_from_checkpoint(load_checkpoint(out / "ckpt.pt")).cuda().eval()
    prompt = torch.tensor([tok.encode("ROMEO:")], device="cuda")
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=26, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 26, temperature=0), theirs)
    # the export of a GPU-trained checkpoint gives our logits on the CPU too
    x = torch.randint(0, 65, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu_hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
        assert (cpu_hf(x).logits - ours.cpu()(x, x)[0]).abs().max() < 1e-4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two CUDA devices")
def test_ddp_over_nccl_matches_one_process(data_dir, tmp_path):
    args = ["train.py", *GPU_TINY, "--max_iters=20", "--gradient_accumulation_steps=2", f"--data_dir={data_dir}"]
    r = run_torchrun(*args, f"--out_dir={tmp_path / 'ddp'}", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    one = run_script(*args, f"--out_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    for (s1, v1), (s2, v2) in zip(evals(tmp_path / "ddp"), evals(tmp_path / "one"), strict=True):
        assert s1 == s2 and abs(v1 - v2) < 2e-2


def test_gpu_check_measures_both_models(tmp_path):
    r = run_script("tools/gpu_check.py", "--steps=3", "--warmup=2", subprocess_only=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = re.findall(r"^(shakespeare_char|GPT-2 124M) +ours +(compiled|eager) +[\d.]+ +[\d,]+ +[\d.]+% +[\d.]+ GiB$",
                      r.stdout, flags=re.MULTILINE)
    assert len(rows) == 4, r.stdout
