"""Generate text from a trained model (out_dir/ckpt.pt) or from OpenAI's GPT-2 weights.

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt --out_dir=out-shakespeare-char
    python sample.py --init_from=gpt2 --start="Once upon a time"
    python sample.py --out_dir=out-shakespeare-char --interactive=True     (a prompt per line; empty line quits)

One sample is printed as it is generated; several are generated as one batch and printed at the end.
"""
import sys
from types import SimpleNamespace

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

import torch

from configurator import defaults_of, help_of, parse_args
from gpt_toolkit.core import hardware
from gpt_toolkit.core.config import MAX_SEED
from gpt_toolkit.core.errors import ConfigError, UserError, run_main
from gpt_toolkit.core.process import setup_process
from gpt_toolkit.models.checkpoint import BEST
from gpt_toolkit.models.source import RESUME, ModelSource, load_model
from gpt_toolkit.serving.sampling import Samples, check_generation_fits, fit_history, read_prompt, stop_token_ids, write_samples
from gpt_toolkit.training.compiling import CompiledOrEager
from model import check_sampling


class Config:
    """Defaults. The comment after each key is its --help line."""
    init_from = "resume"  # resume (the model in out_dir) | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | an HF GPT-2 dir
    out_dir = "out"  # directory of the trained run
    checkpoint = BEST  # file in out_dir: ckpt.pt (lowest val loss) | latest.pt (newest) | ckpt_stepNNNNNNNN.pt
    verify_checkpoint = True  # check the checkpoint's checksum (False: load one that fails it anyway)
    start = "\n"  # the prompt; FILE:path reads it from a file
    num_samples = 10  # how many samples to draw
    max_new_tokens = 500  # tokens generated per sample (an answer in --chat mode)
    temperature = 0.8  # < 1 is more conservative, > 1 more random; 0 = greedy (always the most likely token)
    top_k = 200  # sample only among the k most likely tokens; 0 = all
    top_p = 1.0  # sample only among the fewest tokens whose probabilities add up to top_p (nucleus); 1.0 = all
    min_p = 0.0  # drop tokens less likely than min_p times the likeliest; 0 = off
    repetition_penalty = 1.0  # > 1 makes tokens already in the text less likely (transformers' definition); 1 = off
    stop = ""  # end a sample at this text (not printed); repeat --stop=... for several; \n and \t are understood
    stop_at_eot = True  # end a sample at <|endoftext|> or a chat's <|end|> (False: generate on)
    seed = 1337  # random seed
    device = "auto"  # auto (cuda, else mps, else cpu) | cpu | cuda | cuda:N | mps
    dtype = "auto"  # auto | float32 | bfloat16 | float16
    compile = False  # torch.compile the forward (slow to start; pays off only for long generations; eager if it fails)
    kv_cache = True  # reuse the keys and values of earlier tokens (much faster; False recomputes the whole context)
    interactive = False  # read prompts from stdin, one per line, and answer each (empty line or EOF quits)
    chat = False  # a conversation over stdin with a chat model (data/prepare_chat.py): the template, history, answers
    system = ""  # --chat: a system turn to start the conversation with


CHOICES = {"dtype": hardware.DTYPE_CHOICES}
USAGE = "usage: python sample.py [CONFIG_FILE ...] [--key=value ...]"


def validate(cfg):
    """Bad settings in one line each; returns the model's source."""
    source = ModelSource.parse(cfg.init_from, out_dir=cfg.out_dir, allowed=(RESUME,))
    if cfg.max_new_tokens <= 0:
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} must be positive")
    if cfg.num_samples <= 0:
        raise ConfigError(f"num_samples={cfg.num_samples} must be positive")
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ConfigError(f"seed={cfg.seed} must be from 0 to {MAX_SEED}")
    try:  # the model's own checks: the chat and every caller of generate get the same
        check_sampling(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
                       repetition_penalty=cfg.repetition_penalty)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.chat and cfg.interactive:
        raise ConfigError("chat=True and interactive=True are two ways of reading stdin: choose one")
    return source


def unescape(text):
    """\\n and \\t as typed on a command line, as a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def main(argv):
    stops = [unescape(a.split("=", 1)[1]) for a in argv if a.startswith("--stop=")]  # --stop may be repeated
    config, cli_keys = parse_args([a for a in argv if not a.startswith("--stop=")], defaults_of(Config),
                                  help_of(Config), CHOICES, usage=USAGE)
    cfg = SimpleNamespace(**config)
    cfg.stop = stops + ([unescape(cfg.stop)] if cfg.stop else [])
    source = validate(cfg)
    if (cfg.interactive or cfg.chat) and "num_samples" not in cli_keys:
        cfg.num_samples = 1  # a conversation: one streamed answer per prompt
    device = hardware.resolve_device(cfg.device)
    dtype = hardware.resolve_dtype(cfg.dtype, device)
    setup_process(device, keep_cpu_memory=False)  # generation frees little: the allocator setting is for training
    prompt = None if cfg.interactive or cfg.chat else read_prompt(cfg.start)
    if prompt == "":
        raise UserError("the prompt is empty: give --start some text (the default is a newline)")
    model, tokenizer = load_model(source, device, checkpoint=cfg.checkpoint, verify=cfg.verify_checkpoint, dtype=dtype)
    if cfg.chat and not hasattr(tokenizer, "render"):
        raise UserError("this model has no chat template: fine-tune it on a chat dataset first (data/prepare_chat.py, "
                        "config/finetune_chat_shakespeare.py), or sample it with --interactive=True")
    check_generation_fits(model, cfg.num_samples, device)
    if cfg.compile:  # the forward that generation calls; dynamic shapes: no recompile as the context grows
        model.forward = CompiledOrEager(model.forward, lambda line: print(line, file=sys.stderr, flush=True),
                                        dynamic=True)
    torch.manual_seed(cfg.seed)  # after loading: the samples depend on the seed, not on how the model was read
    controls = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p,
                    repetition_penalty=cfg.repetition_penalty)
    stop_tokens = stop_token_ids(tokenizer) if cfg.stop_at_eot else ()

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    def sample(text, echo_prompt=True, separator="\n---------------\n"):
        samples = Samples(cfg.num_samples, cfg.max_new_tokens, controls, kv_cache=cfg.kv_cache, echo_prompt=echo_prompt,
                          stop=cfg.stop, stop_tokens=stop_tokens, separator=separator)
        return write_samples(model, tokenizer, text, samples, device=device, ctx=hardware.autocast(device, dtype),
                             write=write)

    if cfg.chat:
        return chat(cfg, tokenizer, model.config.block_size, sample)
    if not cfg.interactive:
        sample(prompt)
        return 0
    for line in stdin_lines("type a prompt and press Enter; an empty line or Ctrl-D quits", "> "):
        try:
            sample(line, echo_prompt=False)
        except UserError as e:  # a character the model never saw: say so and take the next prompt
            print(f"error: {e}", file=sys.stderr, flush=True)
    return 0


def stdin_lines(greeting, prompt):
    """The lines typed on stdin (without their newline) until an empty one or its end; on a terminal, greeted once
    and prompted for each. Piped in, each line is echoed after the prompt on stdout, so the output reads as the
    session would (the prompt, what was sent, the answer)."""
    terminal = sys.stdin.isatty()
    if terminal:
        print(greeting, file=sys.stderr)
    while True:
        if terminal:
            print(prompt, end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        if not terminal:
            print(prompt + line.rstrip("\n"), flush=True)
        yield line.rstrip("\n")


def chat(cfg, tokenizer, block_size, sample):
    """A conversation over stdin: each line a user turn, each answer streamed and ended at <|end|>; the history that
    no longer fits the model's context (with room for an answer) is dropped, oldest turns first, and the user told."""
    history = [{"role": "system", "content": cfg.system}] if cfg.system else []
    room = min(cfg.max_new_tokens, block_size // 2)
    for line in stdin_lines("chat: type a message and press Enter; an empty line or Ctrl-D quits", "you> "):
        history.append({"role": "user", "content": line})
        try:
            ids, dropped = fit_history(tokenizer, history, block_size - room)
        except UserError as e:  # a character the model never saw: say so and take the next message
            history.pop()
            print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        if dropped:
            print(f"(the conversation no longer fits the model's context of {block_size} tokens: the oldest "
                  f"{dropped} turn(s) are dropped)", file=sys.stderr, flush=True)
            del history[int(history[0]["role"] == "system"):][:dropped]
        answer = sample(ids, echo_prompt=False, separator="\n")
        history.append({"role": "assistant", "content": tokenizer.decode(answer)})
    return 0


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
