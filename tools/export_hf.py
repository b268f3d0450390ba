"""Export a trained model (ours or nanoGPT's checkpoint) as a Hugging Face transformers GPT-2 directory.

    python tools/export_hf.py --out_dir=out-shakespeare-char --to=hf-shakespeare-char [--checkpoint=ckpt.pt]

The directory holds config.json and model.safetensors (GPT2LMHeadModel.from_pretrained(DIR) loads it, offline),
README.md (a model card that states the context: n_positions tokens, a hard limit in transformers),
and the tokenizer: GPT-2 BPE models get vocab.json, merges.txt and tokenizer_config.json, character models and own
BPEs a tokenizer.json and tokenizer_config.json (AutoTokenizer reads them).
`--init_from=DIR` in train.py and sample.py loads it back.

A LoRA run (--lora_rank) exports merged: a plain GPT-2 with the adapters folded in. `--lora=adapter` writes a PEFT
adapter directory instead (adapter_config.json, adapter_model.safetensors), for the base model's own export:
    python tools/export_hf.py --out_dir=BASE_RUN --to=hf-base
    python tools/export_hf.py --out_dir=LORA_RUN --to=hf-adapter --lora=adapter
    model = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained("hf-base"), "hf-adapter")
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.core.files import check_new_directory
from gpt_toolkit.models.checkpoint import BEST
from gpt_toolkit.models.huggingface import export_hf, export_peft_adapter
from gpt_toolkit.models.lora import describe
from gpt_toolkit.models.source import ModelSource


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("--out_dir", required=True, help="the trained run's directory")
    parser.add_argument("--to", required=True, help="the directory to create (must not exist, or be empty)")
    parser.add_flag("--verify_checkpoint", default=True, help="check the checkpoint's checksum")
    parser.add_argument("--checkpoint", default=BEST, help=f"file in out_dir (default {BEST}, the lowest val loss)")
    parser.add_argument("--lora", default="merged", choices=["merged", "adapter"],
                        help="a LoRA run: merged (a plain GPT-2, the adapters folded in) or adapter (a PEFT adapter)")
    args, _ = parser.parse(argv)
    to = Path(args.to)
    check_new_directory(to)
    run = ModelSource.run(args.out_dir)
    ckpt, source = run.load_checkpoint(args.checkpoint, verify=args.verify_checkpoint)
    if args.lora == "adapter":
        return export_adapter(run, ckpt, source, to)
    model = run.model(ckpt)
    tokenizer = run.tokenizer(ckpt)
    step = ckpt.get("iter_num", "?")
    files = export_hf(model, tokenizer, to, dropout=ckpt["model_args"].get("dropout", 0.0),
                      source=f"{Path(source).resolve().parent.name}/{Path(source).name} (step {step})")  # no local path
    print(f"exported {source} (step {step}, {tokenizer.kind} tokenizer) to {to}: "
          f"{', '.join(files)}")
    print(f"load it with transformers.GPT2LMHeadModel.from_pretrained({str(to)!r}), or --init_from={to}")
    block = model.config.block_size
    print(f"its context is {block} tokens (config.json's n_positions): give transformers' generate and pipeline "
          f"max_new_tokens of at most {block} minus the prompt's tokens (README.md)")
    return 0


def export_adapter(run, ckpt, source, to):
    if ckpt.get("lora") is None:
        raise UserError(f"{source} is not a LoRA run's checkpoint (it was trained without --lora_rank): there is no "
                        f"adapter to export; drop --lora=adapter to export the model")
    files = export_peft_adapter(run.model(ckpt, adapters=True), to)
    print(f"exported the LoRA adapter of {source} (step {ckpt.get('iter_num', '?')}, {describe(ckpt['lora'])}) to "
          f"{to}: {', '.join(files)}")
    print(f"load it with peft.PeftModel.from_pretrained(BASE, {str(to)!r}), BASE the export of "
          f"{ckpt['lora']['base']['path']}")
    return 0


if __name__ == "__main__":
    run_main(main)
