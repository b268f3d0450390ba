"""What this toolkit does on the CUDA GPU it finds: for the tutorial's shakespeare_char model and GPT-2 124M
(config/train_gpt2.py's model), training tokens/s and MFU compiled and eager, and peak memory of train.py's own
steps (gpt_toolkit.training.timing: its batches from a memmap, its logging, its guards, as a run takes them); with
--nanogpt=PATH, nanoGPT's own model.py with its train.py's step on the same model, its batches already on the GPU.
Synthetic tokens (speed does not depend on them), so no download and no prepared data. A few minutes on one modern
GPU.

    python tools/gpu_check.py [--nanogpt=/path/to/nanoGPT] [--steps=10] [--dtype=auto] [--models=char,gpt2]

Without CUDA it says so in one line and exits 1.
"""
import dataclasses
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import numpy as np
import torch

from gpt_toolkit.core import hardware
from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.config import load_config
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.core.process import setup_process
from gpt_toolkit.core.tokenizer import GPT2_VOCAB_SIZE
from gpt_toolkit.training.init_from import scratch_model_args
from gpt_toolkit.training.timing import train_in_process
from model import GPT, GPT2_PADDED_VOCAB, GPTConfig
from train import main as train_main  # the entry point: its loop, clocked

# (name, config file, vocabulary size of its data)
MODELS = {"char": ("shakespeare_char", "config/train_shakespeare_char.py", 65),
          "gpt2": ("GPT-2 124M", "config/train_gpt2.py", GPT2_PADDED_VOCAB)}


def parser():
    p = tool_parser(__file__, __doc__)
    p.add_argument("--nanogpt", default="", help="a nanoGPT checkout: its model.py timed beside ours")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per variant (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="steps before timing: compilation, autotuning (default 3)")
    p.add_argument("--dtype", default="auto", choices=hardware.DTYPE_CHOICES, help="precision (default auto)")
    p.add_argument("--models", default="char,gpt2", help="which models, comma-separated: char, gpt2")
    p.add_argument("--device", default="cuda", help="a CUDA device (default cuda)")
    return p


def synthetic_batch(cfg, vocab_size, device, generator):
    X = torch.randint(0, vocab_size, (cfg.batch_size, cfg.block_size + 1), generator=generator).to(device)
    return [(X[:, :-1].contiguous(), X[:, 1:].contiguous())]


def synthetic_dataset(data_dir, vocab_size, tokens=1 << 20):
    """A dataset of random token ids in data_dir/synthetic (speed does not depend on them): a character vocabulary of
    vocab_size, or, for GPT-2's, no vocabulary file (train.py then takes GPT-2's padded 50304, as nanoGPT does)."""
    path = Path(data_dir) / "synthetic"
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        ids = torch.randint(0, min(vocab_size, GPT2_VOCAB_SIZE), (tokens,), generator=generator)
        ids.numpy().astype(np.uint16).tofile(path / f"{split}.bin")
    if vocab_size < GPT2_VOCAB_SIZE:
        itos = [chr(32 + i) for i in range(vocab_size)]
        (path / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": vocab_size, "itos": itos}),
                                       encoding="utf-8")
    return path.name


def ours(cfg, data_dir, vocab_size, *, dtype, warmup, steps, compiled):
    """(ms per step: median of the timed steps, peak bytes allocated while stepping) of train.py itself, its model,
    optimizer and precision, on synthetic tokens: one micro-batch a step."""
    cfg = dataclasses.replace(cfg, data_dir=str(data_dir), dataset=synthetic_dataset(data_dir, vocab_size),
                              gradient_accumulation_steps=1, compile=compiled, dtype=dtype)
    clock = train_in_process(train_main, cfg, steps=warmup + steps, memory="steps")
    return 1000 * statistics.median(clock.seconds[warmup:]), clock.memory_before + clock.peak


def nanogpts(path, cfg, vocab_size, device, dtype, compiled):
    """A step function of nanoGPT's model.py with its train.py's precision and AdamW: the same model side by side."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(path) / "model.py")
    if spec is None or not (Path(path) / "model.py").is_file():
        raise UserError(f"--nanogpt={path} has no model.py: give the directory of a nanoGPT checkout")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(cfg.seed)
    model = module.GPT(module.GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                        block_size=cfg.block_size, bias=cfg.bias, vocab_size=vocab_size,
                                        dropout=cfg.dropout)).to(device)
    kind = hardware.device_type(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), kind)
    ctx = hardware.autocast(device, dtype)
    scaler = torch.amp.GradScaler(kind, enabled=dtype == "float16")
    run = torch.compile(model) if compiled else model

    def step(batches):
        for X, Y in batches:
            with ctx:
                _, loss = run(X, Y)
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def measure(step, cfg, vocab_size, device, *, warmup, steps):
    """(ms per step: median of the timed steps, peak bytes allocated while stepping)."""
    generator = torch.Generator().manual_seed(0)
    batches = [synthetic_batch(cfg, vocab_size, device, generator) for _ in range(4)]
    for i in range(warmup):
        step(batches[i % 4]).item()
    hardware.synchronize(device)
    hardware.reset_peak_memory(device)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(batches[i % 4]).item()
        hardware.synchronize(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), hardware.peak_memory(device)


def main(argv):
    args, _ = parser().parse(argv)
    if not torch.cuda.is_available():
        raise UserError("no CUDA GPU here (torch.cuda.is_available() is False): run tools/gpu_check.py on a machine "
                        "with an NVIDIA GPU and a CUDA build of torch")
    if args.steps < 1 or args.warmup < 1:
        raise UserError("--steps and --warmup must be at least 1")
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        raise UserError(f"--models={args.models}: unknown {unknown[0]!r}; choose from {', '.join(MODELS)}")
    device = hardware.resolve_device(args.device)
    if hardware.device_type(device) != "cuda":
        raise UserError(f"--device={args.device} is not a CUDA device: this tool measures a GPU")
    setup_process(device, keep_cpu_memory=False)  # TF32 on, as train.py runs
    dtype = hardware.resolve_dtype(args.dtype, device)
    peak, source = hardware.peak_flops(device, dtype)
    props = torch.cuda.get_device_properties(device)
    print(f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"dtype {dtype}; MFU against {peak / 1e12:,.0f} TFLOP/s ({source})")
    header = f"{'model':<17} {'code':<8} {'mode':<9} {'ms/step':>9} {'tokens/s':>12} {'MFU':>7} {'peak memory':>13}"
    for key in args.models.split(","):
        name, config, vocab_size = MODELS[key]
        cfg, _ = load_config([str(ROOT / config), f"--device={device}"])
        tokens = cfg.batch_size * cfg.block_size
        with torch.device("meta"):  # its FLOPs without allocating it
            shape = GPT(GPTConfig(**scratch_model_args(cfg, vocab_size)))
        flops = shape.flops_per_token(cfg.block_size) * tokens
        print(f"{name}: {config}'s model ({shape.get_num_params() / 1e6:.1f}M parameters), a step of one micro-batch of "
              f"{cfg.batch_size} x {cfg.block_size} synthetic tokens, {args.steps} timed after {args.warmup}")
        print(header)
        for code in ["ours"] + (["nanoGPT"] if args.nanogpt else []):
            for compiled in (True, False):
                if code == "ours":
                    with tempfile.TemporaryDirectory() as data_dir:
                        ms, memory = ours(cfg, data_dir, vocab_size, dtype=dtype, warmup=args.warmup,
                                          steps=args.steps, compiled=compiled)
                else:
                    step = nanogpts(args.nanogpt, cfg, vocab_size, device, dtype, compiled)
                    ms, memory = measure(step, cfg, vocab_size, device, warmup=args.warmup, steps=args.steps)
                    del step
                print(f"{name:<17} {code:<8} {'compiled' if compiled else 'eager':<9} {ms:9.1f} "
                      f"{tokens / ms * 1000:12,.0f} {flops / (ms / 1000) / peak:7.1%} {memory / 2**30:9.2f} GiB",
                      flush=True)
                torch._dynamo.reset()
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    run_main(main)
