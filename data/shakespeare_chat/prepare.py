"""A small chat dataset from tiny-shakespeare's dialogue, offline: each speech is a user turn and the speech that
answers it the assistant's (the speakers' names are dropped), written as chats.jsonl in the dataset and prepared
with the character vocabulary of data/shakespeare_char (so a model trained there can be fine-tuned on it).

    python data/shakespeare_chat/prepare.py                  # input.txt of data/shakespeare_char (downloaded if missing)
    python train.py config/finetune_chat_shakespeare.py      # after the base model: see that config
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the toolkit root

from gpt_toolkit.core.startup import start_script

start_script()  # before the imports below (torch: seconds): a Ctrl-C meanwhile ends in one line, not a traceback

from gpt_toolkit.core.cli import tool_parser
from gpt_toolkit.core.errors import run_main
from gpt_toolkit.core.tokenizer import TINY_SHAKESPEARE_URL, download, read_text
from gpt_toolkit.data.chat import prepare_chat_dataset, read_conversations
from gpt_toolkit.data.preparing import TokenizerChoice, open_source, prepare_dataset

CHAR_DATA = HERE.parent / "shakespeare_char"


def speeches(text):
    """The speeches of the play text, in order: (speaker, text without the name line)."""
    out = []
    for block in text.split("\n\n"):
        name, _, body = block.strip().partition("\n")
        if name.endswith(":") and body.strip():
            out.append((name[:-1], body.strip()))
    return out


def dialogue(text, max_chars):
    """[{"messages": [user, assistant]}] of consecutive speeches by two different speakers, each at most max_chars."""
    pairs = []
    for (a, said), (b, answer) in zip(speeches(text), speeches(text)[1:]):
        if a != b and len(said) <= max_chars and len(answer) <= max_chars:
            pairs.append({"messages": [{"role": "user", "content": said}, {"role": "assistant", "content": answer}]})
    return pairs


def main(argv):
    parser = tool_parser(__file__, __doc__)
    parser.add_argument("--block_size", type=int, default=256, help="the longest conversation in tokens (default 256: "
                        "the base model's context)")
    parser.add_argument("--data_dir", default=str(HERE.parent), help="where dataset directories live")
    args, _ = parser.parse(argv)
    source = CHAR_DATA / "input.txt"
    if not source.exists():
        print(f"downloading {TINY_SHAKESPEARE_URL} to {source}")
        download(TINY_SHAKESPEARE_URL, source)
    if not (Path(args.data_dir) / "shakespeare_char" / "meta.json").exists():  # the vocabulary the base model has
        prepare_dataset(open_source(source), Path(args.data_dir) / "shakespeare_char", "char", progress=False)
    # five chat tokens and the two turns' texts fit block_size + 1 tokens
    pairs = dialogue(read_text(source), max_chars=(args.block_size - 4) // 2)
    chats = Path(args.data_dir) / "shakespeare_chat" / "chats.jsonl"
    chats.parent.mkdir(parents=True, exist_ok=True)
    chats.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    conversations, _ = read_conversations(chats)
    summary = prepare_chat_dataset(conversations, Path(args.data_dir) / "shakespeare_chat",
                                   TokenizerChoice(None, of_model=str(Path(args.data_dir) / "shakespeare_char")),
                                   block_size=args.block_size)
    print(f"{summary['conversations']:,} conversations from the play's dialogue ({summary['train_conversations']:,} "
          f"train, {summary['val_conversations']:,} val); {summary['tokens']:,} tokens, {summary['trained']:,} of them "
          f"the assistant's; wrote {chats} and {Path(args.data_dir) / 'shakespeare_chat'}")
    return 0


if __name__ == "__main__":
    run_main(main)
