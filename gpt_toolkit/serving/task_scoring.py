"""Scoring a model on tasks (gpt_toolkit.data.tasks) the way lm-evaluation-harness does: a multiple-choice item by the
log-likelihood of each choice after its context (acc: the likeliest; acc_norm: the likeliest per character of the
choice), a last-word item (LAMBADA) by whether greedy decoding gives the continuation (acc) and its log-likelihood
(perplexity), a generation item by exact match of its greedy text. Contexts and continuations are split into tokens as
the harness splits them, so the two agree item by item.

Batched, with the shared context scored once: an item's context and all its choices go in one row, each choice
attending to the context and to itself (GPT.forward's layout), instead of one row per choice. A CORE-style summary
centers each task's accuracy on its random baseline, (acc - random) / (1 - random), and averages them."""
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gpt_toolkit.core.errors import UserError
from gpt_toolkit.core.tokenizer import tokenizer_from_meta
from gpt_toolkit.data.tasks import Task, check_task_name, load_task
from gpt_toolkit.serving.sampling import StopAtStrings, TextStream, stop_token_ids

HEADLINE = {"choice": "acc_norm", "last_word": "acc", "generate": "exact_match"}  # what the CORE-style mean centers


@dataclass
class TaskScore:
    name: str
    items: int
    metrics: dict  # acc, acc_norm (choice); acc, perplexity (last_word); exact_match (generate)
    kind: str
    random: float
    cropped: int = 0  # items whose context was cut from the left to fit the model's block_size
    seconds: float = 0.0
    skipped: int = 0  # items with characters a character-level vocabulary does not have (not scored)
    per_item: list = field(default_factory=list, repr=False)  # (log-likelihoods of the choices, or the generation)

    @property
    def headline(self):
        return self.metrics[HEADLINE[self.kind]]

    @property
    def centered(self):
        return (self.headline - self.random) / (1 - self.random)

    def line(self):
        shown = ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items())
        cropped = f" ({self.cropped:,} cropped to fit the context)" if self.cropped else ""
        if self.skipped:
            cropped += f" ({self.skipped:,} skipped: characters outside the model's vocabulary)"
        return (f"{self.name}: {shown} over {self.items:,} items{cropped}; random {self.random:.4f}, centered "
                f"{self.centered:.4f}; {self.seconds:.1f} s")


def core_line(scores):
    mean = sum(s.centered for s in scores) / len(scores)
    return (f"CORE-style: {mean:.4f}, the mean of {len(scores)} centered score(s) ((accuracy - random) / (1 - random); "
            f"acc_norm for multiple choice, acc for last word, exact match for generation)")


def core_score(scores):
    return sum(s.centered for s in scores) / len(scores)


def load_tasks(spec, *, limit=None, cache_dir=None):
    """The Tasks of 'hellaswag,arc_easy,path/to/own.jsonl' (names, or task files), every name checked first."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    for name in names:
        check_task_name(name)
    return [load_task(name, cache_dir=cache_dir, limit=limit) for name in names]


def encode_pair(tokenizer, context, continuation):
    """(context ids, continuation ids) as lm-evaluation-harness makes them: the context's trailing spaces move to the
    continuation, and the continuation's ids are those of the whole text after the context's own ids."""
    spaces = len(context) - len(context.rstrip())
    if spaces and context.rstrip():
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tokenizer.encode(context)
    return ctx, tokenizer.encode(context + continuation)[len(ctx):]


@dataclass
class Row:
    """One row of a batch: a context and its continuations (branches), and where in `out` each branch's score goes."""
    context: list
    branches: list
    slots: list  # (request index, continuation index) of each branch


def rows_of(requests, block_size, shared):
    """The rows that score requests [(context ids, [continuation ids, ...])], and how many requests were cropped.
    Shared: one row per request when context and every continuation fit the block together (positions only: the
    row itself may be longer); else one row per continuation, its context cropped from the left to fit."""
    rows, cropped = [], 0
    for r, (ctx, conts) in enumerate(requests):
        longest = max(len(c) for c in conts)
        if shared and len(ctx) + longest <= block_size:
            rows.append(Row(ctx, conts, [(r, i) for i in range(len(conts))]))
            continue
        cropped += len(ctx) + longest > block_size
        for i, cont in enumerate(conts):
            cont = cont[-(block_size - 1):]  # at least one token of context stays
            rows.append(Row(ctx[-(block_size - len(cont)):], [cont], [(r, i)]))
    return rows, cropped


def layout_of(rows, device):
    """(ids, positions, mask, keep, targets) of a batch of rows, padded: each branch attends to its row's context and
    to itself; keep marks the positions whose logits predict a branch's tokens (the context's last, then each
    branch token but its last), in the order of `targets`."""
    T = max(len(r.context) + sum(len(b) for b in r.branches) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)
    keep = torch.zeros(len(rows), T, dtype=torch.bool)
    wanted, targets = [], []  # per branch: the row-major indices of its predicting positions, its tokens
    for b, row in enumerate(rows):
        L = len(row.context)
        ids[b, :L] = torch.tensor(row.context)
        pos[b, :L] = torch.arange(L)
        seg[b, :L] = 0
        at = L
        for k, branch in enumerate(row.branches, start=1):
            m = len(branch)
            ids[b, at:at + m] = torch.tensor(branch)
            pos[b, at:at + m] = torch.arange(L, L + m)
            seg[b, at:at + m] = k
            predicting = [b * T + L - 1] + [b * T + at + j for j in range(m - 1)]
            keep.view(-1)[predicting] = True
            wanted.append(predicting)
            targets.append(branch)
            at += m
    order = torch.tensor([i for w in wanted for i in w])
    # keep's logits come back in row-major order: each branch's positions, found in that order
    rank = torch.empty(len(rows) * T, dtype=torch.long)
    rank[keep.view(-1).nonzero().squeeze(1)] = torch.arange(int(keep.sum()))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None]))
    return (ids.to(device), pos.to(device), mask[:, None].to(device), keep.to(device), rank[order], targets)


@torch.no_grad()
def score_requests(model, requests, *, device, ctx, batch_size=8, shared=True):
    """[(log-likelihood, greedy?) per continuation] per request, and how many requests were cropped."""
    block_size = model.config.block_size
    rows, cropped = rows_of(requests, block_size, shared)
    rows.sort(key=lambda r: len(r.context) + sum(len(b) for b in r.branches), reverse=True)
    out = [[None] * len(conts) for _, conts in requests]
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        ids, pos, mask, keep, rank, targets = layout_of(batch, device)
        with ctx:
            logits, _ = model(ids, layout=(pos, mask, keep))
        logprobs = F.log_softmax(logits.float(), dim=-1)[rank.to(device)]
        best = logprobs.argmax(dim=-1)
        at = 0
        slots = [slot for row in batch for slot in row.slots]
        for (r, i), tokens in zip(slots, targets):
            t = torch.tensor(tokens, device=device)
            rows_lp = logprobs[at:at + len(tokens)]
            ll = float(rows_lp.gather(1, t[:, None]).sum())
            out[r][i] = (ll, bool((best[at:at + len(tokens)] == t).all()))
            at += len(tokens)
    model.train(was_training)
    return out, cropped


@torch.no_grad()
def generate_greedy(model, tokenizer, item, *, device, ctx, max_tokens):
    """The greedy continuation of item.context, cut at the first of item.until (not included) or an end token."""
    ids = torch.tensor([tokenizer.encode(item.context)], dtype=torch.long, device=device)
    cut, text, stream, stops = StopAtStrings(list(item.until)), [], TextStream(tokenizer), stop_token_ids(tokenizer)
    with ctx:
        for token in model.stream(ids, max_tokens, temperature=0, kv_cache=True, stop_tokens=stops):
            if token.item() in stops:  # <|endoftext|> or a chat's <|end|> ends it, as the server's generation
                break
            text.append(cut.push(stream.push(token.item())))
            if cut.stopped:
                break
    if not cut.stopped:
        text.append(cut.push(stream.end()) + cut.end())
    return "".join(text)


def encodable(tokenizer, task):
    """(the items whose every text the tokenizer encodes, how many it cannot: a character-level vocabulary lacks
    characters of most English text)."""
    kept = []
    for item in task.items:
        try:
            for text in (item.context, *item.choices):
                tokenizer.encode(text)
            kept.append(item)
        except UserError:
            continue
    if not kept:
        raise UserError(f"no item of task '{task.name}' can be written in this model's vocabulary ({tokenizer.kind}, "
                        f"{getattr(tokenizer, 'vocab_size', '?')} tokens): score a model with a GPT-2 or BPE tokenizer")
    return Task(task.name, tuple(kept), task.source), len(task.items) - len(kept)


def score_task(model, tokenizer, task, *, device, ctx, batch_size=8, shared=True, max_tokens=32):
    """The TaskScore of a model on a task (items its vocabulary cannot write are skipped, and counted)."""
    t0 = time.perf_counter()
    task, skipped = encodable(tokenizer, task)
    score = _score(model, tokenizer, task, device=device, ctx=ctx, batch_size=batch_size, shared=shared,
                   max_tokens=max_tokens)
    score.skipped, score.seconds = skipped, time.perf_counter() - t0
    return score


def _score(model, tokenizer, task, *, device, ctx, batch_size, shared, max_tokens):
    t0 = time.perf_counter()
    if task.kind == "generate":
        was_training = model.training
        model.eval()
        texts = [generate_greedy(model, tokenizer, item, device=device, ctx=ctx, max_tokens=max_tokens)
                 for item in task.items]
        model.train(was_training)
        matches = [text == item.target for text, item in zip(texts, task.items)]
        return TaskScore(task.name, len(task.items), {"exact_match": sum(matches) / len(matches)}, task.kind, 0.0,
                         seconds=time.perf_counter() - t0, per_item=texts)
    requests = []
    for item in task.items:
        pairs = [encode_pair(tokenizer, item.context, choice) for choice in item.choices]
        requests.append((pairs[0][0], [cont for _, cont in pairs]))
    scored, cropped = score_requests(model, requests, device=device, ctx=ctx, batch_size=batch_size, shared=shared)
    if task.kind == "choice":
        acc = [max(range(len(s)), key=lambda i: s[i][0]) == item.gold for s, item in zip(scored, task.items)]
        norm = [max(range(len(s)), key=lambda i: s[i][0] / len(item.choices[i])) == item.gold
                for s, item in zip(scored, task.items)]
        metrics = {"acc": sum(acc) / len(acc), "acc_norm": sum(norm) / len(norm)}
    else:
        lls = [s[0][0] for s in scored]
        metrics = {"acc": sum(s[0][1] for s in scored) / len(scored),
                   "perplexity": math.exp(min(-sum(lls) / len(lls), 700))}
    return TaskScore(task.name, len(task.items), metrics, task.kind, task.random_baseline, cropped,
                     time.perf_counter() - t0, per_item=[[ll for ll, _ in s] for s in scored])


class EvalTasks:
    """--eval_tasks: the tasks a training run scores at each evaluation (the first `limit` items of each), with the
    run's tokenizer; each evaluation gives a log line naming their cost, and a metrics record."""

    def __init__(self, spec, limit, meta):
        self.tasks = load_tasks(spec, limit=limit or None)
        self.tokenizer = tokenizer_from_meta(meta)

    def score(self, model, *, device, ctx):
        return [score_task(model, self.tokenizer, task, device=device, ctx=ctx) for task in self.tasks]

    @staticmethod
    def line(step, scores):
        each = ", ".join(f"{s.name} {HEADLINE[s.kind]} {s.headline:.4f} ({s.items} items)" for s in scores)
        return (f"tasks at step {step}: {each}; CORE-style {core_score(scores):.4f} (took "
                f"{sum(s.seconds for s in scores):.1f} s)")

    @staticmethod
    def record(step, scores):
        return {"type": "tasks", "step": step, "core": core_score(scores), "seconds": sum(s.seconds for s in scores),
                "scores": {s.name: {**s.metrics, "centered": s.centered, "items": s.items} for s in scores}}
