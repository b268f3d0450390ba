"""Chat fine-tuning: JSON Lines conversations rendered with the template and masked (data/prepare_chat.py), the loss
on the assistant's tokens only, --init_from=OUT_DIR, exact resume, the template in exports (transformers'
apply_chat_template gives our ids), and sample.py --chat=True."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAIN, assert_one_line_error, run_script

from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.tokenizer import (
    CHAT_TOKENS,
    GPT2_EOT,
    BPETokenizer,
    CharTokenizer,
    ChatTokenizer,
    GPT2Tokenizer,
    read_meta,
    special_ids,
    tokenizer_from_meta,
)
from gpt_toolkit.data.chat import read_conversations
from gpt_toolkit.data.dataset import Dataset, document_segments, padded_batch
from gpt_toolkit.models.checkpoint import load_checkpoint
from gpt_toolkit.models.source import model_from_checkpoint
from model import GPT, GPTConfig

pytestmark = pytest.mark.precision  # training and sampling follow the precision dtype=auto picks

NAMES = ["Romeo", "Juliet", "Hamlet", "Lear", "Portia", "Puck", "Viola", "Orsino"]
CHAT_TRAIN = [*TINY_TRAIN, "--block_size=64", "--padding=True", "--dropout=0.0"]


def conversations():
    """40 short conversations in both formats, a few with a system turn."""
    out = []
    for i in range(40):
        name = NAMES[i % len(NAMES)]
        if i % 3 == 0:
            out.append({"prompt": f"Who art thou, {name}?", "completion": f"I am {name}."})
        else:
            messages = [{"role": "user", "content": f"Where is {name}?"},
                        {"role": "assistant", "content": f"{name} is gone."}]
            if i % 5 == 0:
                messages.insert(0, {"role": "system", "content": "Be brief."})
            out.append({"messages": messages})
    return out


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def chat(data_dir, tmp_path_factory):
    """A base char model, a chat dataset in its vocabulary, and the model fine-tuned on it for 20 steps."""
    root = tmp_path_factory.mktemp("chat")
    base = root / "base"
    r = run_script("train.py", *TINY_TRAIN, "--block_size=64", "--max_iters=10", f"--data_dir={data_dir}",
                   f"--out_dir={base}")
    assert r.returncode == 0, r.stderr
    r = run_script("data/prepare_chat.py", f"--input={write_jsonl(root / 'chats.jsonl', conversations())}",
                   "--name=tiny_chat", f"--tokenizer_from={base}", f"--data_dir={data_dir}")
    assert r.returncode == 0, r.stderr
    assert "40 conversations (36 train, 4 val)" in r.stdout and "vocab size 70 (char and the chat tokens)" in r.stdout
    assert f"--dataset=tiny_chat --init_from={base}" in r.stdout
    tuned = root / "tuned"
    r = run_script("train.py", *CHAT_TRAIN, "--dataset=tiny_chat", f"--init_from={base}", "--max_iters=20",
                   "--eval_interval=10", f"--data_dir={data_dir}", f"--out_dir={tuned}")
    assert r.returncode == 0, r.stderr
    return base, data_dir / "tiny_chat", tuned, r.stdout


def test_prepared_ids_and_mask_are_the_template_with_only_the_answers_trained(chat):
    _, dataset_dir, _, _ = chat
    meta = read_meta(dataset_dir)
    tok = tokenizer_from_meta(meta)
    assert meta["chat"]["special_tokens"] == {"<|endoftext|>": 65, "<|system|>": 66, "<|user|>": 67,
                                              "<|assistant|>": 68, "<|end|>": 69}
    ids = np.fromfile(dataset_dir / "train.bin", dtype=np.uint16).tolist()
    mask = np.fromfile(dataset_dir / "train.mask.bin", dtype=np.uint8).tolist()
    first = "<|user|>Who art thou, Romeo?<|end|><|assistant|>I am Romeo.<|end|><|endoftext|>"
    second = "<|user|>Where is Juliet?<|end|><|assistant|>Juliet is gone.<|end|><|endoftext|>"
    assert tok.decode(ids).startswith(first + second)
    # 1 exactly on the assistant's characters and the <|end|> after them
    trained = "".join(tok.decode([t]) if m else "_" for t, m in zip(ids[:len(tok.encode(first))], mask))
    assert trained == "_" * (1 + len("Who art thou, Romeo?") + 2) + "I am Romeo.<|end|>" + "_"
    system = tok.decode(ids).split("<|endoftext|>")[5]
    assert system == "<|system|>Be brief.<|end|><|user|>Where is Puck?<|end|><|assistant|>Puck is gone.<|end|>"


def test_bad_lines_are_one_line_errors_with_their_number_or_skipped_and_counted(data_dir, tmp_path):
    good = conversations()[:10]
    bad = {"not JSON": "{nope", "unknown role": {"messages": [{"role": "narrator", "content": "x"}]},
           "no assistant turn": {"messages": [{"role": "user", "content": "Hello?"}]},
           "longer than block_size": {"prompt": "a" * 100, "completion": "b"}}
    for i, (what, record) in enumerate(bad.items()):
        path = write_jsonl(tmp_path / f"bad{i}.jsonl", [*good[:3], record, *good[3:]])
        r = run_script("data/prepare_chat.py", f"--input={path}", f"--name=bad{i}", "--tokenizer=char",
                       "--block_size=64", f"--data_dir={tmp_path}")
        assert_one_line_error(r, "line 4", what.split()[0], "--skip_bad=True")
        assert not (tmp_path / f"bad{i}").exists()  # nothing half-written
    path = write_jsonl(tmp_path / "mixed.jsonl", [*good, *bad.values()])
    r = run_script("data/prepare_chat.py", f"--input={path}", "--name=mixed", "--tokenizer=char", "--block_size=64",
                   "--skip_bad=True", f"--data_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "skipped 4 bad line(s)" in r.stdout and "10 conversations (9 train, 1 val)" in r.stdout
    with pytest.raises(UserError, match="holds no conversation"):
        read_conversations(write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_gpt2_chat_tokens_take_padding_rows_and_keep_the_checkpoint_shape():
    ids = special_ids(GPT2Tokenizer())
    assert ids == {"<|endoftext|>": GPT2_EOT, "<|system|>": 50257, "<|user|>": 50258, "<|assistant|>": 50259,
                   "<|end|>": 50260}
    tok = ChatTokenizer(GPT2Tokenizer(), ids)
    assert tok.vocab_size == 50261 <= 50304  # inside nanoGPT's padded embedding: no row added
    rendered, mask = tok.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}])
    assert rendered == [50258, 17250, 50260, 50259, 15496, 612, 50260] and mask == [0, 0, 0, 0, 1, 1, 1]


def test_masked_loss_equals_a_hand_masked_reference_and_prompts_get_no_gradient(chat):
    _, dataset_dir, tuned, _ = chat
    dataset = Dataset(dataset_dir.parent, dataset_dir.name)
    model = model_from_checkpoint(load_checkpoint(tuned / "ckpt.pt"))
    data, mask = dataset.splits["train"], dataset.trained["train"]
    starts, lengths = (a[:4] for a in document_segments(data, 65, 64))  # four whole conversations, as training rows
    X, Y = padded_batch(data, starts, lengths, pad=65, trained=mask)
    logits, loss = model(X, Y)
    # reference: every target's cross-entropy, weighted by the stored mask, averaged over the trained ones
    rows = [np.asarray(data[s:s + n]) for s, n in zip(starts, lengths)]
    ce, weight = [], []
    for r, row in enumerate(rows):
        t = torch.from_numpy(row[1:].astype(np.int64))
        ce.append(F.cross_entropy(logits[r, :len(row) - 1].detach(), t, reduction="none"))
        weight.append(torch.from_numpy(np.asarray(mask[starts[r] + 1:starts[r] + len(row)]).astype(np.float32)))
    ce, weight = torch.cat(ce), torch.cat(weight)
    assert 0 < weight.sum() < len(weight)
    assert abs(loss.item() - (ce * weight).sum().item() / weight.sum().item()) < 1e-5
    # the gradient reaching the logits at untrained positions (the prompt's own predictions) is exactly zero
    logits = logits.detach().requires_grad_()
    F.cross_entropy(logits.view(-1, logits.size(-1)), Y.view(-1), ignore_index=-1).backward()
    per_position = logits.grad.abs().sum(dim=-1)
    assert (per_position[Y < 0] == 0).all() and (per_position[Y >= 0] > 0).all()


def test_init_from_a_run_dir_grows_the_embedding_with_a_fresh_optimizer(chat):
    base, _, tuned, log = chat
    assert f"initializing from the run in {base} (its weights at step 10; a new optimizer and schedule)" in log
    assert "the chat tokens need 5 more rows than the model's token embedding has: grown to 70" in log
    ckpt, base_ckpt = load_checkpoint(tuned / "latest.pt"), load_checkpoint(base / "ckpt.pt")
    assert ckpt["iter_num"] == 20 and ckpt["model_args"]["vocab_size"] == 70
    assert ckpt["meta"]["chat"]["base_vocab_size"] == 65
    assert len(ckpt["optimizer"]["state"]) == len(base_ckpt["optimizer"]["state"])  # one state per parameter


def test_chat_training_resumes_exactly(chat, data_dir, tmp_path):
    base = chat[0]
    args = [*CHAT_TRAIN, "--dataset=tiny_chat", f"--data_dir={data_dir}", "--eval_interval=10", "--log_interval=1",
            "--always_save_checkpoint=True"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    r = run_script("train.py", *args, f"--init_from={base}", "--max_iters=20", f"--out_dir={whole}")
    assert r.returncode == 0, r.stderr
    r = run_script("train.py", *args, f"--init_from={base}", "--max_iters=10", f"--out_dir={split}")
    assert r.returncode == 0, r.stderr
    r = run_script("train.py", *args, "--init_from=resume", "--max_iters=20", f"--out_dir={split}")
    assert r.returncode == 0, r.stderr

    assert losses(whole) == losses(split) and len(losses(whole)) == 20 + 3
    a, b = load_checkpoint(whole / "latest.pt")["model"], load_checkpoint(split / "latest.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def losses(out):
    return [(d.get("iter"), d.get("loss"), d.get("val_loss")) for d in map(json.loads, (out / "metrics.jsonl")
            .read_text().splitlines()) if d["type"] in ("train", "eval")]


def test_a_chat_dataset_trains_on_padded_conversations_by_default(chat, data_dir, tmp_path):
    """Whole conversations per row, as --padding=True gives: one line says so, and the losses are that run's."""
    args = ["train.py", *TINY_TRAIN, "--block_size=64", "--dataset=tiny_chat", f"--init_from={chat[0]}",
            "--max_iters=10", "--eval_interval=5", f"--data_dir={data_dir}"]
    r = run_script(*args, f"--out_dir={tmp_path / 'default'}")
    assert r.returncode == 0, r.stderr
    assert "'tiny_chat' is a chat dataset: each row is one whole conversation, padded (--padding=True; --packing=True " \
           "packs them instead)" in r.stdout
    padded = run_script(*args, "--padding=True", f"--out_dir={tmp_path / 'padded'}")
    assert padded.returncode == 0, padded.stderr
    assert losses(tmp_path / "default") == losses(tmp_path / "padded")
    assert json.loads((tmp_path / "default" / "config.json").read_text())["padding"] is True


@pytest.mark.parametrize("kind", ["char", "bpe", "gpt2"])
def test_exported_template_gives_our_ids_through_apply_chat_template(kind, shakespeare_text, tmp_path):
    transformers = pytest.importorskip("transformers")
    from gpt_toolkit.core.bpe import train_bpe
    from gpt_toolkit.models.huggingface import write_tokenizer
    base = {"char": lambda: CharTokenizer(sorted(set(shakespeare_text))),
            "bpe": lambda: BPETokenizer(train_bpe([shakespeare_text[:200_000]], 300)),
            "gpt2": GPT2Tokenizer}[kind]()
    tok = ChatTokenizer(base, special_ids(base))
    write_tokenizer(tmp_path, tok, 64, transformers)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "What light, sir?"},
                {"role": "assistant", "content": "It is the east."}, {"role": "user", "content": "And Juliet?"}]
    ours, _ = tok.render(messages, add_generation_prompt=True)
    theirs = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs  # a BatchEncoding in newer transformers
    assert theirs == ours
    assert hf.convert_tokens_to_ids(list(CHAT_TOKENS)) == [tok.specials[t] for t in CHAT_TOKENS]
    assert hf.eos_token == "<|end|>"


def test_chat_session_keeps_history_and_drops_the_oldest_turns_when_full(chat, monkeypatch):
    import io
    import sys
    _, _, tuned, _ = chat
    lines = ["Who art thou, Romeo?", "Where is Juliet?", "Where is Lear?", "Who art thou, Puck?", ""]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    r = run_script("sample.py", f"--out_dir={tuned}", "--chat=True", "--max_new_tokens=20", "--temperature=0",
                   "--system=Be brief.")
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and r.stdout.count("\n") >= 8  # four turns and answers, each ended by a newline
    assert r.stdout.startswith("you> Who art thou, Romeo?\n") and "\nyou> Where is Juliet?\n" in r.stdout  # echoed
    assert "<|" not in r.stdout  # an answer ends at <|end|>, which is not printed
    # 64 positions, 20 kept for the answer: the history outgrows the rest, and the oldest turns go
    dropped = re.findall(r"the conversation no longer fits the model's context of 64 tokens: the oldest (\d+) turn\(s\) "
                         r"are dropped", r.stderr)
    assert dropped and all(int(n) >= 1 for n in dropped), r.stderr


def test_fit_history_keeps_the_system_turn_and_the_newest_turns():
    from sample import fit_history
    base = CharTokenizer(sorted(set("abcdefghij")))
    tok = ChatTokenizer(base, special_ids(base))
    history = [{"role": "system", "content": "be"}, {"role": "user", "content": "abc"},
               {"role": "assistant", "content": "def"}, {"role": "user", "content": "ghij"}]
    ids, dropped = fit_history(tok, history, 21)  # 4 + 5 + 5 + 6 tokens of turns, and <|assistant|>
    assert dropped == 0 and ids == tok.render(history, add_generation_prompt=True)[0]
    ids, dropped = fit_history(tok, history, 20)
    assert dropped == 1 and ids == tok.render([history[0], *history[2:]], add_generation_prompt=True)[0]
    ids, dropped = fit_history(tok, history, 14)
    assert dropped == 2 and ids == tok.render([history[0], history[3]], add_generation_prompt=True)[0]


def test_sample_chat_needs_a_chat_model(chat):
    r = run_script("sample.py", f"--out_dir={chat[0]}", "--chat=True")
    assert_one_line_error(r, "no chat template", "data/prepare_chat.py")


def test_shakespeare_chat_demo_prepares_offline(data_dir, tmp_path):
    r = run_script("data/shakespeare_chat/prepare.py", f"--data_dir={tmp_path}", subprocess_only=True)
    assert r.returncode == 0, r.stderr
    assert "3,326 conversations from the play's dialogue (2,993 train, 333 val)" in r.stdout
    meta = read_meta(tmp_path / "shakespeare_chat")
    assert meta["itos"] == read_meta(data_dir / "shakespeare_char")["itos"] and meta["vocab_size"] == 70
    first = json.loads((tmp_path / "shakespeare_chat" / "chats.jsonl").read_text().splitlines()[0])
    assert first == {"messages": [{"role": "user", "content": "Before we proceed any further, hear me speak."},
                                  {"role": "assistant", "content": "Speak, speak."}]}


def test_grown_rows_start_at_the_mean_of_the_others():
    model = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=4))
    old = model.transformer.wte.weight.detach().clone()
    model.grow_vocabulary(13)
    w = model.transformer.wte.weight
    assert w.shape == (13, 4) and model.lm_head.weight is w and torch.equal(w[:10], old)
    assert torch.allclose(w[10:], old.mean(dim=0).expand(3, 4))


def test_a_gpt2_chat_model_exports_as_gpt2_with_its_chat_tokens(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gpt_toolkit.models.huggingface import export_hf, tokenizer_for_hf_dir
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=1, n_embd=8)).eval()
    tok = ChatTokenizer(GPT2Tokenizer(), special_ids(GPT2Tokenizer()))
    export_hf(model, tok, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.vocab_size == 50261 and hf.config.eos_token_id == 50260  # the chat tokens' rows kept; <|end|>
    ids, _ = tok.render([{"role": "user", "content": "Hi there"}], add_generation_prompt=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (hf(x).logits - model(x, x)[0][..., :50261]).abs().max() < 1e-4
    back = tokenizer_for_hf_dir(tmp_path / "hf")
    assert back.specials == tok.specials and back.render([{"role": "user", "content": "Hi there"}],
                                                         add_generation_prompt=True)[0] == ids


@pytest.mark.parametrize("kind, extra, vocab", [("bpe", ["--vocab_size=300"], 304), ("gpt2", [], 50261)])
def test_prepare_chat_builds_a_new_bpe_or_gpt2_vocabulary(kind, extra, vocab, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", conversations())
    r = run_script("data/prepare_chat.py", f"--input={path}", "--name=c", f"--tokenizer={kind}", *extra,
                   f"--data_dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert f"vocab size {vocab:,} ({kind} and the chat tokens)" in r.stdout
    assert "train with  python train.py --dataset=c --padding=True --block_size=1024" in r.stdout  # a new model
    tok = tokenizer_from_meta(read_meta(tmp_path / "c"))
    ids = np.fromfile(tmp_path / "c" / "val.bin", dtype=np.uint16).tolist()
    assert tok.decode(ids) == ("<|user|>Who art thou, Portia?<|end|><|assistant|>I am Portia.<|end|><|endoftext|>"
                               "<|user|>Where is Puck?<|end|><|assistant|>Puck is gone.<|end|><|endoftext|>"
                               "<|user|>Where is Viola?<|end|><|assistant|>Viola is gone.<|end|><|endoftext|>"
                               "<|user|>Who art thou, Orsino?<|end|><|assistant|>I am Orsino.<|end|><|endoftext|>")
    assert max(ids) < vocab and ids.count(tok.specials["<|end|>"]) == 8


def test_a_damaged_chat_section_is_one_line(chat, tmp_path):
    import shutil
    _, dataset_dir, _, _ = chat
    copy = tmp_path / "tiny_chat"
    shutil.copytree(dataset_dir, copy)
    meta = json.loads((copy / "meta.json").read_text())
    del meta["chat"]["special_tokens"]["<|end|>"]
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"has a damaged 'chat' section \(special_tokens, base_vocab_size\): re-run"):
        read_meta(copy)
