"""An OpenAI-compatible server for a trained model (tools/serve.py): GET /v1/models, POST /v1/completions and
/v1/chat/completions (with stream=true as server-sent events), OpenAI's error shape, and a chat page at /.

Generation runs on one worker thread (Engine), off the event loop: every request in flight gets a token in turn, so
many streams progress at once and /v1/models answers during a long one. Each request draws from its own
torch.Generator (seeded by its `seed`, else at random): a request's text depends on its seed only, whatever runs
beside it. Everything goes through the model's one generate path (model.stream: the KV cache, the controls sample.py
has), so greedy text over the API is sample.py --temperature=0's."""
import asyncio
import contextlib
import json
import queue
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gpt_toolkit.sampling import StopAtStrings, TextStream, fit_history, stop_token_ids
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


@dataclass
class Limits:
    """What one request may ask for: max_tokens, n, and the body's bytes."""
    max_tokens: int = 2048
    n: int = 8
    body_bytes: int = 1 << 20


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

    def put(self, text, end=None):  # from the engine's thread
        self.loop.call_soon_threadsafe(self.events.put_nowait, (text, end))


class Engine:
    """The model, generating for every Job in flight on one worker thread, a token of each in turn."""

    def __init__(self, model, tokenizer, *, device, ctx, report=print):
        self.model, self.tokenizer, self.device, self.ctx, self.report = model, tokenizer, device, ctx, report
        self.stop_tokens = stop_token_ids(tokenizer)
        self.incoming = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="generation", daemon=True)
        self.thread.start()

    def submit(self, job):
        self.incoming.put(job)

    def _run(self):
        active = []  # (job, its token stream, its text decoder, its stop-string cutter)
        while True:
            if not active:  # wait for work
                active.append(self._start(self.incoming.get()))
            while not self.incoming.empty():
                active.append(self._start(self.incoming.get()))
            for entry in list(active):
                if self._step(*entry):
                    active.remove(entry)

    def _start(self, job):
        x = torch.tensor([job.ids], dtype=torch.long, device=self.device)
        stream = self.model.stream(x, job.max_tokens, kv_cache=True, stop_tokens=self.stop_tokens,
                                   generator=job.generator, **job.controls)
        return job, stream, TextStream(self.tokenizer), StopAtStrings(job.stops)

    def _step(self, job, stream, text, cut):
        """One token of job; True when it is done (finished, or its client gone)."""
        if job.cancelled:
            stream.close()
            self.report(f"a client went away: its generation stopped after {job.completion_tokens} tokens")
            return True
        try:
            with torch.no_grad(), self.ctx:
                token = next(stream, None)
        except Exception as e:  # never the server's end: the request gets the error
            job.put(None, RequestError(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error"))
            return True
        token = None if token is None else token.item()
        if token is not None and token not in self.stop_tokens:
            job.completion_tokens += 1
            piece = cut.push(text.push(token))
            if piece:
                job.put(piece)
            if cut.stopped:
                job.put(None, "stop")
                stream.close()
                return True
            if job.completion_tokens < job.max_tokens:
                return False
        job.put(cut.push(text.end()) + cut.end(), "length" if token is None or token not in self.stop_tokens else "stop")
        stream.close()
        return True


# ----------------------------------------------------------------------------- requests

def _number(body, key, default, *, low=None, high=None, integer=False):
    value = body.get(key, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise RequestError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, got {value!r}", param=key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise RequestError(400, f"'{key}' is {value}: it must be {bounds}", param=key, code="invalid_value")
    return value


def parse_controls(body, limits, *, default_max_tokens):
    """(max_tokens, n, the model's sampling controls, stop strings, seed) of a request body, checked."""
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0, low=-2.0, high=2.0):
            raise RequestError(400, f"'{key}' is not supported by this server: use repetition_penalty (transformers' "
                                    f"definition: above 1 makes tokens already in the text less likely)", param=key,
                               code="unsupported_parameter")
    for key in ("logprobs", "echo", "top_logprobs", "tools", "functions", "logit_bias", "suffix"):
        if body.get(key) not in (None, False, 0, [], {}):
            raise RequestError(400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, default_max_tokens, low=1, high=limits.max_tokens, integer=True)
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
        raise RequestError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    seed = _number(body, "seed", None, low=0, high=2**63 - 1, integer=True)
    return max_tokens, n, controls, stops, seed


def generators(seed, n, device):
    """n torch.Generators: seed, seed + 1, ... (the same request with the same seed gives the same choices)."""
    base = random.SystemRandom().randrange(2**62) if seed is None else seed
    return [torch.Generator(device=device).manual_seed(base + i) for i in range(n)]


class API:
    """The endpoints' logic, for a model with an id and an Engine; FastAPI calls it (app)."""

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
        if body.get("model") not in (None, self.model_id):
            raise RequestError(404, f"The model '{body.get('model')}' does not exist: this server serves "
                                    f"'{self.model_id}'", param="model", code="model_not_found")

    def completion_jobs(self, body):
        """(jobs, prompt tokens) of a /v1/completions body."""
        self.check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "'prompt' must be a non-empty string (one prompt per request)", param="prompt")
        return self._jobs(body, self._encode(prompt), default_max_tokens=16)

    def chat_jobs(self, body):
        """(jobs, prompt tokens) of a /v1/chat/completions body: the model's chat template, the oldest turns dropped
        when the conversation outgrows the context (as sample.py --chat does)."""
        self.check_model(body)
        if not self.is_chat:
            raise RequestError(400, f"'{self.model_id}' is not a chat model (it was trained without the chat tokens): "
                                    f"use /v1/completions, or fine-tune it on a chat dataset first (README: a model "
                                    f"that answers)", param="messages", code="not_a_chat_model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "'messages' must be a non-empty list of {role, content}", param="messages")
        turns = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # OpenAI's content parts: the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(
                    content, str):
                raise RequestError(400, "each message must be {\"role\": \"system\"|\"user\"|\"assistant\", \"content\": "
                                        "text}", param="messages")
            turns.append({"role": m["role"], "content": content})
        max_tokens, *_ = parse_controls(body, self.limits, default_max_tokens=self.limits.max_tokens)
        room = min(max_tokens, self.block_size // 2)
        try:
            ids, _ = fit_history(self.engine.tokenizer, turns, self.block_size - room)
        except Exception as e:  # a character the model never saw
            raise RequestError(400, str(e), param="messages") from None
        return self._jobs(body, ids, default_max_tokens=self.limits.max_tokens)

    def _encode(self, text):
        try:
            return self.engine.tokenizer.encode(text)
        except Exception as e:  # a character a character-level model never saw
            raise RequestError(400, str(e), param="prompt") from None

    def _jobs(self, body, ids, *, default_max_tokens):
        max_tokens, n, controls, stops, seed = parse_controls(body, self.limits, default_max_tokens=default_max_tokens)
        loop = asyncio.get_running_loop()
        jobs = [Job(ids=list(ids), max_tokens=max_tokens, controls=dict(controls), stops=stops, generator=g, loop=loop)
                for g in generators(seed, n, self.engine.device)]
        for job in jobs:
            self.engine.submit(job)
        return jobs, len(ids)


async def collect(job):
    """(text, finish_reason) of a whole job."""
    parts = []
    while True:
        text, end = await job.events.get()
        if text:
            parts.append(text)
        if end is not None:
            if isinstance(end, RequestError):
                raise end
            return "".join(parts), end


def usage(prompt_tokens, jobs):
    completion = sum(j.completion_tokens for j in jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def sse(payload):
    return f"data: {json.dumps(payload)}\n\n"


def app(api, *, page=PAGE):
    """The FastAPI application of an API."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    server = FastAPI(title="gpt-toolkit", docs_url=None, redoc_url=None, openapi_url=None)

    @server.exception_handler(RequestError)
    async def refused(request, e):
        return JSONResponse(e.body(), status_code=e.status)

    @server.exception_handler(HTTPException)
    async def http_error(request, e):  # 404 and 405 of unknown paths and methods, in OpenAI's shape
        return JSONResponse(RequestError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").body(),
                            status_code=e.status_code)

    @server.exception_handler(Exception)
    async def unexpected(request, e):  # never a traceback to the client, and the server keeps serving
        return JSONResponse(RequestError(500, f"{type(e).__name__}: {e}", kind="server_error").body(), status_code=500)

    async def body_of(request):
        api.check_key(request.headers.get("authorization"))
        if int(request.headers.get("content-length") or 0) > api.limits.body_bytes:
            raise RequestError(413, f"the request body is over this server's limit of {api.limits.body_bytes:,} bytes",
                               code="request_too_large")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > api.limits.body_bytes:
                raise RequestError(413, f"the request body is over this server's limit of {api.limits.body_bytes:,} "
                                        f"bytes", code="request_too_large")
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
        jobs, prompt_tokens = api.completion_jobs(body)
        return await respond(request, body, jobs, prompt_tokens, chat=False)

    @server.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        jobs, prompt_tokens = api.chat_jobs(body)
        return await respond(request, body, jobs, prompt_tokens, chat=True)

    async def respond(request, body, jobs, prompt_tokens, *, chat):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        created, kind = int(time.time()), "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            try:
                results = [await collect(job) for job in jobs]
            finally:
                for job in jobs:
                    job.cancelled = True  # a client gone while it waited: the rest need not be generated
            choices = [({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": end} if chat
                        else {"index": i, "text": text, "logprobs": None, "finish_reason": end})
                       for i, (text, end) in enumerate(results)]
            return {"id": rid, "object": kind, "created": created, "model": api.model_id, "choices": choices,
                    "usage": usage(prompt_tokens, jobs)}
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(stream(rid, created, jobs, prompt_tokens, chat=chat, with_usage=with_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

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


def is_loopback(host):
    with contextlib.suppress(ValueError):
        import ipaddress
        return ipaddress.ip_address(host).is_loopback
    return host == "localhost"
