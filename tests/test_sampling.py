"""sample.py: one sample streams token by token (whole UTF-8 characters only), several come as one batch, and
--interactive=True answers a prompt per line of stdin."""
import io
import sys

import pytest
import torch
from conftest import TINY_TRAIN, run_script

from gpt_toolkit.core.tokenizer import CharTokenizer, GPT2Tokenizer, read_meta
from gpt_toolkit.models.checkpoint import load_checkpoint
from gpt_toolkit.models.source import model_from_checkpoint
from gpt_toolkit.serving.sampling import Samples, TextStream, write_samples

pytestmark = pytest.mark.precision  # its code path depends on the precision dtype=auto picks (.ci/run runs it in both)

ARGS = ["--device=cpu", "--max_new_tokens=60", "--temperature=0.9"]


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sampling") / "out"
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=20", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    model = model_from_checkpoint(load_checkpoint(out / "ckpt.pt")).eval()
    return out, model, CharTokenizer(read_meta(data_dir / "shakespeare_char")["itos"])


def expected(model, tokenizer, prompts, num_samples=1):
    """What sample.py must print: seed 1337 once, then model.generate for each prompt in turn."""
    torch.manual_seed(1337)
    texts = []
    for prompt in prompts:
        x = torch.tensor([tokenizer.encode(prompt)] * num_samples)
        texts.append([tokenizer.decode(row) for row in model.generate(x, 60, temperature=0.9, top_k=200).tolist()])
    return texts


def test_one_sample_streams_the_batch_text_token_by_token(run):
    out, model, tokenizer = run
    r = run_script("sample.py", f"--out_dir={out}", "--num_samples=1", "--start=ROMEO:", "--dtype=float32", *ARGS)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected(model, tokenizer, ["ROMEO:"])[0][0] + "\n---------------\n"
    pieces = []
    torch.manual_seed(1337)
    write_samples(model, tokenizer, "ROMEO:", Samples(1, 60, dict(temperature=0.9, top_k=200), kv_cache=True),
                  device="cpu", ctx=torch.autocast("cpu", enabled=False), write=pieces.append)
    assert len(pieces) == 1 + 60 + 1 and "".join(pieces) == r.stdout  # the prompt, each token, the end


def test_several_samples_are_one_batch(run):
    out, model, tokenizer = run
    r = run_script("sample.py", f"--out_dir={out}", "--num_samples=3", "--start=ROMEO:", "--dtype=float32", *ARGS)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(t + "\n---------------\n" for t in expected(model, tokenizer, ["ROMEO:"], 3)[0])


def test_stream_holds_back_a_character_split_between_bpe_tokens():
    tokenizer = GPT2Tokenizer()
    text = "東京 café 🙂 naïve"
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.end() == text
    assert "" in pieces  # a token that ends inside a character prints nothing yet
    assert all("\ufffd" not in p for p in pieces)


def test_interactive_answers_each_line_until_an_empty_one(run, monkeypatch):
    out, model, tokenizer = run
    monkeypatch.setattr(sys, "stdin", io.StringIO("ROMEO:\nJULIET: 東\nKING:\n\nnever read\n"))
    r = run_script("sample.py", f"--out_dir={out}", "--interactive=True", "--dtype=float32", *ARGS)
    assert r.returncode == 0, r.stderr
    answers = [texts[0] for texts in expected(model, tokenizer, ["ROMEO:", "KING:"])]
    rest = [a[len(p):] + "\n---------------\n" for a, p in zip(answers, ["ROMEO:", "KING:"])]
    assert r.stdout == "> ROMEO:\n" + rest[0] + "> JULIET: 東\n" + "> KING:\n" + rest[1]  # piped: each prompt echoed
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "outside this dataset's vocabulary: '東'" in errors[0]
