"""Generation controls (model.filter_logits, sample.py): greedy decoding token for token as transformers' generate,
top-p / min-p / repetition penalty by hand and by transformers' own processors, stop strings split across tokens,
stopping at end-of-text tokens, the same text with and without the KV cache, impossible values as one-line errors."""
import math

import pytest
import torch
from conftest import TINY_TRAIN, assert_one_line_error, run_script

from gpt_toolkit.core.tokenizer import CharTokenizer, read_meta
from gpt_toolkit.models.checkpoint import load_checkpoint
from gpt_toolkit.models.source import model_from_checkpoint
from gpt_toolkit.serving.sampling import StopAtStrings
from model import GPT, GPTConfig, filter_logits, sample_next

pytestmark = pytest.mark.precision  # sampling runs in the precision dtype=auto picks

PROBS = [0.5, 0.3, 0.15, 0.05]


def kept(**controls):
    """The distribution left after the filters, for logits whose softmax is PROBS."""
    logits = torch.log(torch.tensor([PROBS]))
    return torch.softmax(filter_logits(logits, **controls), dim=-1)[0].tolist()


def close(a, b):
    return all(math.isclose(x, y, abs_tol=1e-6) for x, y in zip(a, b, strict=True))


def test_top_p_keeps_the_fewest_tokens_that_reach_it():
    assert close(kept(top_p=0.8), [0.5 / 0.8, 0.3 / 0.8, 0, 0])  # 0.5 + 0.3 reach 0.8: the rest go
    assert close(kept(top_p=0.81), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    assert close(kept(top_p=0.4), [1, 0, 0, 0])  # the likeliest is always kept
    assert close(kept(top_p=1.0), PROBS)


def test_min_p_keeps_tokens_at_least_that_share_of_the_likeliest():
    assert close(kept(min_p=0.35), [0.5 / 0.8, 0.3 / 0.8, 0, 0])  # threshold 0.175
    assert close(kept(min_p=0.25), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])  # threshold 0.125
    assert close(kept(min_p=0.0), PROBS)


def test_filters_agree_with_transformers_processors():
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    previous = torch.randint(0, 50, (4, 12), generator=g)
    for controls, theirs in [
        (dict(top_p=0.9), [transformers.TopPLogitsWarper(0.9)]),
        (dict(min_p=0.1), [transformers.MinPLogitsWarper(0.1)]),
        (dict(top_k=7, top_p=0.7, temperature=0.8),
         [transformers.TemperatureLogitsWarper(0.8), transformers.TopKLogitsWarper(7), transformers.TopPLogitsWarper(0.7)]),
        (dict(repetition_penalty=1.3), [transformers.RepetitionPenaltyLogitsProcessor(1.3)]),
    ]:
        expected = logits.clone()
        for p in theirs:
            expected = p(previous, expected)
        ours = filter_logits(logits, previous=previous, **controls)
        assert torch.equal(torch.isinf(ours), torch.isinf(expected)), controls
        assert torch.allclose(torch.softmax(ours, -1), torch.softmax(expected, -1), atol=1e-6), controls


def test_repetition_penalty_by_its_definition():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = filter_logits(logits, repetition_penalty=2.0, previous=torch.tensor([[0, 1, 1]]))
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # seen: positive halved, negative doubled; unseen untouched
    # greedy with the penalty turns away from the token just said
    assert sample_next(torch.tensor([[3.0, 2.0]]), 0, repetition_penalty=2.0, previous=torch.tensor([[0]])).item() == 1


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    out = root / "out"
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=30", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return out, CharTokenizer(read_meta(data_dir / "shakespeare_char")["itos"])


def test_greedy_equals_transformers_generate_token_for_token(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    out, tok = trained
    r = run_script("tools/export_hf.py", f"--out_dir={out}", f"--to={tmp_path / 'hf'}")
    assert r.returncode == 0, r.stderr
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    ours = model_from_checkpoint(load_checkpoint(out / "ckpt.pt")).eval()
    prompt = torch.tensor([tok.encode("ROMEO:\nWhat"), tok.encode("JULIET:\nNay")])
    # within the context window: transformers' GPT-2 has no sliding window past n_positions
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(ours.generate(prompt, 20, temperature=0), theirs)
    r = run_script("sample.py", f"--out_dir={out}", "--start=ROMEO:\nWhat", "--temperature=0", "--num_samples=1",
                   "--max_new_tokens=20", "--dtype=float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout == tok.decode(theirs[0].tolist()) + "\n---------------\n"


def test_a_stop_string_split_across_tokens_still_stops():
    cut = StopAtStrings(["\n\n", "END"])
    pieces = [cut.push(t) for t in ["Good ", "morrow.", "\n", "\n", "Never printed"]]
    assert pieces == ["Good ", "morrow.", "", ""] + [""] and cut.stopped and cut.end() == ""
    cut = StopAtStrings(["END"])
    assert [cut.push(t) for t in ["the E", "N", "d."]] == ["the ", "", "ENd."] and not cut.stopped
    assert cut.end() == ""


def test_sample_stops_at_a_string_of_several_tokens(trained):
    out, tok = trained
    args = [f"--out_dir={out}", "--start=ROMEO:", "--temperature=0", "--num_samples=1", "--max_new_tokens=80"]
    full = run_script("sample.py", *args)
    assert full.returncode == 0, full.stderr
    text = full.stdout.removesuffix("\n---------------\n")[len("ROMEO:"):]
    stop = text[20:23]  # three characters: three tokens of a char model
    r = run_script("sample.py", *args, f"--stop={stop}", "--stop=never said")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ROMEO:" + text[:text.index(stop)] + "\n---------------\n"
    # several samples at once (a batch) are cut the same way
    r = run_script("sample.py", *args[:-2], "--num_samples=2", "--max_new_tokens=80", f"--stop={stop}")
    assert r.stdout == ("ROMEO:" + text[:text.index(stop)] + "\n---------------\n") * 2


def test_generation_ends_at_a_stop_token_and_rows_that_stop_repeat_it():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=12, n_layer=1, n_head=1, n_embd=8)).eval()
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = model.generate(x, 10, temperature=0)
    first = free[0, 3].item()  # row 0's first greedy token: make it the stop token
    stopped = model.generate(x, 10, temperature=0, stop_tokens=(first,))
    row1 = free[1, 3:].tolist()
    if first in row1:  # row 1 stops too, at its own first occurrence; the batch then ends
        assert stopped.size(1) == 3 + row1.index(first) + 1
    else:
        assert torch.equal(stopped[1], free[1])
    assert (stopped[0, 3:] == first).all()  # a finished row repeats its stop token


@pytest.mark.parametrize("controls", [["--top_p=0.9", "--min_p=0.05", "--repetition_penalty=1.3"], ["--top_k=5"]])
def test_the_kv_cache_gives_the_same_text_for_a_seed(trained, controls):
    out, _ = trained
    # 6 + 26 tokens: the context window exactly (past it the cache keeps the last half block, the plain way a full one)
    args = [f"--out_dir={out}", "--start=ROMEO:", "--max_new_tokens=26", "--dtype=float32", *controls]
    for n in ("1", "3"):  # streamed, and batched
        on = run_script("sample.py", *args, f"--num_samples={n}")
        off = run_script("sample.py", *args, f"--num_samples={n}", "--kv_cache=False")
        assert on.returncode == off.returncode == 0, on.stderr
        assert on.stdout == off.stdout and on.stdout.count("---------------") == int(n)


@pytest.mark.parametrize("flag, fragment", [
    ("--top_p=0", "top_p=0.0 must be in (0, 1]"), ("--top_p=1.5", "top_p=1.5 must be in (0, 1]"),
    ("--temperature=-1", "temperature=-1.0 must be 0 (greedy) or positive"), ("--min_p=1", "min_p=1.0 must be in [0, 1)"),
    ("--repetition_penalty=0", "repetition_penalty=0.0 must be positive")])
def test_impossible_values_are_one_line_errors(flag, fragment):
    assert_one_line_error(run_script("sample.py", flag), fragment)
