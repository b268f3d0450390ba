"""Correctness of the speed features (never their timings): KV cache, CPU attention paths, dtype choice,
batches without memory growth, and the benchmark tool running."""
import json
import math
import platform
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAIN, assert_one_line_error, run_script

from gpt_toolkit.core import hardware
from gpt_toolkit.data.dataset import Dataset, batch_at, train_offsets
from model import GPT, CheapMaskDropout, GPTConfig, attention, explicit_attention


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=32, bias=True)).eval()


@pytest.mark.parametrize("top_k", [None, 5])
def test_kv_cache_gives_the_same_tokens_in_float32(small_model, top_k):
    idx = torch.tensor([[1, 2, 3, 4], [9, 8, 7, 6]])
    torch.manual_seed(11)
    cached = small_model.generate(idx, 28, temperature=0.9, top_k=top_k, kv_cache=True)  # up to block_size exactly
    torch.manual_seed(11)
    plain = small_model.generate(idx, 28, temperature=0.9, top_k=top_k, kv_cache=False)
    assert cached.shape == (2, 32) and torch.equal(cached, plain)


def test_kv_cache_logits_match_full_forward(small_model):
    from model import KVCache
    idx = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(3))
    cache = KVCache(2, 32)
    with torch.no_grad():
        small_model(idx[:, :12], kv_cache=cache)
        for t in range(12, 20):
            step_logits, _ = small_model(idx[:, t:t + 1], kv_cache=cache)
            full_logits, _ = small_model(idx[:, :t + 1])
            torch.testing.assert_close(step_logits, full_logits, rtol=1e-5, atol=1e-5)


def test_kv_cache_past_block_size_uses_the_last_half_block(small_model):
    """Past block_size the cache is rebuilt from the last block_size // 2 tokens: every greedy token must be
    what a full forward over exactly that window predicts."""
    idx = torch.tensor([[5, 6, 7]])
    out = small_model.generate(idx, 70, top_k=1, kv_cache=True)
    assert out.shape == (1, 73)
    tokens, window_start = out[0].tolist(), 0
    with torch.no_grad():
        for pos in range(3, 73):
            if pos - window_start > 32:  # the model's positions ran out: the window restarts half a block back
                window_start = pos - 1 - 16
            window = torch.tensor([tokens[window_start:pos]])
            assert small_model(window)[0][0, -1].argmax().item() == tokens[pos], pos


def test_sample_kv_cache_switch(data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_script("train.py", *TINY_TRAIN, "--max_iters=10", f"--data_dir={data_dir}", f"--out_dir={out}").returncode == 0
    args = ["sample.py", f"--out_dir={out}", "--num_samples=2", "--max_new_tokens=20", "--dtype=float32", "--seed=5"]
    on, off = run_script(*args), run_script(*args, "--kv_cache=False")
    assert on.returncode == off.returncode == 0
    assert on.stdout == off.stdout and on.stdout.count("---------------") == 2


def test_matmul_rates_time_the_cold_matmul_then_at_least_the_warm_ones_asked_for():
    """experiment.py's load figure is the median of warm timings: there is one however short the time or slow the
    machine (a cold first matmul that outlasts the time must not be the only figure)."""
    assert len(hardware.matmul_rates("cpu", "float32", 64, 0.0)) == 1
    rates = hardware.matmul_rates("cpu", "float32", 64, 0.0, warm=2)
    assert len(rates) == 3 and min(rates) > 0


def test_measured_peak_is_the_best_of_its_matmul_sizes(monkeypatch):
    """No single square size is fastest everywhere (on a Zen 4 float32 512 beat 1024 by ~30%): the peak is the best.
    A size whose one matmul takes more than its share of the time ends the search (float16 on most CPUs)."""
    assert hardware.square_matmul_flops("cpu", "float32", 64, 0.01) > 0  # the real one runs
    tried = []

    def fake(speeds):
        def measure(device, dtype, n, seconds):
            tried.append((n, round(seconds, 4)))
            return speeds[n]
        return measure

    monkeypatch.setattr(hardware, "square_matmul_flops", fake({256: 1e11, 512: 2.0e11, 1024: 1.4e11}))
    assert hardware.measure_matmul_flops("cpu", "float32", seconds=0.3) == 2.0e11
    assert tried == [(256, 0.1), (512, 0.1), (1024, 0.1)]  # the time budget is shared, not tripled
    tried.clear()
    monkeypatch.setattr(hardware, "square_matmul_flops", fake({256: 1e9, 512: 1e9, 1024: 1e9}))  # 256^3: 34 ms
    assert hardware.measure_matmul_flops("cpu", "float16", seconds=0.3) == 1e9
    assert tried == [(256, 0.1)]  # a 1024 matmul would have taken 2 s


def test_timers_wait_for_asynchronous_devices(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("cuda"))
    for device in ("cpu", "mps", "cuda:0"):
        hardware.synchronize(device)
    assert calls == ["mps", "cuda"]


def test_bf16_counts_as_native_only_where_its_matmuls_beat_float32(monkeypatch):
    # An Intel Xeon with AVX512-BF16 and AMX hidden multiplied bf16 at half float32's rate: auto must stay float32.
    monkeypatch.delenv(hardware.CPU_BF16_ENV, raising=False)
    raced = []

    def race(rate):
        def square(device, dtype, n, seconds):
            raced.append(dtype)
            return rate[dtype]
        return square

    for flags, rate, expected in [
        ({"architecture": "x86_64", "avx512_bf16": True}, {"float32": 270e9, "bfloat16": 145e9}, False),
        ({"architecture": "x86_64", "avx512_bf16": True}, {"float32": 190e9, "bfloat16": 420e9}, True),
        ({"architecture": "x86_64", "amx_bf16": True}, {"float32": 190e9, "bfloat16": 230e9}, False),  # < 1.25x
        ({"architecture": "x86_64", "avx512_f": True}, {"float32": 300e9, "bfloat16": 900e9}, False),  # no units
    ]:
        hardware._detected_cpu_bf16.cache_clear()
        raced.clear()
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: flags)
        monkeypatch.setattr(hardware, "square_matmul_flops", race(rate))
        assert hardware.cpu_has_native_bf16() is expected, (flags, rate)
        assert hardware.resolve_dtype("auto", "cpu") == ("bfloat16" if expected else "float32")
        # the race alternates the two dtypes, and runs only where the CPU has bf16 instructions
        assert raced == ([] if "avx512_f" in flags else ["float32", "bfloat16"] * 3)
    hardware._detected_cpu_bf16.cache_clear()
    raced.clear()
    monkeypatch.setenv(hardware.CPU_BF16_ENV, "1")  # the override skips the race
    assert hardware.cpu_has_native_bf16() is True and raced == []


def test_auto_dtype_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert hardware.resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert hardware.resolve_dtype("auto", "cpu") == "float32"
    assert hardware.resolve_dtype("auto", "mps") == "float32"
    assert hardware.resolve_dtype("float16", "cpu") == "float16"  # asked for: given (and slow)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert hardware.resolve_dtype("auto", "cuda") == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.resolve_dtype("auto", "cuda") == "bfloat16"
    assert hardware.grad_scaler("cpu", "bfloat16").is_enabled() is False
    assert hardware.grad_scaler("cpu", "float16").is_enabled() is True


def test_fast_cpu_attention_in_bf16_is_the_explicit_path_and_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(3))
    fast = attention(q, k, v, fast_cpu=True)
    assert fast.dtype == torch.bfloat16 and torch.equal(fast, explicit_attention(q, k, v, None, 0.0, True))
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    reference = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True)
    torch.testing.assert_close(fast.float(), reference, rtol=2e-2, atol=2e-2)
    grad = torch.randn(reference.shape, generator=g)
    fast.float().backward(grad)
    reference.backward(grad)
    for ours, exact in ((q, qf), (k, kf), (v, vf)):
        torch.testing.assert_close(ours.grad.float(), exact.grad, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("case", ["causal", "causal over a longer key", "not causal", "document mask"])
def test_explicit_attention_matches_sdpa_in_float32(case):
    g = torch.Generator().manual_seed(1)
    T, S = 12, (20 if case == "causal over a longer key" else 12)
    q = torch.randn(2, 3, T, 8, generator=g)
    k, v = (torch.randn(2, 3, S, 8, generator=g) for _ in range(2))
    allowed = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # a query sees its own position and all before it
    mask = None
    if case == "not causal":
        allowed = torch.ones(T, S, dtype=torch.bool)
    if case == "document mask":
        mask = (allowed & (torch.arange(T)[:, None] // 5 == torch.arange(S)[None, :] // 5)).expand(2, 1, T, S)
        allowed = mask
    ours = explicit_attention(q, k, v, mask, 0.0, case != "not causal")
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_bf16_cached_decoding_matches_the_full_forward(small_model):
    """Under bf16 autocast the full forward takes the explicit path and a cached token the float32 SDPA over the
    float32 cache: both must predict the same logits to bf16 precision."""
    from model import KVCache
    idx = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(3))
    cache = KVCache(2, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        small_model(idx[:, :12], kv_cache=cache)
        for t in range(12, 20):
            step_logits, _ = small_model(idx[:, t:t + 1], kv_cache=cache)
            full_logits, _ = small_model(idx[:, :t + 1])
            torch.testing.assert_close(step_logits.float(), full_logits.float(), rtol=3e-2, atol=3e-2)


def test_fast_cpu_attention_with_dropout_is_attention_with_that_mask():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g) for _ in range(3))
    torch.manual_seed(42)
    out = attention(q, k, v, dropout_p=0.25, fast_cpu=True)
    torch.manual_seed(42)
    keep = torch.rand(2, 3, 16, 16) >= 0.25  # the same draw CheapMaskDropout makes
    att = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), -math.inf)
    expected = (att.softmax(-1) * keep / 0.75) @ v
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_cheap_mask_dropout_statistics_and_backward():
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = CheapMaskDropout.apply(x, 0.2)
    kept = (y > 0).float().mean().item()
    assert abs(kept - 0.8) < 0.005 and torch.allclose(y[y > 0], torch.tensor(1.25))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient flows through exactly the kept entries, scaled alike


def test_training_with_and_without_fast_attention_takes_two_paths_to_the_same_losses(data_dir, tmp_path, monkeypatch):
    """In bf16 on CPU the fast path is the explicit attention, the slow one SDPA: the same evaluation at step 0 and
    the same first gradient (within bf16 rounding; later steps amplify the two kernels' roundings by an amount that
    depends on the CPU), and both train. The call count proves the two runs really took different paths."""
    import model
    calls = []
    real = model.explicit_attention
    monkeypatch.setattr(model, "explicit_attention", lambda *a: calls.append(1) or real(*a))
    runs, counts = [], []
    for fast in (True, False):
        calls.clear()
        out = tmp_path / f"fast{fast}"
        r = run_script("train.py", *TINY_TRAIN, "--max_iters=10", "--dropout=0", "--dtype=bfloat16",
                       "--grad_monitor_interval=100", f"--fast_cpu_attention={fast}", f"--data_dir={data_dir}",
                       f"--out_dir={out}")
        assert r.returncode == 0, r.stderr
        counts.append(len(calls))
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append(({rec["step"]: (rec["train_loss"], rec["val_loss"]) for rec in records if rec["type"] == "eval"},
                     next(rec for rec in records if rec["type"] == "grad")))
    assert counts[0] > 0 and counts[1] == 0
    (evals, grad), (slow_evals, slow_grad) = runs
    assert evals[0] == pytest.approx(slow_evals[0], abs=1e-3)
    assert grad["layer_norms"] == pytest.approx(slow_grad["layer_norms"], rel=1e-2)
    assert evals[10][1] < 4.0 and slow_evals[10][1] < 4.0  # both trained: ln(65) = 4.17 at the start


def test_get_batch_does_not_grow_memory(data_dir):
    data = Dataset(data_dir, "shakespeare_char").splits["train"]
    before = hardware.memory_in_use("cpu")
    for step in range(10_000):
        batch_at(data, train_offsets(seed=1337, step=step, count=12, split_len=len(data), block_size=64), block_size=64)
    grown = hardware.memory_in_use("cpu") - before
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MB"  # the 2 MB file's pages at most, plus noise


def test_memmap_is_opened_once(data_dir, monkeypatch):
    """Each split is mapped once per run (nanoGPT maps it again for every batch), read-only."""
    from gpt_toolkit.data import dataset
    opened = []
    real = np.memmap
    monkeypatch.setattr(dataset.np, "memmap", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    ds = Dataset(data_dir, "shakespeare_char")
    for step in range(50):
        for split in ("train", "val"):
            data = ds.splits[split]
            batch_at(data, train_offsets(seed=1337, step=step, count=4, split_len=len(data), block_size=32), block_size=32)
    assert sorted(p.name for p in opened) == ["train.bin", "val.bin"]
    assert not ds.splits["train"].flags.writeable


def test_gpu_peak_table_longest_name_wins(monkeypatch):
    spec = hardware.gpu_spec_peaks
    cases = {  # device name as torch reports it -> dense bf16 (else fp16) and TF32/FP32 peaks, in TFLOP/s
        "NVIDIA GeForce RTX 3060": (25.5, 12.7), "NVIDIA GeForce RTX 3060 Ti": (32.4, 16.2),
        "NVIDIA GeForce RTX 4070 Ti SUPER": (88.2, 44.1), "NVIDIA GeForce RTX 4070 Ti": (80.2, 40.1),
        "NVIDIA GeForce RTX 4090": (165.2, 82.6), "NVIDIA GeForce RTX 2080 Ti": (53.8, 13.4),
        "NVIDIA RTX A6000": (154.8, 77.4), "NVIDIA RTX 6000 Ada Generation": (364, 182), "NVIDIA L40": (181, 90.5),
        "NVIDIA L40S": (362, 183), "NVIDIA L4": (121, 60), "NVIDIA H100 PCIe": (756, 378),
        "NVIDIA H100 80GB HBM3": (989, 494), "NVIDIA GH200 480GB": (989, 494), "NVIDIA B200": (2250, 1100),
        "NVIDIA A10G": (70, 35), "NVIDIA A10": (125, 62.5), "NVIDIA A100-SXM4-80GB": (312, 156), "Tesla T4": (65, 8.1),
    }

    def peaks(name):
        found = spec(name)
        return (round(found.get("bfloat16", found.get("float16", 0)) / 1e12, 1), round(found["float32"] / 1e12, 1))

    assert {name: peaks(name) for name in cases} == cases
    assert "bfloat16" not in spec("NVIDIA GeForce RTX 2080 Ti")  # Turing: no bf16 tensor cores, so it is measured
    for unknown in ("NVIDIA GeForce GTX 1080", "NVIDIA RTX A1000", "NVIDIA RTX A400"):  # no whole-word match
        assert spec(unknown) == {}, unknown
    monkeypatch.setattr(hardware, "GPU_PEAK_FLOPS", hardware.GPU_PEAK_FLOPS[::-1])  # the order must not matter
    assert {name: peaks(name) for name in cases} == cases


def test_bench_compares_packed_and_padded_batches(tmp_path, data_dir):
    from conftest import build_dataset
    docs = ["To be or not to be. " * (1 + i % 4) for i in range(120)]
    build_dataset("<|endoftext|>".join(docs), tmp_path / "docs", "gpt2", progress=False)
    r = run_script("tools/bench.py", "--batching", "config/train_shakespeare_char_cpu.py", f"--data_dir={tmp_path}",
                   "--dataset=docs", "--n_layer=1", "--n_embd=32", "--n_head=2", "--batch_size=4", "--iters=1",
                   "--rounds=1", "--warmup=1")
    assert r.returncode == 0, r.stderr
    assert re.search(r"docs: \d+ train documents .* \d+ targets each on average", r.stdout), r.stdout
    assert re.search(r"packing=True +[\d.]+ ms/iter +[\d,]+ real tokens/s", r.stdout)
    assert re.search(r"padding=True +[\d.]+ ms/iter +[\d,]+ real tokens/s", r.stdout)
    assert re.search(r"padded documents train on [\d.]+x the real tokens per second of packed rows", r.stdout)
    r = run_script("tools/bench.py", "--batching", "config/train_shakespeare_char_cpu.py", f"--data_dir={data_dir}")
    assert r.returncode == 1 and "--batching needs a dataset of documents" in r.stderr


def test_bench_times_activation_checkpointing(data_dir, monkeypatch):
    """The two variants step in turn; the peak memory of each (a fresh process per variant, measured in
    test_bench_runs_both_modes) is stubbed here to keep the suite fast."""
    import tools.bench
    measured, peaks = [], {"on": 400 * 2**20, "checkpointed": 100 * 2**20}
    monkeypatch.setattr(tools.bench, "peak_memory_in_fresh_process",
                        lambda which, argv: measured.append((which, argv)) or peaks[which])
    r = run_script("tools/bench.py", "--checkpointing", "config/train_shakespeare_char.py", f"--data_dir={data_dir}",
                   "--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=128", "--batch_size=2",
                   "--gradient_accumulation_steps=1", "--iters=1", "--rounds=1", "--warmup=1", "--device=cpu")
    assert r.returncode == 0, r.stderr
    assert [w for w, _ in measured] == ["on", "checkpointed"] and all("--checkpointing" not in a for _, a in measured)
    assert re.search(r"checkpointed +[\d.]+ ms/iter .* peak memory 100 MB .*activation checkpointing\)", r.stdout)
    assert re.search(r"activation checkpointing: 0.25x the peak memory, [\d.]+x the time per iteration", r.stdout)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_bench_profile_splits_the_step_by_what_its_ops_do_and_when(data_dir, optimizer):
    """--profile: each kind of op's time per step in the forward pass, the backward pass and the optimizer's step,
    adding up (with what no op accounts for) to the step; the matmuls of Muon's Newton-Schulz are the optimizer's,
    AdamW has none."""
    r = run_script("tools/bench.py", "--profile", "config/train_shakespeare_char_fast.py", f"--data_dir={data_dir}",
                   "--n_layer=1", "--iters=2", "--warmup=1", f"--optimizer={optimizer}")
    assert r.returncode == 0, r.stderr
    step = float(re.search(r"where a step's ([\d.]+) ms go \(2 profiled steps", r.stdout)[1])
    rows = {m[0].strip(): [float(x) for x in m[1:5]]
            for m in re.findall(r"^([a-z][a-zA-Z ,()-]+?) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +\d+%$", r.stdout, re.M)}
    assert {"matmuls", "casts and copies", "loss (log-softmax, NLL)", "other ops"} <= set(rows), r.stdout
    for kind, (forward, backward, opt, total) in rows.items():
        assert abs(forward + backward + opt - total) <= 0.15, kind
    outside = float(re.search(r"^outside torch ops \(Python\) +([\d.]+) +\d+%$", r.stdout, re.M)[1])
    own = sum(row[3] for row in rows.values())
    assert own <= step + 0.05 * len(rows) and outside > 0  # the ops' own time is inside the steps' wall time
    assert abs(own + outside - step) <= 0.05 * len(rows) + 0.1
    forward, backward, opt, _ = rows["matmuls"]
    assert forward > 0 and backward > 0 and (opt > 0 if optimizer == "muon" else opt == 0.0)
    assert rows["other ops"][2] > 0  # either optimizer's step is seen (AdamW's: its scope, its ops)
    assert rows["loss (log-softmax, NLL)"][2] == 0.0  # no loss in the optimizer's step
    assert rows["norms (LayerNorm, RMSNorm)"][0] > 0
    assert re.search(r"matmul floor [\d.]+ ms/iter .*: the profiled step takes [\d.]+x that", r.stdout)


@pytest.mark.slow  # compiles (~20 s on 2 cores)
def test_bench_profile_of_a_compiled_step_names_its_fused_kernels(data_dir, tmp_path):
    """A compiled CPU step's fused kernels are a row of their own, and the largest are listed by the ops each fuses,
    their time inside that row's; without inductor's kernel profile they were one "other ops" figure. A new process:
    the inductor setting must not outlive the bench."""
    r = run_script("tools/bench.py", "--profile", "config/train_shakespeare_char_record.py", f"--data_dir={data_dir}",
                   "--n_layer=1", "--n_embd=64", "--n_head=2", "--block_size=64", "--batch_size=16", "--iters=2",
                   "--warmup=1", env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    row = re.search(r"^fused kernels \(compiled\) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +\d+%$", r.stdout, re.M)
    assert row, r.stdout
    forward, backward, opt, total = map(float, row.groups())
    assert forward > 0 and backward > 0 and opt == 0.0  # Muon runs eagerly
    kernels = re.findall(r"^ +([\d.]+) ms +([\d.]+)x +(forward|backward) +(\S+)$", r.stdout, re.M)
    assert len(kernels) == 8, r.stdout  # the largest 8 of the step's dozen or more (which ones varies with timing)
    ms = [float(k[0]) for k in kernels]
    assert ms == sorted(ms, reverse=True) and sum(ms) <= total + 0.05 + 0.005 * len(kernels)  # printed rounded
    assert all(re.fullmatch(r"_?[a-z][a-z_0-9]*", k[3]) for k in kernels), kernels  # the ops each fuses


def test_fused_kernel_names_are_read_from_inductors_profiler_events():
    from gpt_toolkit.training.profiling import FUSED, fused_kernel, kind_of

    class Event:
        def __init__(self, name):
            self.name, self.cpu_parent = name, None

    assert fused_kernel("graph_0_cpp_fused__to_copy_gelu_t_5") == "_to_copy_gelu_t_5"
    assert fused_kernel("graph_12_cpp_fused_relu_3") == "relu_3"
    assert fused_kernel("aten::mm") is None and fused_kernel("## Call CompiledFxGraph f2de5") is None
    assert kind_of(Event("graph_1_cpp_fused__softmax_2")) == FUSED and kind_of(Event("aten::mm")) == "matmuls"


@pytest.mark.slow
def test_bench_runs_both_modes(data_dir, monkeypatch):
    import tools.bench
    real = tools.bench.peak_memory_in_fresh_process  # measured for real once ("on"); "off" stubbed (suite time)
    monkeypatch.setattr(tools.bench, "peak_memory_in_fresh_process",
                        lambda which, argv: real(which, argv) if which == "on" else 300 * 2**20)
    r = run_script("tools/bench.py", "--compare", "config/train_shakespeare_char_cpu.py", f"--data_dir={data_dir}",
                   "--n_layer=1", "--iters=1", "--rounds=1", "--warmup=1")  # a bare flag: the config stays an argument
    assert r.returncode == 0, r.stderr
    assert re.search(r"all features on +[\d.]+ ms/iter .* tokens/s +MFU .* peak memory [\d,]+ MB +\((bfloat16|float32)", r.stdout)
    assert "all features off" in r.stdout and re.search(r"speedup: [\d.]+x faster per iteration", r.stdout)
    floors = re.findall(r"matmul floor +([\d.]+) ms/iter \(([\d.]+) GFLOP at ([\d,]+) GFLOP/s \w+\): this step takes "
                        r"([\d.]+)x that", r.stdout)
    assert len(floors) == 2, r.stdout
    for floor, gflop, peak, _ in floors:  # the floor is the step's FLOPs over the peak, both printed rounded (a busy
        gflop, peak = float(gflop), float(peak.replace(",", ""))  # machine measures a small peak: 10 +- 0.5 is 5%)
        assert 1000 * (gflop - 0.005) / (peak + 0.5) - 0.05 <= float(floor) <= 1000 * (gflop + 0.005) / (peak - 0.5) + 0.05
    r = run_script("tools/bench.py", "--sample", "config/train_shakespeare_char_cpu.py", f"--data_dir={data_dir}",
                   "--max_new_tokens=20", "--rounds=1")
    assert r.returncode == 0, r.stderr
    assert re.search(r"speedup: [\d.]+x more tokens/s with the KV cache", r.stdout)
    assert re.search(r"all features off *: +[\d.]+ tokens/s  \(float32\)", r.stdout)
    cache_in_float32 = re.search(r"speedup in float32: [\d.]+x more tokens/s with the KV cache", r.stdout)
    if re.search(r"KV cache on *: +[\d.]+ tokens/s  \(bfloat16", r.stdout):  # a CPU with native bf16
        assert cache_in_float32 and re.search(r"KV cache on *: +[\d.]+ tokens/s  \(float32", r.stdout), r.stdout
    else:
        assert not cache_in_float32, r.stdout  # already float32: the first ratio is that one
    assert re.search(r"speedup: [\d.]+x more tokens/s with every sampling feature on than with all off", r.stdout)


def churn_faults(nbytes, cycles=3, warmup=12):
    """Page faults per cycle of allocating, filling and freeing one block of nbytes, after warm-up cycles (torch's
    aligned allocations leave a few freed blocks beside each other before glibc reuses them)."""
    import resource
    for _ in range(warmup):
        torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / cycles


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs Linux with glibc")
@pytest.mark.parametrize("keep", [True, False])
def test_cpu_training_keeps_freed_memory_instead_of_page_faulting_it_back(keep, monkeypatch):
    """keep_cpu_memory (on by default): setup_process on CPU, as train.py calls it with the run's config, has glibc
    keep freed memory for reuse. With glibc's defaults a block over 32 MB is mapped afresh every time (16,384 faults
    for 64 MB); kept, it faults no more. The setting holds for the whole process, so the off case checks that it is
    not asked for."""
    from gpt_toolkit.core import process, system
    from gpt_toolkit.core.config import load_config
    calls = []
    real = system.keep_freed_memory
    monkeypatch.setattr(system, "keep_freed_memory", lambda: calls.append(1) or real())
    cfg, _ = load_config([] if keep else ["--keep_cpu_memory=False"])
    process.setup_process("cpu", keep_cpu_memory=cfg.keep_cpu_memory)
    assert len(calls) == (1 if keep else 0)
    if keep:
        assert churn_faults(64 << 20) < 1000


def test_bench_allocator_alternates_fresh_processes_and_reports_medians(data_dir, monkeypatch):
    """The parent's side: one fresh bench process per setting and round, in turn; medians of what they report.
    Their side (--steps_of) is run in this process below, to keep the suite fast."""
    import subprocess

    import tools.bench
    calls, reports = [], iter([(0.10, 40), (0.13, 5000), (0.30, 60), (0.16, 6000), (0.11, 20), (0.14, 4000)])

    def child(cmd, **kwargs):
        calls.append([a for a in cmd if a.startswith(("--keep_cpu_memory", "--steps_of", "--rounds"))])
        seconds, faults = next(reports)
        return subprocess.CompletedProcess(cmd, 0, f"seconds_per_iter {seconds} faults_per_iter {faults}\n", "")
    monkeypatch.setattr(tools.bench.subprocess, "run", child)
    r = run_script("tools/bench.py", "--allocator", "config/train_shakespeare_char_fast.py", f"--data_dir={data_dir}",
                   "--rounds=3", "--keep_cpu_memory=False")
    assert r.returncode == 0, r.stderr
    assert calls == [[f"--keep_cpu_memory={keep}", "--steps_of=on"] for _ in range(3) for keep in (True, False)]
    assert re.search(r"keep_cpu_memory=True +110.0 ms/iter +40 page faults per iteration +\(medians of 3 fresh "
                     r"processes\)", r.stdout), r.stdout
    assert re.search(r"keep_cpu_memory=False +140.0 ms/iter +5,000 page faults per iteration", r.stdout), r.stdout
    assert "speedup: 1.27x faster per iteration with keep_cpu_memory" in r.stdout
    r = run_script("tools/bench.py", "config/train_shakespeare_char_fast.py", f"--data_dir={data_dir}", "--n_layer=1",
                   "--iters=1", "--warmup=1", "--steps_of=on")
    assert r.returncode == 0, r.stderr
    seconds, faults = map(float, re.fullmatch(r"seconds_per_iter (\S+) faults_per_iter (\S+)\n", r.stdout).groups())
    assert seconds > 0 and faults >= 0


def test_bench_allocator_needs_a_cpu_run(data_dir, monkeypatch):
    monkeypatch.setattr(hardware, "resolve_device", lambda name: "cuda")  # as on a machine with a GPU
    r = run_script("tools/bench.py", "--allocator", "config/train_shakespeare_char_fast.py", f"--data_dir={data_dir}")
    assert_one_line_error(r, "--allocator", "--device=cpu")


def test_a_measured_cpu_peak_too_low_to_be_true_gives_way_to_the_cores_fma_rate(monkeypatch, tmp_path):
    """On a busy machine the matmul measured 0.004 TFLOP/s and MFU was 'measured against 0.00 TFLOP/s'."""
    from gpt_toolkit.core import hardware
    rate = hardware.cpu_fma_flops()
    if rate is None:
        pytest.skip("this CPU's clock or vector width is unknown")
    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path))  # no quiet figure kept: this run measures
    monkeypatch.setattr(hardware, "machine_is_busy", lambda: False)  # the load the average has not caught yet
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda device, dtype: 4e9)
    peak, source = hardware.peak_flops.__wrapped__("cpu", "float32")
    assert peak == rate[0] and "the measured float32 matmul, 4.0 GFLOP/s, is too low" in source, source
    monkeypatch.setattr(hardware, "measure_matmul_flops", lambda device, dtype: rate[0] / 2)
    assert hardware.peak_flops.__wrapped__("cpu", "float32") == (rate[0] / 2, "measured float32 matmul on cpu")
    assert hardware.flops_text(4e9) == "4.0 GFLOP/s" and hardware.flops_text(1.25e12) == "1.25 TFLOP/s"


def test_bench_refuses_two_benchmarks_at_once_and_rounds_of_a_profile(data_dir):
    """Each of bench.py's benchmarks runs alone: a second flag, or --rounds for --profile (one run), was silently
    ignored; now it is one line before anything runs."""
    config = ["config/train_shakespeare_char_fast.py", f"--data_dir={data_dir}"]
    assert_one_line_error(run_script("tools/bench.py", "--profile", "--compare", *config),
                          "--profile and --compare are two different benchmarks")
    assert_one_line_error(run_script("tools/bench.py", "--sample", "--checkpointing", *config),
                          "--sample and --checkpointing")
    assert_one_line_error(run_script("tools/bench.py", "--profile", "--rounds=2", *config), "drop --rounds")


def test_bench_busy_names_a_missing_config_in_one_line():
    """tools/bench_busy.py --config: a typo is one line before anything runs (its trainings' output is hidden, so it
    used to end in a traceback after the first 12 s measurement)."""
    assert_one_line_error(run_script("tools/bench_busy.py", "--config=config/nope.py"), "--config=config/nope.py",
                          "no such file")
