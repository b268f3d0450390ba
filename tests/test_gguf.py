"""GGUF export, checked by llama.cpp itself (llama-cpp-python: requirements-gguf.txt, an opt-in install that compiles
llama.cpp; .ci/run installs it, and the llama.cpp tests skip without it, naming the command): its token ids for a
text are ours, its logits for a prompt ours within the dtype's tolerance, its greedy continuation sample.py's at
--temperature=0, for a character vocabulary, GPT-2's, an own BPE and a chat model; bad input is one line and leaves no
file behind."""
import os
import re
import resource
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_TRAIN, assert_one_line_error, build_dataset, run_script

from gpt_toolkit.data.preparing import TextSource, TokenizerChoice, prepare_dataset
from gpt_toolkit.models.checkpoint import load_checkpoint, save_weights
from gpt_toolkit.models.gguf_export import gguf_vocabulary, rwkv_escaped
from gpt_toolkit.models.source import model_from_checkpoint, tokenizer_for_checkpoint
from model import GPT, GPTConfig

try:  # llama.cpp itself: opt-in, as it is compiled from source (decided here, so a skipped test trains nothing)
    import llama_cpp
except ImportError:
    llama_cpp = None

# the models train in the precision dtype=auto picks; llama.cpp loads and runs them (slow: a few seconds a test)
pytestmark = [pytest.mark.precision, pytest.mark.slow]
PROMPT = "ROMEO:\nWhat light"  # with the 12 tokens generated, inside the block of 32
TOLERANCE = {"f32": 1e-2, "f16": 3e-2, "q8_0": 0.3}  # max |logit difference|: llama.cpp's GELU is the tanh form
NO_LLAMA_CPP = ("needs llama.cpp's Python binding (llama_cpp): pip install -r requirements-gguf.txt (it compiles "
                "llama.cpp from source: a C++ compiler and 8 CPU-minutes, once; .ci/run installs it)")
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason=NO_LLAMA_CPP)


def train(data_dir, out, *extra):
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=100", "--lr_decay_iters=100", "--eval_interval=50",
                   f"--data_dir={data_dir}", f"--out_dir={out}", *extra)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def runs(data_dir, shakespeare_text, tmp_path_factory):
    """Trained tiny models with each kind of tokenizer."""
    root = tmp_path_factory.mktemp("gguf")
    build_dataset(shakespeare_text[:100_000], root / "data" / "sp_gpt2", "gpt2")
    prepare_source = root / "bpe.txt"
    prepare_source.write_text(shakespeare_text[:100_000], encoding="utf-8")
    prepare_dataset(TextSource(prepare_source), root / "data" / "sp_bpe", TokenizerChoice("bpe", vocab_size=512), progress=False)
    return {"char": train(data_dir, root / "char"),
            "gpt2": train(root / "data", root / "gpt2", "--dataset=sp_gpt2", "--max_iters=30"),
            "bpe": train(root / "data", root / "bpe", "--dataset=sp_bpe", "--max_iters=60")}


def export(run, to, *extra):
    r = run_script("tools/export_gguf.py", f"--out_dir={run}", f"--to={to}", *extra)
    assert r.returncode == 0 and f"to {to}" in r.stdout, r.stderr
    return to


def ours(run):
    ckpt = load_checkpoint(run / "ckpt.pt")
    return model_from_checkpoint(ckpt).eval(), tokenizer_for_checkpoint(ckpt)


def test_the_file_holds_gpt2s_tensors_and_our_vocabulary(runs, tmp_path):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(export(runs["gpt2"], tmp_path / "m.gguf", "--dtype=f32"))
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "gpt2" and field("gpt2.block_count") == 2
    assert (field("gpt2.context_length"), field("gpt2.embedding_length"), field("gpt2.attention.head_count")) == (32, 32, 2)
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 2 * 12 + 2
    assert tensors["token_embd.weight"].shape.tolist() == [32, 50257]  # nanoGPT's 50,304 rows cut to the vocabulary
    assert tensors["blk.0.attn_qkv.weight"].shape.tolist() == [32, 96] and "blk.1.ffn_down.bias" in tensors
    assert len(field("tokenizer.ggml.tokens")) == 50257 and field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.eos_token_id") == 50256 and len(field("tokenizer.ggml.merges")) == 50000
    # a transformers directory exports to the same file as the run it came from
    r = run_script("tools/export_hf.py", f"--out_dir={runs['char']}", f"--to={tmp_path / 'hf'}")
    assert r.returncode == 0, r.stderr
    direct, via_hf = (gguf.GGUFReader(export(d, tmp_path / f"{n}.gguf", "--dtype=f32")).tensors
                      for n, d in (("direct", runs["char"]), ("via_hf", tmp_path / "hf")))
    assert [t.name for t in direct] == [t.name for t in via_hf]
    assert all(np.allclose(a.data, b.data, atol=1e-6) for a, b in zip(direct, via_hf))
    model, tokenizer = ours(runs["char"])
    kind, tokens, types, merges, specials = gguf_vocabulary(tokenizer)
    assert kind == "rwkv" and tokens == [rwkv_escaped(c) for c in tokenizer.itos] and not merges and not specials
    assert rwkv_escaped("\n") == "\\n" and rwkv_escaped("\\") == "\\\\"


@pytest.mark.parametrize("kind,dtype", [("char", "f32"), ("char", "f16"), ("gpt2", "f32"), ("bpe", "f16"),
                                        ("char", "q8_0")])
@needs_llama_cpp
def test_llama_cpp_reads_our_ids_logits_and_greedy_text(runs, tmp_path, kind, dtype):
    path = export(runs[kind], tmp_path / f"{kind}.gguf", f"--dtype={dtype}")
    model, tokenizer = ours(runs[kind])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, logits_all=True, n_threads=1, verbose=False)
    ids = tokenizer.encode(PROMPT)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=True) == ids
    assert llm.detokenize(ids).decode() == PROMPT
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)])
    with torch.no_grad():
        expected = model(torch.tensor([ids]), torch.tensor([ids]))[0][0].numpy()
    assert theirs.shape == (len(ids), tokenizer.vocab_size)
    diff = np.abs(theirs - expected[:, :tokenizer.vocab_size]).max()
    assert diff < TOLERANCE[dtype], diff
    if dtype == "q8_0":
        return  # 8-bit weights: close, not the same greedy path
    llm.reset()
    out = llm.create_completion(PROMPT, max_tokens=12, temperature=0.0, repeat_penalty=1.0, top_k=1)["choices"][0]["text"]
    r = run_script("sample.py", f"--out_dir={runs[kind]}", f"--start={PROMPT}", "--temperature=0", "--num_samples=1",
                   "--max_new_tokens=12", "--dtype=float32", "--stop_at_eot=False")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(PROMPT + out), (r.stdout, out)


@needs_llama_cpp
def test_a_chat_models_tokens_and_template_travel(runs, tmp_path):
    from test_chat import write_jsonl
    short = [{"prompt": f"Art thou {name}?", "completion": "Ay."} for name in ("Kate", "Romeo", "Puck", "Lear") * 10]
    r = run_script("data/prepare_chat.py", f"--input={write_jsonl(tmp_path / 'c.jsonl', short)}", "--name=c",
                   f"--tokenizer_from={runs['char']}", f"--data_dir={tmp_path}", "--block_size=32")
    assert r.returncode == 0, r.stderr
    chat = train(tmp_path, tmp_path / "chat", "--dataset=c", f"--init_from={runs['char']}", "--max_iters=10")
    path = tmp_path / "chat.gguf"
    r = run_script("tools/export_gguf.py", f"--out_dir={chat}", f"--to={path}", "--dtype=f32", subprocess_only=True)
    assert r.returncode == 0 and "Duplicated key" not in r.stderr, r.stderr  # eos is set once (it used to be twice)
    gguf = pytest.importorskip("gguf")
    fields = gguf.GGUFReader(path).fields
    assert "<|end|>" in fields["tokenizer.chat_template"].contents()
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 69
    _, tokenizer = ours(chat)
    text = "<|user|>Who art thou?<|end|><|assistant|>"
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_threads=1, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text)


def test_bad_exports_are_one_line_and_leave_nothing(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run_script("tools/export_gguf.py", f"--out_dir={tmp_path / 'empty'}", f"--to={tmp_path / 'a.gguf'}"),
                          "no checkpoint at", "train one first")
    (tmp_path / "b.gguf").write_text("mine")
    assert_one_line_error(run_script("tools/export_gguf.py", f"--out_dir={runs['char']}", f"--to={tmp_path / 'b.gguf'}"),
                          "already exists", "nothing is overwritten")
    assert (tmp_path / "b.gguf").read_text() == "mine"
    ckpt, wide = load_checkpoint(runs["char"] / "ckpt.pt"), tmp_path / "wide"
    args = {**ckpt["model_args"], "n_embd": 48}
    wide.mkdir()
    save_weights(wide / "ckpt.pt", GPT(GPTConfig(**args)).state_dict(), model_args=args, meta=ckpt["meta"],
                 config=ckpt["config"])
    assert_one_line_error(run_script("tools/export_gguf.py", f"--out_dir={wide}", f"--to={tmp_path / 'w.gguf'}",
                                     "--dtype=q8_0"), "n_embd=48 is not a multiple of 32", "--dtype=f16")

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "export_gguf.py"), f"--out_dir={runs['gpt2']}",
                        f"--to={tmp_path / 'c.gguf'}"], capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert_one_line_error(r, f"could not write {tmp_path / 'c.gguf'}", "nothing was left behind")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gguf", "empty", "wide"]


def test_without_llama_cpp_its_tests_skip_and_bench_gguf_stop_naming_the_install(tmp_path):
    (tmp_path / "llama_cpp.py").write_text("raise ImportError('llama_cpp is not installed here')\n")  # shadows a real one
    env = {"PYTHONPATH": str(tmp_path), "COLUMNS": "300"}
    tests = [f"tests/test_gguf.py::{t.__name__}" for t in (test_llama_cpp_reads_our_ids_logits_and_greedy_text,
                                                             test_a_chat_models_tokens_and_template_travel)]
    r = subprocess.run([sys.executable, "-m", "pytest", *tests, "-n0", "-p", "no:cacheprovider", "-rs", "-q"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert r.returncode == 0 and "6 skipped" in r.stdout and "passed" not in r.stdout, r.stdout + r.stderr
    assert r.stdout.count(NO_LLAMA_CPP) == 2, r.stdout  # the summary's two lines: the parametrized test's, the chat test's
    assert "pip install -r requirements-gguf.txt" in NO_LLAMA_CPP
    assert_one_line_error(run_script("tools/bench_gguf.py", f"--out_dir={tmp_path / 'none'}", env=env),
                          "tools/bench_gguf.py needs llama.cpp", "pip install -r requirements-gguf.txt", "C++ compiler")


def requirements(name):
    """The package names a requirements file installs, through its -r includes."""
    names = []
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names += requirements(line[3:].strip())
        elif line:
            names.append(re.split(r"[\[=<>~ ]", line)[0].lower())
    return names


def test_the_test_install_compiles_nothing_and_ci_keeps_the_llama_cpp_check():
    assert {"pytest", "gguf", "torch"} <= set(requirements("requirements-dev.txt"))
    assert "llama-cpp-python" not in requirements("requirements-dev.txt")  # PyPI has its source only: 8 CPU-minutes of C++
    assert (ROOT / "requirements-gguf.txt").read_text(encoding="utf-8").count("\nllama-cpp-python==0.3.36") == 1
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "-r requirements-gguf.txt" in ci and 'python -c "import llama_cpp"' in ci  # a failed install fails CI
