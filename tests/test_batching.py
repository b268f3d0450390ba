"""Continuous batching in the server's engine: the jobs in flight share one forward pass per step, each against its
own KV cache row of its own length, and each job's text is what it would be alone (its own seed) and what GPT.stream
gives (greedy: sample.py's)."""
import asyncio
import contextlib

import pytest
import torch

from gpt_toolkit.serving.server import Engine, Job, collect
from model import GPT, GPTConfig


@pytest.fixture(scope="module", params=["plain", "rotary"])
def model(request):
    torch.manual_seed(0)
    options = dict(rotary=True) if request.param == "rotary" else {}
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, dropout=0.0, **options)).eval()


class Chars:
    """A tokenizer of 65 ids, one character each (what the engine decodes with)."""
    itos = [chr(32 + i) for i in range(65)]
    eot_token = None

    def encode(self, text):
        return [self.itos.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)

    def token_bytes(self, token):
        return self.itos[token].encode()


def run_jobs(model, specs, report=None):
    """The texts of jobs (prompt ids, max_tokens, temperature, seed) submitted to one engine at once, and how many
    forward passes the model ran meanwhile (the engine's log lines go to `report`, a list, when given)."""
    calls = []
    hook = model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    engine = Engine(model, Chars(), device="cpu", ctx=contextlib.nullcontext(),
                    report=(lambda line: None) if report is None else report.append)

    async def go():
        loop = asyncio.get_running_loop()
        jobs = [Job(ids=list(ids), max_tokens=n, controls=dict(temperature=t, top_k=None, top_p=1.0, min_p=0.0,
                                                                repetition_penalty=1.0), stops=[],
                    generator=torch.Generator().manual_seed(seed), loop=loop) for ids, n, t, seed in specs]
        for job in jobs:
            engine.submit(job)
        return [await asyncio.wait_for(collect(job), timeout=120) for job in jobs]  # a dead engine fails, not hangs
    try:
        return asyncio.run(go()), calls
    finally:
        engine.stop()
        hook.remove()


def alone(model, ids, n, temperature, seed):
    """What GPT.stream gives for one prompt: sample.py's path."""
    x = torch.tensor([ids])
    tokens = model.stream(x, n, temperature=temperature, generator=torch.Generator().manual_seed(seed))
    return "".join(Chars.itos[int(t)] for t in tokens)


def test_sixteen_jobs_share_each_forward_pass(model):
    specs = [([1 + i % 7] * (1 + i), 20, 0.8, i) for i in range(16)]  # prompts of 1 to 16 tokens
    results, calls = run_jobs(model, specs)
    assert all(end == "length" and len(text) == 20 for text, end in results)
    batched = [shape for shape in calls if shape[1] == 1 and shape[0] > 1]
    assert len(calls) <= 16 + 20 + 16  # each prompt alone, then a step for all (no 16 x 19 single-token passes)
    assert batched and max(shape[0] for shape in batched) == 16, calls


def test_a_jobs_text_is_its_own_alone_or_beside_fifteen_others(model):
    """Seeded draws, greedy ones, prompts of different lengths and contexts that outgrow block_size (32) and are
    rebuilt over their last half block: each text is GPT.stream's for that job alone."""
    specs = [([3 + i % 11] * (2 + 2 * i), 24 + i, 0.0 if i % 4 == 0 else 0.9, 100 + i) for i in range(16)]
    results, _ = run_jobs(model, specs)
    assert [text for text, _ in results] == [alone(model, *spec) for spec in specs]
    one, _ = run_jobs(model, specs[5:6])
    assert one[0][0] == results[5][0]


def test_jobs_join_and_leave_between_steps(model):
    """Short jobs end while long ones go on; later rows move into the places of the ones that left."""
    specs = [([2], 3, 0.9, 1), ([4, 5], 40, 0.9, 2), ([6], 1, 0.0, 3), ([7, 8, 9], 25, 0.9, 4), ([1], 10, 0.9, 5)]
    results, _ = run_jobs(model, specs)
    assert [text for text, _ in results] == [alone(model, *spec) for spec in specs]


def test_a_failed_join_answers_its_job_and_the_engine_serves_on(model, monkeypatch):
    """Growing the batch's cache can run out of memory: that job gets a 500, the thread lives, the next job runs."""
    from gpt_toolkit.serving import batching
    real, calls = batching.Slots.join, []

    def join(self, cache):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(self, cache)
    monkeypatch.setattr(batching.Slots, "join", join)
    results, _ = run_jobs(model, [([1, 2], 10, 0.9, 1), ([3], 10, 0.9, 2)])
    assert results[0][1].status == 500 and "can't allocate memory" in results[0][1].body()["error"]["message"]
    assert results[1] == (alone(model, [3], 10, 0.9, 2), "length")


def test_one_jobs_failed_draw_answers_it_alone_and_the_others_finish_as_alone(model, monkeypatch):
    """A failure in one job's own work (here its draw) answers that job with a 500; the jobs beside it in the same
    steps finish with their own texts, as they would alone."""
    from gpt_toolkit.serving import server
    real, draws = server.draw, []

    def draw(logits, controls, previous, generator):
        if controls["temperature"] == 0.7:  # the one job set up to fail: its first token (at its join) is drawn,
            draws.append(1)  # its fifth (in a batched step, beside the others) is not
            if len(draws) == 5:
                raise RuntimeError("this job's draw broke")
        return real(logits, controls, previous, generator)
    monkeypatch.setattr(server, "draw", draw)
    specs = [([1, 2], 12, 0.9, 1), ([3], 12, 0.7, 2), ([4, 5, 6], 15, 0.0, 3)]
    results, _ = run_jobs(model, specs)
    assert results[1][1].status == 500 and "this job's draw broke" in results[1][1].body()["error"]["message"]
    assert [results[0], results[2]] == [(alone(model, *specs[0]), "length"), (alone(model, *specs[2]), "length")]


def test_one_jobs_failed_rebuild_answers_it_alone_and_the_others_finish_as_alone(model, monkeypatch):
    """A context that fills block_size (32) is rebuilt over its last half block, a prefill of its own that can run out
    of memory: that job gets the 500, and the others, one of them rebuilt later, finish as they would alone."""
    from gpt_toolkit.serving import server
    real, rebuilds = server.prefill, []

    def prefill(model, ids, device):
        if len(ids) == 15:  # a rebuild (block_size // 2 - 1 tokens; no prompt here is 15 long)
            rebuilds.append(1)
            if len(rebuilds) == 1:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(model, ids, device)
    monkeypatch.setattr(server, "prefill", prefill)
    # the first fills its context after 12 steps, the third after 22 (the first rebuild is the first job's); the second
    # is still in flight then (20 tokens) and never rebuilds
    specs = [([2] * 20, 30, 0.9, 1), ([3], 20, 0.9, 2), ([4] * 10, 40, 0.9, 3)]
    log = []
    results, _ = run_jobs(model, specs, report=log)
    assert results[0][1].status == 500 and "can't allocate memory" in results[0][1].body()["error"]["message"]
    assert log == ["generation failed: RuntimeError: DefaultCPUAllocator: can't allocate memory (1 request answered "
                   "with a 500)"]
    assert len(rebuilds) >= 2  # the third job's rebuild ran, and it is still its own text
    assert [results[1], results[2]] == [(alone(model, *specs[1]), "length"), (alone(model, *specs[2]), "length")]


def test_a_failed_rebuild_and_a_failed_draw_in_one_step_answer_those_two_and_no_other(model, monkeypatch):
    """Rows leave twice in one step (a failed rebuild before the shared pass, a failed draw after it): the rows that
    stay keep their own caches, and their texts are still their own."""
    from gpt_toolkit.serving import server
    real_prefill, real_draw, steps = server.prefill, server.draw, []

    def prefill(model, ids, device):
        if len(ids) == 15:  # the first job's rebuild: its context fills block_size (32) at its 13th step
            raise RuntimeError("rebuild broke")
        return real_prefill(model, ids, device)

    def draw(logits, controls, previous, generator):
        if controls["temperature"] == 0.7:
            steps.append(1)
            if len(steps) == 14:  # its join's draw, then its 13th step's: the step of the failed rebuild
                raise RuntimeError("draw broke")
        return real_draw(logits, controls, previous, generator)
    monkeypatch.setattr(server, "prefill", prefill)
    monkeypatch.setattr(server, "draw", draw)
    specs = [([2] * 20, 30, 0.9, 1), ([3], 20, 0.9, 2), ([5], 20, 0.7, 3), ([6, 7], 20, 0.0, 4)]
    results, _ = run_jobs(model, specs)
    assert [results[0][1].body()["error"]["message"], results[2][1].body()["error"]["message"]] == [
        "generation failed: RuntimeError: rebuild broke", "generation failed: RuntimeError: draw broke"]
    assert [results[1], results[3]] == [(alone(model, *specs[1]), "length"), (alone(model, *specs[3]), "length")]


def test_a_failed_shared_pass_answers_its_jobs_and_the_engine_serves_on(model, monkeypatch):
    """The one forward pass for all fails (memory): each of its jobs gets the 500, one line says so, and the next jobs
    run as they would alone."""
    real, passes = GPT.forward, []

    def forward(self, idx, *args, **kwargs):
        if idx.shape == (2, 1):  # a step of the first two jobs together
            passes.append(1)
            if len(passes) == 3:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(self, idx, *args, **kwargs)
    monkeypatch.setattr(GPT, "forward", forward)
    log = []
    results, _ = run_jobs(model, [([1, 2], 10, 0.9, 1), ([3], 10, 0.9, 2)], report=log)
    assert all(end.status == 500 and "can't allocate memory" in end.message for _, end in results)
    assert log == ["generation failed: RuntimeError: DefaultCPUAllocator: can't allocate memory (2 requests "
                   "answered with a 500)"]
    later, _ = run_jobs(model, [([4], 10, 0.9, 3)])
    assert later == [(alone(model, [4], 10, 0.9, 3), "length")]


def test_a_failure_in_the_rows_bookkeeping_answers_the_jobs_in_flight_and_the_engine_thread_lives(model, monkeypatch):
    """Outside any one job's work (a row that cannot move when another leaves): the jobs in flight get the 500; the
    thread does not die with them (every later request would wait forever)."""
    from gpt_toolkit.serving import batching
    real, leaves = batching.Slots.leave, []

    def leave(self, row):
        leaves.append(1)
        if len(leaves) == 1:
            raise RuntimeError("a row could not move")
        return real(self, row)
    monkeypatch.setattr(batching.Slots, "leave", leave)
    log = []
    results, _ = run_jobs(model, [([1], 3, 0.9, 1), ([2], 10, 0.9, 2)], report=log)  # the first ends first and leaves
    assert results[0] == (alone(model, [1], 3, 0.9, 1), "length")  # its answer was out: it keeps it
    assert results[1][1].message == "generation failed: RuntimeError: a row could not move"
    assert log == ["generation failed: RuntimeError: a row could not move (1 request answered with a 500)"]
    later, _ = run_jobs(model, [([4], 10, 0.9, 3)])
    assert later == [(alone(model, [4], 10, 0.9, 3), "length")]
