"""An OpenAI-compatible server for a trained model (tools/serve.py): GET /v1/models, POST /v1/completions and
/v1/chat/completions (with stream=true as server-sent events), OpenAI's error shape, and a chat page at /.

Generation runs on one worker thread (Engine), off the event loop, with continuous batching: every request in flight
gets its next token from one forward pass for all of them (batching.Slots), requests joining and leaving between
steps, and /v1/models answers during a long one. Each request draws from its own torch.Generator (seeded by its
`seed`, else at random): a request's text depends on its seed only, whatever runs beside it. Its prompt, the KV cache
and the controls are sample.py's (model.stream's), so greedy text over the API is sample.py --temperature=0's."""
import asyncio
import contextlib
import difflib
import json
import math
import queue
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpt_toolkit.core import system
from gpt_toolkit.core.tokenizer import CHAT_TEMPLATE
from gpt_toolkit.serving.batching import Slots, draw, prefill
from gpt_toolkit.serving.sampling import StopAtStrings, TextStream, fit_history, stop_token_ids
from model import check_sampling

PAGE = Path(__file__).resolve().parent / "chat_page.html"
MAX_STOPS = 4  # OpenAI's limit on `stop`


class RequestError(Exception):
    """A request the API refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status, message, *, param=None, code=None, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self):
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


STOPPING = RequestError(503, "the server is stopping: this generation was cut short", kind="server_error",
                        code="server_stopping")


@dataclass
class Limits:
    """What one request may carry and cost: max_tokens, n, the body's bytes, a chat's messages, the characters of its
    prompt or messages together, and the seconds its headers and body may take to arrive."""
    max_tokens: int = 2048
    n: int = 8
    body_bytes: int = 1 << 20
    messages: int = 2048
    chars: int = 256 * 1024
    read_seconds: float = 30.0
    prompts: int = 64  # prompts in one /v1/completions request (lm-eval sends a batch of them)


@dataclass
class Job:
    """One choice of one request, as the engine generates it: the prompt ids, the controls, its own generator, where
    its text goes (events, on the request's event loop: (text, None) pieces, then (None, the finish reason or a
    RequestError)), and whether its client has gone."""
    ids: list
    max_tokens: int
    controls: dict
    stops: list
    generator: torch.Generator
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    completion_tokens: int = 0
    logprobs: int | None = None  # how many top alternatives per token, when the request asked for logprobs
    echo: bool = False  # the prompt's tokens are scored too
    generated: list = field(default_factory=list)  # the ids generated (for logprobs)
    scores: dict | None = None  # OpenAI's legacy logprobs object, set by the engine before the job's last event
    ended: bool = False  # its last event is out

    def put(self, text, end=None):  # from the engine's thread
        self.ended = self.ended or end is not None
        with contextlib.suppress(RuntimeError):  # the event loop has closed (the server stopped): nobody listens
            self.loop.call_soon_threadsafe(self.events.put_nowait, (text, end))


class Flight:
    """A job being generated: its row in the batch, the text decoder and stop-string cutter of its stream, the ids so
    far (prompt and generated: the repetition penalty's `previous`, and a rebuilt context's source), the last token."""

    def __init__(self, job, tokenizer, device):
        self.job, self.text, self.cut = job, TextStream(tokenizer), StopAtStrings(job.stops)
        self.ids, self.device, self.token = list(job.ids), device, None

    def previous(self):
        """The ids so far as GPT.stream passes them to the repetition penalty (None when it is off)."""
        if self.job.controls.get("repetition_penalty", 1.0) == 1.0:
            return None
        return torch.tensor([self.ids], dtype=torch.long, device=self.device)


class Engine:
    """The model, generating for every Job in flight on one worker thread with continuous batching: each step runs
    one forward pass for all of them together (batching.Slots: a KV cache row each, of its own length), and jobs join
    (after their prompt's own forward pass) and leave between steps. Each job draws from its own generator, as
    GPT.stream would for it alone. stop() ends every job (each gets STOPPING) and every job submitted after it."""

    def __init__(self, model, tokenizer, *, device, ctx, report=print):
        self.model, self.tokenizer, self.device, self.ctx, self.report = model, tokenizer, device, ctx, report
        self.stop_tokens = stop_token_ids(tokenizer)
        self.incoming = queue.SimpleQueue()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self.thread.start()

    def submit(self, job):
        self.incoming.put(job)

    def stop(self):
        self.stopping = True
        self.incoming.put(None)  # wakes the thread if it waits for work

    def _run(self):
        active = []  # Flights, in their Slots rows' order
        slots = Slots(self.model.config.n_layer, self.model.config.block_size)
        while True:
            arrived = [] if active else [self.incoming.get()]  # wait for work
            while not self.incoming.empty():
                arrived.append(self.incoming.get())
            if self.stopping:
                for flight in active + [Flight(job, self.tokenizer, self.device) for job in arrived if job is not None]:
                    flight.job.put(None, STOPPING)
                active, slots = [], Slots(self.model.config.n_layer, self.model.config.block_size)
                continue
            try:
                for job in arrived:
                    if job is not None and job.max_tokens == 0:  # scoring only (echo): nothing to generate
                        self._finish(job, "", "length")
                    elif job is not None and not job.cancelled:  # a client gone before its turn costs no prefill
                        self._join(Flight(job, self.tokenizer, self.device), active, slots)
                self._step(active, slots)
            except Exception as e:  # outside any one request's work (the rows' bookkeeping): never the thread's end
                self._fail([flight.job for flight in active], e)
                active.clear()
            if not active:
                slots.clear()  # idle: the rows' memory goes back

    def _join(self, flight, active, slots):
        """The job's prompt, alone (a prefill), and its first token; then a row for it, unless it is done already."""
        try:
            with torch.no_grad(), self.ctx:
                logits, cache = prefill(self.model, flight.ids, self.device)
                done = self._emit(flight, draw(logits, flight.job.controls, flight.previous(), flight.job.generator))
            if not done:
                slots.join(cache)  # may grow the batch's cache: memory can run out here too
                active.append(flight)
        except Exception as e:  # never the server's end (nor its thread's): the request gets the error
            self._fail([flight.job], e)

    def _step(self, active, slots):
        """One token of every job in flight: one forward pass for all of them (a row whose context filled block_size
        is rebuilt over its last half block first, as GPT.stream does); done jobs leave. A failure of one job's own
        work (its rebuild, its draw, its text) answers that job alone; only the shared forward pass fails them all."""
        if not active:
            return
        block = self.model.config.block_size
        with torch.no_grad(), self.ctx:
            leaving = []
            for row, flight in enumerate(active):
                if flight.job.cancelled:  # costs no rebuild
                    self._gone(flight.job)
                    leaving.append(row)
                elif slots.lengths[row] == block:  # the last half block before the new token, which the step adds
                    try:
                        slots.replace(row, prefill(self.model, flight.ids[-(block // 2):-1], self.device)[1])
                    except Exception as e:  # never the server's end: this request gets the error
                        self._fail([flight.job], e)
                        leaving.append(row)
            self._leave(active, slots, leaving)
            if not active:
                return
            try:
                tokens = torch.tensor([[f.token] for f in active], dtype=torch.long, device=self.device)
                logits, _ = self.model(tokens, kv_cache=slots, layout=slots.layout(self.device))
            except Exception as e:  # never the server's end: every request in this pass gets the error
                self._fail([flight.job for flight in active], e)
                active.clear()
                slots.clear()
                return
            finished = []
            for row, flight in enumerate(active):
                try:
                    if flight.job.cancelled:
                        self._gone(flight.job)
                        finished.append(row)
                    elif self._emit(flight, draw(logits[row:row + 1], flight.job.controls, flight.previous(),
                                                 flight.job.generator)):
                        finished.append(row)
                except Exception as e:  # never the server's end, nor the other requests': this one gets the error
                    self._fail([flight.job], e)
                    finished.append(row)
        self._leave(active, slots, finished)

    @staticmethod
    def _leave(active, slots, rows):
        """The jobs at `rows` leave the batch: the last row moves into a leaving one's place, in Slots and here."""
        for row in sorted(rows, reverse=True):
            moved = slots.leave(row)
            flight = active.pop()
            if moved is not None:
                active[row] = flight

    def _fail(self, jobs, error):
        """Each job ends with a 500 naming the error; the server's log gets one line."""
        message = f"generation failed: {type(error).__name__}: {error}"
        jobs = [job for job in jobs if not job.ended]  # one whose answer is out already keeps it
        if jobs:  # the line first: it is in the log by the time a client reads its 500
            self.report(f"{message} ({len(jobs)} request{'s' if len(jobs) > 1 else ''} answered with a 500)")
        for job in jobs:
            job.put(None, RequestError(500, message, kind="server_error"))

    def _gone(self, job):
        self.report(f"a client went away: its generation stopped after {job.completion_tokens} tokens")

    def _emit(self, flight, token):
        """A job's new token: its text out; True when the job is done (a stop token or string, max_tokens)."""
        job = flight.job
        if token not in self.stop_tokens:
            job.completion_tokens += 1
            job.generated.append(token)
            flight.ids.append(token)
            flight.token = token
            piece = flight.cut.push(flight.text.push(token))
            if piece:
                job.put(piece)
            if flight.cut.stopped:
                self._finish(job, "", "stop")
                return True
            if job.completion_tokens < job.max_tokens:
                return False
        self._finish(job, flight.cut.push(flight.text.end()) + flight.cut.end(),
                     "stop" if token in self.stop_tokens else "length")
        return True

    def _finish(self, job, text, end):
        """The job's last text and its finish reason, its logprobs first when it asked for them."""
        if job.logprobs is not None:
            try:
                job.scores = self._scores(job)
            except Exception as e:  # never the server's end: the request gets the error
                job.put(None, RequestError(500, f"scoring failed: {type(e).__name__}: {e}", kind="server_error"))
                return
        job.put(text, end)

    @torch.no_grad()
    def _scores(self, job):
        """OpenAI's legacy logprobs object of the job's tokens (the prompt's too with echo): the model's own
        distribution (before temperature and the other controls), one forward over prompt and generated tokens."""
        ids = job.ids + job.generated
        logprobs = None
        if len(ids) > 1:  # a single token has nothing to be predicted from
            with self.ctx:
                logits, _ = self.model(torch.tensor([ids[:-1]], device=self.device),
                                       layout=causal_layout(len(ids) - 1, self.device))
            logprobs = torch.log_softmax(logits.float(), dim=-1)
        first = 0 if job.echo else len(job.ids)
        tokens, token_logprobs, top, offsets, at = [], [], [], [], 0
        for i in range(first, len(ids)):
            piece = self.tokenizer.decode([ids[i]])
            tokens.append(piece)
            offsets.append(at)
            at += len(piece)
            if i == 0:  # the first token has no context to be predicted from
                token_logprobs.append(None)
                top.append(None)
                continue
            row = logprobs[i - 1]
            token_logprobs.append(float(row[ids[i]]))
            values, indices = row.topk(min(job.logprobs, row.numel())) if job.logprobs else (row[:0], row[:0].long())
            top.append({self.tokenizer.decode([int(t)]): float(v) for v, t in zip(values, indices)})
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def causal_layout(T, device):
    """GPT.forward's layout for one plain row of T tokens whose every position's logits are wanted."""
    pos = torch.arange(T, device=device)[None]
    mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
    return pos, mask, torch.ones(1, T, dtype=torch.bool, device=device)


# ----------------------------------------------------------------------------- requests

MAX_STOP_CHARS = 400  # the longest stop string (stop matching costs its length on the one generation thread)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}  # developer: OpenAI's newer name


def _number(body, key, default, *, low=None, high=None, integer=False):
    value = body.get(key)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or isinstance(value, float) and not math.isfinite(value):
        raise RequestError(400, f"'{key}' must be {'an integer' if integer else 'a finite number'}, got "
                                f"{_shown(value)}", param=key, code="invalid_type")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise RequestError(400, f"'{key}' is {_shown(value)}: it must be {bounds}", param=key, code="invalid_value")
    return value


def _shown(value):
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _flag(body, key):
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise RequestError(400, f"'{key}' must be true or false, got {_shown(value)}", param=key, code="invalid_type")
    return bool(value)


def _string(body, key):
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise RequestError(400, f"'{key}' must be a string, got {_shown(value)}", param=key, code="invalid_type")
    return value


@dataclass
class Request:
    """A completion or chat request, every field checked (before any generation starts)."""
    max_tokens: int
    n: int
    controls: dict
    stops: list
    seed: int | None
    stream: bool
    with_usage: bool
    echo: bool = False
    logprobs: int | None = None


MAX_LOGPROBS = 5  # OpenAI's limit for the legacy completions' logprobs
# OpenAI's fields that ask for what a text model without tools gives anyway at these values (clients such as LangChain
# send them so); any other value is refused by name
NEUTRAL = {"response_format": ({"type": "text"},), "tool_choice": ("none", "auto"), "function_call": ("none", "auto"),
           "modalities": (["text"],), "parallel_tool_calls": (True, False), "prediction": (), "audio": (),
           "web_search_options": ()}
FIELDS = {  # what each endpoint reads (or refuses by name unless at its default); OpenAI's metadata, store,
    # service_tier and reasoning_effort say nothing of this model's text and are taken without effect
    "common": {"model", "max_tokens", "max_completion_tokens", "n", "temperature", "top_p", "top_k", "min_p",
               "repetition_penalty", "stop", "seed", "stream", "stream_options", "user", "best_of", "presence_penalty",
               "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "echo", "suffix", "tools", "functions",
               "metadata", "store", "service_tier", "reasoning_effort", *NEUTRAL},
    "/v1/completions": {"prompt"},
    "/v1/chat/completions": {"messages"},
}
VLLM_FIELDS = {"min_tokens", "ignore_eos", "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens",
               "spaces_between_special_tokens", "use_beam_search", "length_penalty", "guided_json", "guided_regex",
               "guided_choice", "guided_grammar", "truncate_prompt_tokens", "add_generation_prompt",
               "continue_final_message", "chat_template", "chat_template_kwargs"}  # no "did you mean" for these


def check_fields(body, endpoint):
    """Refuse a field the endpoint does not know (OpenAI does too): a misspelt one would otherwise leave its setting
    at the default without a word."""
    known = FIELDS["common"] | FIELDS[endpoint]
    unknown = sorted(key for key in body if key not in known)
    if unknown:
        key = unknown[0]
        close = [] if key in VLLM_FIELDS else difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)
        hint = (f": did you mean '{close[0]}'?" if close else " (a vLLM extension this server does not support)"
                if key in VLLM_FIELDS else f" ({endpoint} does not know it)")
        shown = key if len(key) <= 40 else key[:37] + "..."
        raise RequestError(400, f"Unrecognized request argument supplied: {shown}{hint}", param=shown,
                           code="unknown_parameter")
    for key, neutral in NEUTRAL.items():
        if body.get(key) is not None and body[key] not in neutral:
            raise RequestError(400, f"'{key}' is not supported by this server"
                               + (f" other than {' or '.join(json.dumps(v) for v in neutral)}" if neutral else "")
                               + ": it generates plain text", param=key, code="unsupported_parameter")


def parse_request(body, limits, *, default_max_tokens, scoring=False):
    """The Request of a body's common fields: max_tokens, n, the sampling controls, stop strings, seed, stream; with
    scoring (/v1/completions), also echo and logprobs (0 to 5), and max_tokens may be 0 (score the prompt only)."""
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0, low=-2.0, high=2.0):
            raise RequestError(400, f"'{key}' is not supported by this server: use repetition_penalty (transformers' "
                                    f"definition: above 1 makes tokens already in the text less likely)", param=key,
                               code="unsupported_parameter")
    for key in ("top_logprobs", "tools", "functions", "logit_bias", "suffix", *(() if scoring else ("logprobs", "echo"))):
        if body.get(key) not in (None, False, 0, [], {}):
            raise RequestError(400, f"'{key}' is not supported by this server" + (
                " on /v1/chat/completions: /v1/completions scores tokens (echo, logprobs)" if key in ("logprobs", "echo")
                else ""), param=key, code="unsupported_parameter")
    echo = _flag(body, "echo") if scoring else False
    logprobs = _number(body, "logprobs", None, low=0, high=MAX_LOGPROBS, integer=True) if scoring else None
    if _number(body, "best_of", 1, low=1, integer=True) != 1:
        raise RequestError(400, "'best_of' is not supported by this server: ask for n choices", param="best_of",
                           code="unsupported_parameter")
    _string(body, "user")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, default_max_tokens, low=0 if echo else 1, high=limits.max_tokens, integer=True)
    n = _number(body, "n", 1, low=1, high=limits.n, integer=True)
    controls = dict(temperature=_number(body, "temperature", 1.0, low=0.0, high=2.0),
                    top_p=_number(body, "top_p", 1.0), top_k=_number(body, "top_k", 0, low=0, integer=True) or None,
                    min_p=_number(body, "min_p", 0.0), repetition_penalty=_number(body, "repetition_penalty", 1.0))
    try:
        check_sampling(**controls)
    except ValueError as e:
        raise RequestError(400, str(e), param=str(e).split("=")[0], code="invalid_value") from None
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise RequestError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop",
                           code="invalid_type")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise RequestError(400, f"a stop string of {max(map(len, stops)):,} characters: each may have at most "
                                f"{MAX_STOP_CHARS}", param="stop", code="invalid_value")
    seed = _number(body, "seed", None, low=0, high=2**63 - 1, integer=True)
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError(400, f"'stream_options' must be an object, got {_shown(options)}", param="stream_options",
                           code="invalid_type")
    with_usage = _flag(options or {}, "include_usage")
    if stream and logprobs is not None:
        raise RequestError(400, "'logprobs' with stream=true is not supported by this server: ask without streaming",
                           param="logprobs", code="unsupported_parameter")
    return Request(max_tokens, n, controls, stops, seed, stream, with_usage, echo, logprobs)


def chat_turns(body, limits):
    """The {role, content} turns of a chat body's `messages`, checked: text content only (a string, or OpenAI's text
    parts), at most limits.messages of them and limits.chars characters in all."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content}", param="messages",
                           code="invalid_type")
    if len(messages) > limits.messages:
        raise RequestError(400, f"{len(messages):,} messages: this server takes at most {limits.messages:,} in one "
                                f"request (the oldest turns are dropped to fit the model's context anyway: send the "
                                f"newest)", param="messages", code="too_many_messages")
    turns, chars = [], 0
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # OpenAI's content parts: text ones only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(400, f"messages[{i}]: content parts must be {{\"type\": \"text\", \"text\": "
                                        f"string}} (this model reads text only)", param="messages", code="invalid_type")
            content = "".join(p["text"] for p in content)
        if not isinstance(role, str) or role not in ROLES or not isinstance(content, str):
            raise RequestError(400, f"messages[{i}] must be {{\"role\": \"system\"|\"user\"|\"assistant\", "
                                    f"\"content\": text}}", param="messages", code="invalid_type")
        chars += len(content)
        if chars > limits.chars:
            raise RequestError(400, f"the messages hold over {limits.chars:,} characters, this server's limit for one "
                                    f"request: send fewer or shorter turns", param="messages", code="too_long")
        turns.append({"role": ROLES[role], "content": content})
    return turns


def completion_prompts(body, limits):
    """The prompts of a /v1/completions body, checked: each a string or a list of token ids (OpenAI's forms: a
    string, a list of strings, a list of ids, a list of lists of ids)."""
    prompt = body.get("prompt")
    is_ids = lambda p: isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
    if isinstance(prompt, str) or is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise RequestError(400, "'prompt' must be a non-empty string, a list of token ids, or a list of either",
                           param="prompt", code="invalid_type")
    if len(prompts) > limits.prompts:
        raise RequestError(400, f"{len(prompts):,} prompts: this server takes at most {limits.prompts} in one request",
                           param="prompt", code="too_many_prompts")
    if any(p == "" for p in prompts):
        raise RequestError(400, "'prompt' must not be empty", param="prompt", code="invalid_value")
    if sum(len(p) for p in prompts) > limits.chars:
        raise RequestError(400, f"the prompt has over {limits.chars:,} characters or tokens, this server's limit: send "
                                f"the end of it (only the last block_size tokens are read)", param="prompt",
                           code="too_long")
    return prompts


def generators(seed, n, device):
    """n torch.Generators: seed, seed + 1, ... (the same request with the same seed gives the same choices)."""
    base = random.SystemRandom().randrange(2**62) if seed is None else seed
    return [torch.Generator(device=device).manual_seed(base + i) for i in range(n)]


class API:
    """The endpoints' logic, for a model with an id and an Engine; FastAPI calls it (app). completion() and chat()
    check a whole body and tokenize it (they run off the event loop); submit() starts its jobs."""

    def __init__(self, engine, *, model_id, block_size, limits, api_key=None):
        self.engine, self.model_id, self.block_size, self.limits, self.api_key = engine, model_id, block_size, limits, api_key
        self.created = int(time.time())
        self.is_chat = hasattr(engine.tokenizer, "render")

    def check_key(self, authorization):
        if self.api_key and not secrets.compare_digest(authorization or "", f"Bearer {self.api_key}"):
            raise RequestError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY' with the "
                                    "key this server was started with (--api_key)", code="invalid_api_key")

    def models(self):
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self):
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "gpt-toolkit",
                "chat": self.is_chat, "context_length": self.block_size}

    def check_model(self, body):
        model = _string(body, "model")
        if model not in (None, self.model_id):
            raise RequestError(404, f"The model '{model}' does not exist: this server serves '{self.model_id}'",
                               param="model", code="model_not_found")

    def completion(self, body):
        """(Request, [prompt ids, ...]) of a /v1/completions body."""
        check_fields(body, "/v1/completions")
        self.check_model(body)
        prompts = completion_prompts(body, self.limits)
        request = parse_request(body, self.limits, default_max_tokens=16, scoring=True)
        ids = [self._encode(p) if isinstance(p, str) else self._check_ids(p) for p in prompts]
        if request.logprobs is not None:  # scored by one forward over prompt and generation: they must fit together
            longest = max(len(p) for p in ids) + max(request.max_tokens - 1, 0)
            if longest > self.block_size:
                raise RequestError(400, f"'logprobs' needs the prompt and max_tokens within the model's context of "
                                        f"{self.block_size} tokens, and they make {longest}: shorten the prompt",
                                   param="logprobs", code="context_length_exceeded")
        return request, ids

    def _check_ids(self, ids):
        vocab = self.engine.model.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(400, f"token id {bad} is not in this model's vocabulary (0 to {vocab - 1})",
                               param="prompt", code="invalid_value")
        return list(ids)

    def chat(self, body):
        """(Request, prompt ids) of a /v1/chat/completions body: the model's chat template, the oldest turns dropped
        when the conversation outgrows the context (as sample.py --chat does)."""
        check_fields(body, "/v1/chat/completions")
        self.check_model(body)
        if not self.is_chat:
            raise RequestError(400, f"'{self.model_id}' is not a chat model (it was trained without the chat tokens): "
                                    f"use /v1/completions, or fine-tune it on a chat dataset first (README: a model "
                                    f"that answers)", param="messages", code="not_a_chat_model")
        turns = chat_turns(body, self.limits)
        request = parse_request(body, self.limits, default_max_tokens=self.limits.max_tokens)
        room = min(request.max_tokens, self.block_size // 2)
        try:
            ids, _ = fit_history(self.engine.tokenizer, turns, self.block_size - room)
        except Exception as e:  # a character the model never saw
            raise RequestError(400, str(e), param="messages", code="invalid_value") from None
        return request, [ids]

    def _encode(self, text):
        try:
            return self.engine.tokenizer.encode(text)
        except Exception as e:  # a character a character-level model never saw
            raise RequestError(400, str(e), param="prompt", code="invalid_value") from None

    def submit(self, request, prompts):
        """The jobs of a checked request, n per prompt (prompt i's choice j is job i * n + j), handed to the engine."""
        loop = asyncio.get_running_loop()
        jobs = [Job(ids=list(ids), max_tokens=request.max_tokens, controls=dict(request.controls), stops=request.stops,
                    generator=g, loop=loop, logprobs=request.logprobs, echo=request.echo)
                for ids in prompts for g in generators(request.seed, request.n, self.engine.device)]
        for job in jobs:
            self.engine.submit(job)
        return jobs

    def tokenizer_info(self):
        tok = self.engine.tokenizer
        eot = getattr(tok, "eot", None)
        return {"eos_token": tok.decode([eot]) if eot is not None else None, "bos_token": None, "pad_token": None,
                "model_max_length": self.block_size, "vocab_size": self.engine.model.config.vocab_size,
                "tokenizer_kind": tok.kind, **({"chat_template": CHAT_TEMPLATE} if self.is_chat else {})}

    def tokenize(self, body):
        self.check_model(body)
        text = body.get("prompt")
        if not isinstance(text, str):
            raise RequestError(400, "'prompt' must be a string", param="prompt", code="invalid_type")
        if len(text) > self.limits.chars:
            raise RequestError(400, f"the prompt has over {self.limits.chars:,} characters, this server's limit",
                               param="prompt", code="too_long")
        ids = self._encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.block_size}

    def detokenize(self, body):
        self.check_model(body)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestError(400, "'tokens' must be a list of token ids", param="tokens", code="invalid_type")
        return {"prompt": self.engine.tokenizer.decode(self._check_ids(ids))}


async def collect(job):
    """(text, finish_reason or the RequestError it ended with) of a whole job."""
    parts = []
    while True:
        text, end = await job.events.get()
        if text:
            parts.append(text)
        if end is not None:
            return "".join(parts), end


async def disconnected(request):
    """Returns once the client of a request whose body has been read hangs up."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def usage(prompt_tokens, jobs):
    completion = sum(j.completion_tokens for j in jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def sse(payload):
    return f"data: {json.dumps(payload)}\n\n"


def app(api, *, page=PAGE):
    """The FastAPI application of an API."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    server = FastAPI(title="gpt-toolkit", docs_url=None, redoc_url=None, openapi_url=None)

    @server.exception_handler(RequestError)
    async def refused(request, e):
        return JSONResponse(e.body(), status_code=e.status)

    @server.exception_handler(HTTPException)
    async def http_error(request, e):  # 404 and 405 of unknown paths and methods, in OpenAI's shape
        message = f"{request.method} {request.url.path}: {e.detail}"
        if request.url.path.rstrip("/").endswith("/responses"):  # newer OpenAI examples: say what is served instead
            message += (": the Responses API is not served here; use /v1/chat/completions (messages) or "
                        "/v1/completions (a prompt)")
        return JSONResponse(RequestError(e.status_code, message).body(), status_code=e.status_code)

    @server.exception_handler(Exception)
    async def unexpected(request, e):  # never a traceback to the client, and the server keeps serving
        return JSONResponse(RequestError(500, f"{type(e).__name__}: {e}", kind="server_error").body(), status_code=500)

    async def body_of(request):
        api.check_key(request.headers.get("authorization"))
        limit = api.limits.body_bytes
        too_large = RequestError(413, f"the request body is over this server's limit of {limit:,} bytes",
                                 code="request_too_large")
        length = request.headers.get("content-length") or "0"
        if not length.isdigit():
            raise RequestError(400, "the Content-Length header is not a number", code="invalid_request")
        if int(length) > limit:
            raise too_large
        raw = bytearray()
        try:
            async with asyncio.timeout(api.limits.read_seconds):  # a client that trickles its body in is let go
                async for chunk in request.stream():
                    raw += chunk
                    if len(raw) > limit:
                        raise too_large
        except TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {api.limits.read_seconds:g} seconds",
                               code="request_timeout") from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise RequestError(400, "We could not parse the JSON body of your request: send one JSON object "
                                    "(Content-Type: application/json)", code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    @server.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @server.get("/v1/models")
    async def models(request: Request):
        api.check_key(request.headers.get("authorization"))
        return api.models()

    @server.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request):
        api.check_key(request.headers.get("authorization"))
        api.check_model({"model": model_id})
        return api.model_card()

    @server.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        checked, prompts = await asyncio.to_thread(api.completion, body)  # tokenizing a long prompt: off the loop
        return await respond(request, checked, api.submit(checked, prompts), sum(map(len, prompts)), chat=False)

    @server.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        checked, prompts = await asyncio.to_thread(api.chat, body)  # fitting a long history: off the event loop
        return await respond(request, checked, api.submit(checked, prompts), sum(map(len, prompts)), chat=True)

    # the tokenizer, as vLLM serves it (lm-evaluation-harness's local-completions tokenizes through these)
    @server.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        api.check_key(request.headers.get("authorization"))
        return api.tokenizer_info()

    @server.post("/tokenize")
    async def tokenize(request: Request):
        return await asyncio.to_thread(api.tokenize, await body_of(request))

    @server.post("/detokenize")
    async def detokenize(request: Request):
        return await asyncio.to_thread(api.detokenize, await body_of(request))

    async def respond(request, checked, jobs, prompt_tokens, *, chat):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        created, kind = int(time.time()), "chat.completion" if chat else "text_completion"
        if checked.stream:
            return StreamingResponse(stream(rid, created, jobs, prompt_tokens, chat=chat, with_usage=checked.with_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        results = asyncio.ensure_future(asyncio.gather(*(collect(job) for job in jobs)))
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait((results, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for job in jobs:
                job.cancelled = True  # the client has gone, or all are done: nothing more to generate for it
            gone.cancel()
        if not results.done():  # the client hung up: nobody to answer
            results.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await results  # its cancellation is retrieved (else asyncio logs it)
            return Response(status_code=499)
        for _, end in results.result():
            if isinstance(end, RequestError):
                raise end
        choices = [({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": end} if chat
                    else {"index": i, "text": echoed(job) + text, "logprobs": job.scores, "finish_reason": end})
                   for i, (job, (text, end)) in enumerate(zip(jobs, results.result()))]
        return {"id": rid, "object": kind, "created": created, "model": api.model_id, "choices": choices,
                "usage": usage(prompt_tokens, jobs)}

    def echoed(job):
        return api.engine.tokenizer.decode(job.ids) if job.echo else ""

    async def stream(rid, created, jobs, prompt_tokens, *, chat, with_usage):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i, text=None, end=None, role=False):
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else {} if text is None else {"content": text})
                choice = {"index": i, "delta": delta, "finish_reason": end}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": end}
            return sse({"id": rid, "object": kind, "created": created, "model": api.model_id, "choices": [choice]})
        try:
            if chat:
                for i in range(len(jobs)):
                    yield chunk(i, role=True)
            for i, job in enumerate(jobs):  # the choices one after another (they are generated at once)
                if job.echo:
                    yield chunk(i, echoed(job))
                while True:
                    text, end = await job.events.get()
                    if isinstance(end, RequestError):
                        yield sse(end.body())
                        return
                    if text:
                        yield chunk(i, text)
                    if end is not None:
                        yield chunk(i, end=end)
                        break
            if with_usage:
                yield sse({"id": rid, "object": kind, "created": created, "model": api.model_id, "choices": [],
                           "usage": usage(prompt_tokens, jobs)})
            yield "data: [DONE]\n\n"
        finally:  # the client disconnected, or the stream ended: nothing more to generate for it
            for job in jobs:
                job.cancelled = True

    return server


def serve(api, *, sock, report):
    """Serve api with uvicorn on a listening socket until Ctrl-C or SIGTERM; returns that signal's number. The
    signal ends every generation in flight at once (its client gets STOPPING: a 503, or an error event in a stream),
    so a busy server stops within about a second, where uvicorn alone would wait for every stream to finish. A client
    whose request headers or body arrive slower than limits.read_seconds is let go."""
    import signal

    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    read_seconds = api.limits.read_seconds

    class Protocol(H11Protocol):
        """uvicorn's HTTP/1.1 protocol with a clock on each request's headers (uvicorn times out only idle
        connections, so a client could trickle its headers in for ever and hold the connection)."""
        headers_due = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self.expect_headers()

        def expect_headers(self):
            if self.headers_due is not None:
                self.headers_due.cancel()
            self.headers_due = self.loop.call_later(read_seconds, self.headers_late)

        def handle_events(self):
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle and self.headers_due is not None:  # a request's headers are complete
                self.headers_due.cancel()
                self.headers_due = None

        def on_response_complete(self):
            super().on_response_complete()
            self.expect_headers()  # the next request's

        def connection_lost(self, exc):
            if self.headers_due is not None:
                self.headers_due.cancel()
            super().connection_lost(exc)

        def headers_late(self):
            self.headers_due = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                report(f"a client sent no complete request within {read_seconds:g} seconds: disconnected it")
                self.transport.close()

    class Server(uvicorn.Server):
        stopped_by = None

        def handle_exit(self, sig, frame):
            if self.stopped_by is None:
                self.stopped_by = sig
                api.engine.stop()  # the streams end now, and the graceful shutdown has nothing left to wait for
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn's, less raising the signal again once stopped: the caller says it
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in system.stop_signals()}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    server = Server(uvicorn.Config(app(api), http=Protocol, log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=1))
    server.run(sockets=[sock])
    return server.stopped_by


def is_loopback(host):
    with contextlib.suppress(ValueError):
        import ipaddress
        return ipaddress.ip_address(host).is_loopback
    return host == "localhost"
