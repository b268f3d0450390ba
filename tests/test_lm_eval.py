"""lm-evaluation-harness itself against our server (tools/serve.py): its local-completions model scores the local tasks
of tests/data/lm_eval (multiple choice, last word, generation) through /v1/completions (echo, logprobs, token-id
prompts) and the tokenizer endpoints, and gets the native evaluator's scores item by item; the logprobs are
transformers' on the model's Hugging Face export."""
import contextlib
import glob
import json
import os
import subprocess
import sys
import urllib.request

import pytest
import torch
from conftest import ROOT, TINY_TRAIN, run_script
from test_serve import Server

from gpt_toolkit.data.tasks import read_task_file
from gpt_toolkit.models.source import ModelSource, load_model
from gpt_toolkit.serving.task_scoring import score_task

pytestmark = pytest.mark.slow  # a server, and lm_eval in a process of its own
lm_eval = pytest.importorskip("lm_eval")
TASKS = ROOT / "tests" / "data" / "tasks"
BLOCK = 64


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_eval") / "run"
    r = run_script("train.py", *TINY_TRAIN, f"--block_size={BLOCK}", "--max_iters=300", "--lr_decay_iters=300",
                   "--eval_interval=100", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def server(run):
    s = Server(f"--out_dir={run}", "--dtype=float32", "--model_name=toolkit")
    yield s
    s.stop()


def test_lm_eval_through_the_server_scores_what_the_native_evaluator_scores(run, server, tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf"))
    # max_length = block_size + 1: the harness keeps max_length - 1 tokens of context and continuation, as we do
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                        f"base_url={server.url}/v1/completions,model=toolkit,max_length={BLOCK + 1}",
                        "--tasks", "toolkit_mc,toolkit_words,toolkit_gen", "--include_path", "tests/data/lm_eval",
                        "--output_path", str(out), "--log_samples"], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Using remote tokenizer backend" in r.stderr  # it tokenizes through /tokenizer_info and /tokenize
    results = json.loads(open(glob.glob(str(out / "toolkit" / "results_*.json"))[0], encoding="utf-8").read())["results"]
    model, tokenizer = load_model(ModelSource.run(str(run)), "cpu", checkpoint="ckpt.pt")
    for name, theirs in (("mc", "toolkit_mc"), ("words", "toolkit_words"), ("gen", "toolkit_gen")):
        native = score_task(model.float(), tokenizer, read_task_file(TASKS / f"shakespeare_{name}.jsonl"), device="cpu",
                            ctx=contextlib.nullcontext())
        found = glob.glob(str(out / "toolkit" / f"samples_{theirs}_*.jsonl"))[0]
        with open(found, encoding="utf-8") as f:
            samples = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
        if name == "gen":
            assert [s["filtered_resps"][0] for s in samples] == native.per_item  # the very same greedy texts
            assert results[theirs]["exact_match,none"] == native.metrics["exact_match"]
            continue
        for metric in native.metrics:
            if metric == "perplexity":
                assert results[theirs]["perplexity,none"] == pytest.approx(native.metrics[metric], rel=1e-4)
            else:
                assert results[theirs][f"{metric},none"] == native.metrics[metric], metric
        lls = [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]
        assert lls == [pytest.approx(item, abs=1e-4) for item in native.per_item]
    assert 0.25 < results["toolkit_mc"]["acc,none"] <= 1 and results["toolkit_words"]["acc,none"] > 0  # it learned


def test_echoed_logprobs_are_transformers_on_the_hf_export(run, server, tmp_path):
    transformers = pytest.importorskip("transformers")
    r = run_script("tools/export_hf.py", f"--out_dir={run}", f"--to={tmp_path / 'hf'}")
    assert r.returncode == 0, r.stderr
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = server.post("/tokenize", json.dumps({"prompt": "ROMEO:\nWhat light through yonder"}).encode())[1]["tokens"]
    status, body = server.post("/v1/completions", json.dumps({"prompt": ids, "max_tokens": 0, "echo": True,
                                                             "logprobs": 3}).encode())
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["text"] == "ROMEO:\nWhat light through yonder" and choice["finish_reason"] == "length"
    scores = choice["logprobs"]
    assert scores["tokens"] == list("ROMEO:\nWhat light through yonder") and scores["text_offset"] == list(range(len(ids)))
    with torch.no_grad():
        theirs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert scores["token_logprobs"][0] is None and scores["top_logprobs"][0] is None
    assert scores["token_logprobs"][1:] == pytest.approx([float(theirs[i, t]) for i, t in enumerate(ids[1:])], abs=1e-4)
    top = theirs[len(ids) - 2].topk(3)
    decode = server.post("/detokenize", json.dumps({"tokens": top.indices.tolist()}).encode())[1]["prompt"]
    assert list(scores["top_logprobs"][-1]) == list(decode)
    assert list(scores["top_logprobs"][-1].values()) == pytest.approx(top.values.tolist(), abs=1e-4)


def test_scoring_requests_are_checked(server):
    for fields, param in (({"logprobs": 6}, "logprobs"), ({"logprobs": 1, "stream": True}, "logprobs"),
                          ({"prompt": [[70]]}, "prompt"), ({"prompt": [1.5]}, "prompt"), ({"prompt": "x" * 70,
                                                                                             "logprobs": 0}, "logprobs"),
                          ({"max_tokens": 0}, "max_tokens"), ({"echo": "yes"}, "echo")):
        status, body = server.post("/v1/completions", json.dumps({"prompt": "ROMEO:", **fields}).encode())
        assert status == 400 and body["error"]["param"] == param, (fields, body)
    status, body = server.post("/v1/completions", json.dumps({"prompt": [[20, 21], [22]], "max_tokens": 2, "n": 2,
                                                             "temperature": 0, "echo": True}).encode())
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][0]["text"].startswith("HI") and body["choices"][2]["text"].startswith("J")
    assert body["usage"]["prompt_tokens"] == 3
    status, body = server.post("/v1/completions", json.dumps({"prompt": [20], "max_tokens": 0, "echo": True,
                                                             "logprobs": 1}).encode())  # one token: nothing to predict
    assert status == 200 and body["choices"][0]["logprobs"]["token_logprobs"] == [None], body
    info = json.loads(urllib.request.urlopen(f"{server.url}/tokenizer_info").read())
    assert info["model_max_length"] == BLOCK and "eos_token" in info
