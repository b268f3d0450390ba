"""Standard-task evaluation, natively (tools/evaluate.py --tasks / --task_file): the shared-context scoring equals a
plain forward per choice, task files and downloads become the items lm-evaluation-harness builds, bad input is one
line. The harness itself, through the server, is in test_lm_eval.py."""
import contextlib
import http.server
import json
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_TRAIN, assert_one_line_error, run_script

from gpt_toolkit.core.errors import UserError
from gpt_toolkit.data import tasks
from gpt_toolkit.data.tasks import Item, Task, load_task, read_task_file
from gpt_toolkit.models.source import ModelSource, load_model
from gpt_toolkit.serving.task_scoring import TaskScore, core_score, encode_pair, score_requests, score_task

TASKS = ROOT / "tests" / "data" / "tasks"
NULL = contextlib.nullcontext()


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks") / "run"
    r = run_script("train.py", *TINY_TRAIN, "--block_size=48", "--max_iters=100", "--lr_decay_iters=100", "--dtype=float32",
                   f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    model, tokenizer = load_model(ModelSource.run(str(out)), "cpu", checkpoint="ckpt.pt")
    return out, model.float(), tokenizer


def plain(model, context, continuation):
    """(log-likelihood, greedy?) of continuation after context from one ordinary forward (its last block_size tokens)."""
    ids = (context + continuation)[-model.config.block_size:]
    x = torch.tensor([ids])
    logits, _ = model(x, x)
    logprobs = F.log_softmax(logits[0].float(), dim=-1)
    n, T = len(continuation), len(ids)
    rows = logprobs[T - n - 1:T - 1]
    target = torch.tensor(continuation)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(1) == target).all())


def test_the_shared_context_scores_what_a_forward_per_choice_scores(trained):
    _, model, tok = trained
    task = read_task_file(TASKS / "shakespeare_mc.jsonl")  # some contexts and choices longer than block 48
    requests = []
    for item in task.items:
        pairs = [encode_pair(tok, item.context, c) for c in item.choices]
        requests.append((pairs[0][0], [cont for _, cont in pairs]))
    shared, cropped = score_requests(model, requests, device="cpu", ctx=NULL, batch_size=3, shared=True)
    single, _ = score_requests(model, requests, device="cpu", ctx=NULL, batch_size=5, shared=False)
    assert 0 < cropped < len(requests)  # both paths ran: rows shared, and items cropped to fit
    for (ctx, conts), a, b in zip(requests, shared, single):
        for cont, (ll_a, greedy_a), (ll_b, greedy_b) in zip(conts, a, b):
            ll, greedy = plain(model, ctx, cont)
            assert ll == pytest.approx(ll_a, abs=1e-4) and ll == pytest.approx(ll_b, abs=1e-4)
            assert greedy == greedy_a == greedy_b


def test_encode_pair_moves_the_contexts_trailing_spaces_to_the_continuation(trained):
    _, _, tok = trained
    assert encode_pair(tok, "ROMEO: ", "Ay") == (tok.encode("ROMEO:"), tok.encode(" Ay"))


def test_metrics_and_the_core_style_centering(trained):
    _, model, tok = trained
    sure = Task("t", (Item("choice", "ROMEO:", (" a", " b"), 0), Item("choice", "JULIET:", (" c", " d", " e", " f"), 3)))
    score = score_task(model, tok, sure, device="cpu", ctx=NULL)
    assert score.random == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert set(score.metrics) == {"acc", "acc_norm"} and score.items == 2
    assert score.centered == pytest.approx((score.metrics["acc_norm"] - 0.375) / 0.625)
    fake = [TaskScore("a", 10, {"acc_norm": 0.5}, "choice", 0.25), TaskScore("b", 10, {"acc": 0.1}, "last_word", 0.0)]
    assert core_score(fake) == pytest.approx(((0.5 - 0.25) / 0.75 + 0.1) / 2)


def test_evaluate_prints_each_task_and_the_core_style_line(trained):
    out, _, _ = trained
    r = run_script("tools/evaluate.py", f"--out_dir={out}", f"--task_file={TASKS / 'shakespeare_mc.jsonl'}",
                   f"--task_file={TASKS / 'shakespeare_words.jsonl'}", f"--task_file={TASKS / 'shakespeare_gen.jsonl'}",
                   "--dtype=float32")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("shakespeare_mc: acc ") and ", acc_norm " in lines[0] and "over 16 items (" in lines[0]
    assert "cropped to fit the context" in lines[0]
    assert lines[1].startswith("shakespeare_words: acc ") and ", perplexity " in lines[1]
    assert lines[2].startswith("shakespeare_gen: exact_match ")
    assert lines[3].startswith("CORE-style: ") and "the mean of 3 centered score(s)" in lines[3]
    unshared = run_script("tools/evaluate.py", f"--init_from={out}", f"--task_file={TASKS / 'shakespeare_mc.jsonl'}",
                          "--dtype=float32", "--shared_context=False")  # a run's directory as init_from, as train.py
    assert unshared.stdout.split(";")[0] == lines[0].split(";")[0]  # the same accuracies either way


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2: not JSON"),
    ('{"context": "", "choices": [" a", " b"], "gold": 0}', 'line 2: an item needs a non-empty "context"'),
    ('{"context": "x", "choices": [" a"], "gold": 0}', '"choices" must be a list of at least two'),
    ('{"context": "x", "choices": [" a", " b"], "gold": 2}', '"gold" must be the index of the right choice (0 to 1)'),
    ('{"context": "x", "continuation": " y"}', "mixes kinds of items (choice, last_word)"),
    ('{"context": "x"}', 'an item has "choices" and "gold"')])
def test_a_bad_task_file_is_one_line_with_its_line_number(trained, tmp_path, line, message):
    out, _, _ = trained
    path = tmp_path / "mine.jsonl"
    path.write_text('{"context": "ROMEO:", "choices": [" a", " b"], "gold": 1}\n' + line + "\n")
    r = run_script("tools/evaluate.py", f"--out_dir={out}", f"--task_file={path}")
    assert_one_line_error(r, str(path), message)


def test_an_unknown_task_lists_the_known_ones_and_an_undownloadable_one_says_how_to_work_offline(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown task 'hellaswagg': the known tasks are hellaswag, arc_easy, piqa, lambada"):
        load_task("hellaswagg", cache_dir=tmp_path)
    monkeypatch.setitem(tasks.SOURCES, "piqa", tasks.Source({"valid.jsonl": "http://127.0.0.1:9/valid.jsonl"},
                                                            tasks.piqa_items, "validation"))
    with pytest.raises(UserError, match=r"task 'piqa' could not be downloaded from 127.0.0.1:9 .*offline, put its file "
                                        r"at .*piqa.jsonl, or give a task file"):
        load_task("piqa", cache_dir=tmp_path)
    assert not list(tmp_path.iterdir())


RAW = {  # a few items of each source, as its server sends them
    "/hellaswag_val.jsonl": json.dumps({"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over "
                                        "the snow covering the window of a car, and a woman wearing winter clothes "
                                        "smiles.", "ctx_b": "then", "endings": [", the man adds wax to the windshield "
                                        "and cuts it.", ", a person board a ski lift, while two men supporting the "
                                        "head of the person wearing winter clothes snow as the we girls sled.",
                                        ", the man puts on a christmas coat, knitted with netting.", ", the man "
                                        "continues removing the snow on his car."], "label": 3}) + "\n" + json.dumps(
        {"activity_label": "Baking cookies", "ctx_a": "[header] How to bake [title] Preheat the oven.", "ctx_b": "",
         "endings": ["[step] Mix it.", "Eat  it.", "Go.", "Stop."], "label": "0"}) + "\n",
    "/valid.jsonl": json.dumps({"goal": "How do I ready a guinea pig cage for it's new occupants?", "sol1": "Provide "
                                "the guinea pig with a cage full of a few inches of bedding made of ripped paper "
                                "strips, you will also need to supply it with a water bottle and a food dish.",
                                "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of "
                                "ripped jeans material."}) + "\n",
    "/valid-labels.lst": "0\n",
    "/lambada_test.jsonl": json.dumps({"text": "In my palm is a clear stone, and inside it is a small ivory statuette."
                                               " A guardian angel. \"Figured if you're going to be out at night "
                                               "getting hit by cars, you might as well have a guardian angel\""}) + "\n",
    "/rows": json.dumps({"num_rows_total": 1, "rows": [{"row": {"question": "Which is a mammal?", "choices": {
        "text": ["shark", "whale", "trout"], "label": ["A", "B", "C"]}, "answerKey": "B"}}]}),
}


@pytest.fixture
def task_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = RAW.get(self.path.split("?")[0])
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write((body or "").encode())

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_downloads_become_the_prompts_lm_eval_builds_and_are_read_from_the_cache_after(task_server, tmp_path,
                                                                                       monkeypatch):
    for name, source in list(tasks.SOURCES.items()):
        files = {f: task_server + ("/rows?x=1" if f == "rows" else "/" + f) for f in source.files}
        monkeypatch.setitem(tasks.SOURCES, name, tasks.Source(files, source.read, source.what))
    hellaswag = load_task("hellaswag", cache_dir=tmp_path)
    assert hellaswag.items[0].context == ("Removing ice from car: Then, the man writes over the snow covering the window "
                                          "of a car, and a woman wearing winter clothes smiles. Then")
    assert hellaswag.items[0].choices[3] == " , the man continues removing the snow on his car." and hellaswag.items[0].gold == 3
    assert hellaswag.items[1].context == "Baking cookies: How to bake. Preheat the oven."  # lm-eval's clean-up, and
    assert hellaswag.items[1].choices[:2] == ("  Mix it.", " Eat it.")  # its " " before each (a tag leaves a space)
    piqa = load_task("piqa", cache_dir=tmp_path).items[0]
    assert piqa.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:" and piqa.gold == 0
    lambada = load_task("lambada", cache_dir=tmp_path).items[0]
    assert lambada.kind == "last_word" and lambada.choices == (" angel\"",) and lambada.context.endswith("a guardian")
    arc = load_task("arc_easy", cache_dir=tmp_path).items[0]
    assert arc.context == "Question: Which is a mammal?\nAnswer:" and arc.choices == (" shark", " whale", " trout")
    assert arc.gold == 1 and load_task("arc_easy", cache_dir=tmp_path).random_baseline == pytest.approx(1 / 3)
    monkeypatch.setattr(tasks, "_fetch", lambda url: pytest.fail("read from the cache, never downloaded again"))
    assert load_task("hellaswag", cache_dir=tmp_path, limit=1).items == hellaswag.items[:1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arc_easy.jsonl", "hellaswag.jsonl", "lambada.jsonl", "piqa.jsonl"]


# ----------------------------------------------------------------------------- during training

def test_eval_tasks_scores_at_each_evaluation_and_leaves_the_losses_as_they_were(data_dir, tmp_path):
    from gpt_toolkit.training.runlog import read_run
    args = [*TINY_TRAIN, "--max_iters=40", "--eval_interval=20", "--dtype=float32", f"--data_dir={data_dir}"]
    plain_run = run_script("train.py", *args, f"--out_dir={tmp_path / 'plain'}")
    tasked = run_script("train.py", *args, f"--out_dir={tmp_path / 'tasked'}", "--eval_tasks_limit=10",
                        f"--eval_tasks={TASKS / 'shakespeare_mc.jsonl'},{TASKS / 'shakespeare_words.jsonl'}")
    assert plain_run.returncode == 0 and tasked.returncode == 0, tasked.stderr
    losses = lambda r: [line.split(", time")[0] for line in r.stdout.splitlines() if line.startswith(("step ", "iter "))]
    assert losses(tasked) == losses(plain_run)  # scoring draws nothing at random and leaves the model as it was
    lines = [line for line in tasked.stdout.splitlines() if line.startswith("tasks at step ")]
    assert [line.split(":")[0] for line in lines] == ["tasks at step 0", "tasks at step 20", "tasks at step 40"]
    assert "shakespeare_mc acc_norm " in lines[0] and "(10 items)" in lines[0] and "; CORE-style " in lines[0]
    assert lines[0].endswith(" s)") and "(took " in lines[0]  # its cost, named
    run = read_run(tmp_path / "tasked")
    assert sorted(run.core) == [0, 20, 40] and set(run.tasks[40]) == {"shakespeare_mc", "shakespeare_words"}
    assert run.tasks[40]["shakespeare_mc"]["items"] == 10 and "centered" in run.tasks[40]["shakespeare_words"]
    r = run_script("tools/plot_loss.py", tmp_path / "tasked", "-o", tmp_path / "curve.png")
    assert r.returncode == 0 and (tmp_path / "curve.png").stat().st_size > 10_000
    (tmp_path / "exps").mkdir()
    for name in ("plain", "tasked"):
        (tmp_path / "exps" / name).symlink_to(tmp_path / name)
    r = run_script("tools/report.py", tmp_path / "exps", "--samples=False", "--whole_split=False")
    report = (tmp_path / "exps" / "REPORT.md").read_text()
    assert r.returncode == 0 and "## Tasks (--eval_tasks)" in report
    assert "| run | step | shakespeare_mc | shakespeare_words | CORE-style |" in report and "| tasked | 40 | " in report


def test_an_unknown_eval_task_is_refused_before_anything_is_written(data_dir, tmp_path):
    r = run_script("train.py", *TINY_TRAIN, "--eval_tasks=piqa,mmlu", f"--data_dir={data_dir}",
                   f"--out_dir={tmp_path / 'out'}")
    assert_one_line_error(r, "unknown task 'mmlu': the known tasks are hellaswag, arc_easy, piqa, lambada")
    assert not (tmp_path / "out").exists()
    r = run_script("train.py", *TINY_TRAIN, "--eval_tasks=piqa", "--parallel=fsdp", f"--data_dir={data_dir}",
                   f"--out_dir={tmp_path / 'out'}")
    assert_one_line_error(r, "eval_tasks scores the whole model on rank 0, and parallel=fsdp shards it")
