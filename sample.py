"""Generate text from a trained model (out_dir/ckpt.pt) or from OpenAI's GPT-2 weights.

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2 --start="Once upon a time"
    python sample.py --out_dir=out-shakespeare-char --interactive=True     (a prompt per line; empty line quits)

One sample is printed as it is generated; several are generated as one batch and printed at the end.
"""
import sys
from types import SimpleNamespace

from gpt_toolkit.errors import quiet_interrupts

quiet_interrupts()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import torch

from configurator import defaults_of, help_of, parse_args
from gpt_toolkit import hardware
from gpt_toolkit.checkpoint import BEST
from gpt_toolkit.compiling import CompiledOrEager
from gpt_toolkit.errors import ConfigError, UserError, run_main
from gpt_toolkit.process import setup_process
from gpt_toolkit.sampling import check_generation_fits, load_model, read_prompt, write_samples
from gpt_toolkit.train_config import check_init_from


class Config:
    """Defaults. The comment after each key is its --help line."""
    init_from = "resume"  # resume (the model in out_dir) | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | an HF GPT-2 dir
    out_dir = "out"  # directory of the trained run
    checkpoint = BEST  # file in out_dir: ckpt.pt (lowest val loss) | latest.pt (newest) | ckpt_stepNNNNNNNN.pt
    verify_checkpoint = True  # check the checkpoint's checksum (False: load one that fails it anyway)
    start = "\n"  # the prompt; FILE:path reads it from a file
    num_samples = 10  # how many samples to draw
    max_new_tokens = 500  # tokens generated per sample
    temperature = 0.8  # < 1 is more conservative, > 1 more random; must be > 0
    top_k = 200  # sample only among the k most likely tokens; 0 = all
    seed = 1337  # random seed
    device = "auto"  # auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps
    dtype = "auto"  # auto | float32 | bfloat16 | float16
    compile = False  # torch.compile the forward (slow to start; pays off only for long generations; eager if it fails)
    kv_cache = True  # reuse the keys and values of earlier tokens (much faster; False recomputes the whole context)
    interactive = False  # read prompts from stdin, one per line, and answer each (empty line or EOF quits)


CHOICES = {"dtype": hardware.DTYPE_CHOICES}
USAGE = "usage: python sample.py [CONFIG_FILE ...] [--key=value ...]"


def validate(cfg):
    check_init_from(cfg.init_from, ("resume",))
    if cfg.max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} must be positive")
    if cfg.num_samples <= 0:
        raise ConfigError(f"num_samples={cfg.num_samples} must be positive")
    if cfg.temperature <= 0:
        raise ConfigError(f"temperature={cfg.temperature} must be > 0 (use a small value like 0.1 for nearly greedy output)")
    if cfg.top_k < 0:
        raise ConfigError(f"top_k={cfg.top_k} must be 0 (off) or positive")


def main(argv):
    config, cli_keys = parse_args(argv, defaults_of(Config), help_of(Config), CHOICES, usage=USAGE)
    cfg = SimpleNamespace(**config)
    validate(cfg)
    if cfg.interactive and "num_samples" not in cli_keys:
        cfg.num_samples = 1  # a conversation: one streamed answer per prompt
    device = hardware.resolve_device(cfg.device)
    dtype = hardware.resolve_dtype(cfg.dtype, device)
    setup_process(device, keep_cpu_memory=False)  # generation frees little: the allocator setting is for training
    prompt = None if cfg.interactive else read_prompt(cfg.start)
    if prompt == "":
        raise UserError("the prompt is empty: give --start some text (the default is a newline)")
    model, tokenizer = load_model(cfg, device)
    check_generation_fits(model, cfg.num_samples, device)
    if cfg.compile:  # the forward that generation calls; dynamic shapes: no recompile as the context grows
        model.forward = CompiledOrEager(model.forward, lambda line: print(line, file=sys.stderr, flush=True),
                                        dynamic=True)
    torch.manual_seed(cfg.seed)  # after loading: the samples depend on the seed, not on how the model was read

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    def sample(text, echo_prompt):
        write_samples(model, tokenizer, text, num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.temperature, top_k=cfg.top_k, kv_cache=cfg.kv_cache, device=device,
                      ctx=hardware.autocast(device, dtype), write=write, echo_prompt=echo_prompt)

    if not cfg.interactive:
        sample(prompt, echo_prompt=True)
        return 0
    if sys.stdin.isatty():
        print("type a prompt and press Enter; an empty line or Ctrl-D quits", file=sys.stderr)
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        try:
            sample(line.rstrip("\n"), echo_prompt=False)
        except UserError as e:  # a character the model never saw: say so and take the next prompt
            print(f"error: {e}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
