"""Hugging Face both ways: our (and nanoGPT's) checkpoints exported as transformers GPT-2 directories with their
tokenizer, and such directories loaded offline by train.py and sample.py."""
import contextlib
import json
import logging
import shutil
import warnings

import pytest
import torch
from conftest import ROOT, TINY_TRAIN, assert_one_line_error, run_script

from gpt_toolkit.core.config import load_config
from gpt_toolkit.core.tokenizer import GPT2Tokenizer, read_meta
from gpt_toolkit.models.checkpoint import load_checkpoint, save_checkpoint
from gpt_toolkit.models.huggingface import tokenizer_for_hf_dir
from gpt_toolkit.models.source import ModelSource, model_from_checkpoint
from gpt_toolkit.training.init_from import build_model
from model import GPT, GPTConfig

transformers = pytest.importorskip("transformers")


def hf_logits(directory, x):
    model = transformers.GPT2LMHeadModel.from_pretrained(str(directory), local_files_only=True).eval()
    with torch.no_grad():
        return model(x).logits


def our_logits(model, x):
    with torch.no_grad():
        return model.eval()(x, x)[0]  # with targets: logits at every position


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A tiny char model trained with bias=False and dropout, exported."""
    root = tmp_path_factory.mktemp("hf")
    out = root / "out"
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=20", "--bias=False", "--dropout=0.1", f"--data_dir={data_dir}",
                   f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    r = run_script("tools/export_hf.py", f"--out_dir={out}", f"--to={root / 'hf'}")
    assert r.returncode == 0, r.stderr
    assert "exported" in r.stdout and "char tokenizer" in r.stdout
    assert "its context is 32 tokens (config.json's n_positions)" in r.stdout
    return out, root / "hf"


def test_trained_char_model_exports_with_zero_biases_and_its_vocabulary(trained, data_dir):
    out, hf = trained
    assert sorted(p.name for p in hf.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                    "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    ours = model_from_checkpoint(load_checkpoint(out / "ckpt.pt"))
    x = torch.randint(0, 65, (3, 32), generator=torch.Generator().manual_seed(0))
    assert (hf_logits(hf, x) - our_logits(ours, x)).abs().max().item() < 1e-4
    state = transformers.GPT2LMHeadModel.from_pretrained(str(hf)).state_dict()
    biases = [k for k in state if k.endswith(".bias") and not k.endswith(".attn.bias")]  # not the mask buffer
    assert len(biases) == 2 * 6 + 1 and all(state[k].abs().max() == 0 for k in biases)
    vocab = json.loads((hf / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert sorted(vocab, key=vocab.get) == read_meta(data_dir / "shakespeare_char")["itos"]
    assert tokenizer_for_hf_dir(hf).itos == read_meta(data_dir / "shakespeare_char")["itos"]
    assert json.loads((hf / "config.json").read_text())["attn_pdrop"] == 0.1


def test_export_then_init_from_gives_the_same_logits_and_samples(trained, data_dir):
    out, hf = trained
    cfg, _ = load_config([*TINY_TRAIN, f"--init_from={hf}", "--dropout=0.0", f"--data_dir={data_dir}"])
    model, model_args, notes = build_model(cfg, ModelSource.for_training(cfg),
                                           dataset=type("D", (), {"vocab_size": 65, "is_chat": False})(), ckpt=None)
    assert model_args["vocab_size"] == 65 and "the Hugging Face model in" in notes[0]
    ours = model_from_checkpoint(load_checkpoint(out / "ckpt.pt"))
    x = torch.randint(0, 65, (2, 32), generator=torch.Generator().manual_seed(1))
    assert (our_logits(model, x) - our_logits(ours, x)).abs().max().item() < 1e-5
    args = ["--num_samples=1", "--max_new_tokens=40", "--start=ROMEO:", "--device=cpu", "--dtype=float32"]
    from_hf = run_script("sample.py", f"--init_from={hf}", *args)
    from_ckpt = run_script("sample.py", f"--out_dir={out}", *args)
    assert from_hf.returncode == from_ckpt.returncode == 0, from_hf.stderr
    assert from_hf.stdout.startswith("ROMEO:") and from_hf.stdout == from_ckpt.stdout
    # and train.py fine-tunes it, offline
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=10", f"--init_from={hf}", f"--data_dir={data_dir}",
                   f"--out_dir={hf.parent / 'tuned'}")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(hf.parent / "tuned" / "latest.pt")["model_args"]["bias"] is True


def test_nanogpt_bpe_checkpoint_exports_cropped_vocabulary_and_gpt2_tokenizer(tmp_path):
    """A nanoGPT checkpoint (compiled names, no meta, padded 50304-token vocabulary, biases) of a random model."""
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, bias=True, vocab_size=50304, dropout=0.0)
    model = GPT(GPTConfig(**args))
    for p in model.parameters():  # random biases and gains too, so a dropped or misplaced tensor shows
        torch.nn.init.normal_(p, std=0.1)
    (tmp_path / "nano").mkdir()
    save_checkpoint({"model": {"_orig_mod." + k: v for k, v in model.state_dict().items()}, "model_args": args,
                     "iter_num": 0, "best_val_loss": torch.tensor(9.0), "config": {}}, tmp_path / "nano" / "ckpt.pt")
    r = run_script("tools/export_hf.py", f"--out_dir={tmp_path / 'nano'}", f"--to={tmp_path / 'hf'}")
    assert r.returncode == 0, r.stderr
    hf = tmp_path / "hf"
    assert {"vocab.json", "merges.txt", "tokenizer_config.json", "model.safetensors"} <= {p.name for p in hf.iterdir()}
    x = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(2))
    theirs = hf_logits(hf, x)
    assert theirs.shape[-1] == 50257
    assert (theirs - our_logits(model, x)[..., :50257]).abs().max().item() < 1e-4
    text = "Hello world! ROMEO: wherefore art thou, 東京? <|endoftext|> 123"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf), local_files_only=True)
    assert tokenizer(text)["input_ids"] == GPT2Tokenizer().encode(text)
    assert tokenizer.decode(GPT2Tokenizer().encode(text)) == text
    # the round trip keeps GPT-2's 50257 tokens; sample.py decodes it with GPT-2 BPE
    r = run_script("sample.py", f"--init_from={hf}", "--num_samples=1", "--max_new_tokens=5", "--device=cpu",
                   "--start=Hello")
    assert r.returncode == 0 and r.stdout.startswith("Hello"), r.stderr


def test_bad_targets_and_sources_are_one_line_errors(trained, tmp_path):
    out, hf = trained
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    assert_one_line_error(run_script("tools/export_hf.py", f"--out_dir={out}", f"--to={hf}"),
                          "already exists and is not an empty directory")
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
    for tool in ("sample.py", "tools/evaluate.py"):  # an export given as a run's out_dir: the flag that reads it
        assert_one_line_error(run_script(tool, f"--out_dir={hf}"),
                              f"{hf} is a Hugging Face model directory, not a run's out_dir: pass --init_from={hf}")
    early = tmp_path / "early"  # a run that stopped before its first save: its own config.json, no checkpoint
    early.mkdir()
    shutil.copy(out / "config.json", early / "config.json")
    assert_one_line_error(run_script("sample.py", f"--out_dir={early}"), f"no checkpoint at {early / 'ckpt.pt'}: train one "
                                                                        f"first")
    assert_one_line_error(run_script("train.py", *TINY_TRAIN, f"--init_from={tmp_path / 'nowhere'}"),
                          "nor a directory with a Hugging Face config.json", code=2)
    assert_one_line_error(run_script("sample.py", "--init_from=gtp2"), "is not one of resume, gpt2", code=2)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_one_line_error(run_script("sample.py", f"--init_from={llama}"), "holds a 'llama' model")
    # refused before any data is read (no --data_dir here: the toolkit's data/ may not be prepared)
    assert_one_line_error(run_script("train.py", *TINY_TRAIN, f"--init_from={llama}", f"--out_dir={tmp_path / 'o'}",
                                     "--data_dir=/nonexistent"), "holds a 'llama' model")
    assert not (tmp_path / "o").exists()


@contextlib.contextmanager
def transformers_says():
    """The messages transformers gives meanwhile: its warnings.warn and its logging at warning level (whatever
    TRANSFORMERS_VERBOSITY says), once-only ones included. A list, filled in at the end."""
    said, records = [], []
    handler = logging.Handler()
    handler.emit = records.append
    library = logging.getLogger("transformers")
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()
    logging.Logger.warning_once.cache_clear()
    library.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield said
    finally:
        library.removeHandler(handler)
        transformers.utils.logging.set_verbosity(verbosity)
        said += [str(w.message) for w in caught] + [r.getMessage() for r in records]


def test_a_pipeline_given_max_new_tokens_does_not_warn_and_past_the_context_is_the_documented_error(trained):
    """The export once set generation_config's max_length to the context (32 here), and transformers then warned on
    every call that gave max_new_tokens ("Both `max_new_tokens` (=10) and `max_length`(=32) seem to have been set").
    The context is config.json's n_positions and the model card's instead; past it transformers logs that it is past
    the model's maximum length, then raises the IndexError docs/huggingface.md and the card name."""
    _, hf = trained
    assert "max_length" not in json.loads((hf / "generation_config.json").read_text())
    assert json.loads((hf / "config.json").read_text())["n_positions"] == 32
    card = (hf / "README.md").read_text()
    assert "`tools/export_hf.py` from out/ckpt.pt (step 20): 2 layers" in card  # the run's name, not a local path
    assert "## Context: 32 tokens" in card and "The context is **32 tokens** (`n_positions` in `config.json`)" in card
    assert "maximum length (32)\" and\nthen stops with `IndexError: index out of range in self`" in card
    generate = transformers.pipeline("text-generation", model=str(hf), device="cpu")
    prompt = len(generate.tokenizer("ROMEO:")["input_ids"])
    with transformers_says() as said:
        sampled = generate("ROMEO:", max_new_tokens=10)[0]["generated_text"]
        greedy = generate("ROMEO:", do_sample=False, max_new_tokens=32 - prompt)[0]["generated_text"]
    assert said == []
    assert sampled.startswith("ROMEO:") and len(generate.tokenizer(sampled)["input_ids"]) == prompt + 10
    assert greedy.startswith("ROMEO:") and len(generate.tokenizer(greedy)["input_ids"]) == 32
    with transformers_says() as said, pytest.raises(IndexError, match="index out of range in self"):
        generate("ROMEO:", do_sample=False, max_new_tokens=34 - prompt)  # reads position 32: past the table
    assert said == ["This is a friendly reminder - the current text generation call has exceeded the model's "
                    "predefined maximum length (32). Depending on the model, you may observe exceptions, performance "
                    "degradation, or nothing at all."]
    with pytest.raises(IndexError, match="index out of range in self"):
        generate("ROMEO:", do_sample=False)  # the pipeline's own 256 new tokens, past a 32-token context
    with transformers_says() as said:  # generate() itself, given no length: 20 new tokens, cut at the context
        assert generate.model.generate(torch.ones(1, 6, dtype=torch.long), do_sample=False).shape == (1, 26)
        assert generate.model.generate(torch.ones(1, 30, dtype=torch.long), do_sample=False).shape == (1, 32)
    docs = " ".join((ROOT / "docs" / "huggingface.md").read_text().split())
    assert "then raises `IndexError: index out of range in self`" in docs
    assert "with no length asks for 256 new tokens (the pipeline's default)" in docs
