"""tools/serve.py: a real server (uvicorn, in its own process) talked to by the official openai client, raw HTTP and a
real headless browser: the endpoints and their streams, OpenAI's error shapes, concurrency, disconnects, the chat page."""
import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT, TINY_TRAIN, run_script

openai = pytest.importorskip("openai")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """tools/serve.py in a process of its own, until stop(). Its output goes to files (log() reads them at any time):
    a pipe nobody reads would fill and stall a server that says much."""

    def __init__(self, *args):
        import tempfile
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out, self.err = (tempfile.NamedTemporaryFile("w+", encoding="utf-8", suffix=f".{name}")
                              for name in ("out", "err"))
        self.proc = subprocess.Popen([sys.executable, "tools/serve.py", f"--port={self.port}", *map(str, args)],
                                     cwd=ROOT, stdout=self.out, stderr=self.err, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models", timeout=2) as r:
                    if r.status in (200, 401):
                        return
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(f"the server exited: {self.log()[1]}") from None
                time.sleep(0.3)
        raise AssertionError("the server did not start")

    def log(self):
        """(stdout, stderr) so far."""
        return tuple(open(f.name, encoding="utf-8").read() for f in (self.out, self.err))

    def client(self, **kw):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def post(self, path, data, headers=None, timeout=60):
        """(status, body as JSON) of a raw POST."""
        req = urllib.request.Request(f"{self.url}{path}", data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self, sig=signal.SIGINT):
        """(exit code, stdout, stderr) once a signal has stopped it."""
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)
        return (self.proc.returncode, *self.log())


pytestmark = pytest.mark.slow  # every test here starts a server process (-m "not slow" leaves servers out)

@pytest.fixture(scope="module")
def base_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "base"
    r = run_script("train.py", *TINY_TRAIN, "--max_iters=40", "--block_size=64", f"--data_dir={data_dir}",
                   f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def chat_run(base_run, data_dir, tmp_path_factory):
    """A tiny chat model: a few conversations prepared for the base model's vocabulary, fine-tuned a few steps."""
    root = tmp_path_factory.mktemp("chat")
    names = ["Romeo", "Juliet", "Hamlet", "Lear", "Portia", "Othello", "Viola", "Puck", "Iago", "Brutus"]
    lines = [json.dumps({"messages": [{"role": "user", "content": f"who is {a}?"},
                                      {"role": "assistant", "content": f"{a} is a friend of {b}."}]})
             for a in names for b in names[:6]]
    (root / "chats.jsonl").write_text("\n".join(lines) + "\n")
    r = run_script("data/prepare_chat.py", f"--input={root / 'chats.jsonl'}", "--name=tiny_serve_chat",
                   f"--data_dir={data_dir}", f"--tokenizer_from={base_run}")
    assert r.returncode == 0, r.stderr
    out = root / "chat"
    r = run_script("train.py", *TINY_TRAIN, "--block_size=64", "--dataset=tiny_serve_chat", f"--init_from={base_run}",
                   "--max_iters=150", "--learning_rate=1e-2", f"--data_dir={data_dir}", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def base(base_run):
    server = Server(f"--out_dir={base_run}", "--max_body_kb=4")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chat(chat_run):
    server = Server(f"--out_dir={chat_run}", "--model_name=tiny-chat")
    yield server
    server.stop()


# ----------------------------------------------------------------------------- the endpoints, with openai's client

def test_models_lists_the_one_model(base, base_run):
    models = base.client().models.list().data
    assert [m.id for m in models] == [base_run.name]
    assert base.client().models.retrieve(base_run.name).id == base_run.name


def test_greedy_completion_is_sample_pys_temperature_0(base, base_run):
    r = run_script("sample.py", f"--out_dir={base_run}", "--start=ROMEO:", "--temperature=0", "--num_samples=1",
                   "--max_new_tokens=40", "--stop_at_eot=False")
    assert r.returncode == 0, r.stderr
    expected = r.stdout.split("\n---------------\n")[0][len("ROMEO:"):]
    got = base.client().completions.create(model=base_run.name, prompt="ROMEO:", max_tokens=40, temperature=0)
    assert got.choices[0].text == expected and got.choices[0].finish_reason == "length"
    assert got.usage.prompt_tokens == 6 and got.usage.completion_tokens == 40 and got.usage.total_tokens == 46
    streamed = base.client().completions.create(model=base_run.name, prompt="ROMEO:", max_tokens=40, temperature=0,
                                                stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_the_same_seed_gives_the_same_text(base, base_run):
    def draw(seed):
        return [c.text for c in base.client().completions.create(model=base_run.name, prompt="KING:", max_tokens=30,
                                                                   temperature=1.0, seed=seed, n=2).choices]
    first = draw(7)
    assert draw(7) == first and first[0] != first[1]  # n=2: two different choices, each fixed by the seed
    assert draw(8) != first


def test_stop_strings_are_caught_across_tokens_and_not_returned(base, base_run):
    full = base.client().completions.create(model=base_run.name, prompt="ROMEO:", max_tokens=60, temperature=0)
    text = full.choices[0].text
    stop = text[10:13]  # three characters: three tokens of a character model
    got = base.client().completions.create(model=base_run.name, prompt="ROMEO:", max_tokens=60, temperature=0,
                                           stop=[stop, "never"])
    assert got.choices[0].text == text[:text.index(stop)] and got.choices[0].finish_reason == "stop"
    chunks = list(base.client().completions.create(model=base_run.name, prompt="ROMEO:", max_tokens=60, temperature=0,
                                                   stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text[:text.index(stop)]


def test_chat_completion_follows_the_template_and_ends_at_end(chat, chat_run):
    from gpt_toolkit.core.tokenizer import tokenizer_from_meta
    client = chat.client()
    got = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "who is Romeo?"}],
                                         temperature=0, max_tokens=30)
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    # the same prompt through sample.py's chat path: the template's ids, greedy
    ckpt = json.loads((chat_run / "config.json").read_text())
    assert ckpt["dataset"] == "tiny_serve_chat"
    stream = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "who is Romeo?"}],
                                            temperature=0, max_tokens=30, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.completion_tokens == got.usage.completion_tokens and not chunks[-1].choices
    del tokenizer_from_meta


def test_a_base_model_answers_chat_with_a_clear_400(base, base_run):
    with pytest.raises(openai.BadRequestError) as e:
        base.client().chat.completions.create(model=base_run.name, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 400 and "is not a chat model" in e.value.message
    assert e.value.body["code"] == "not_a_chat_model"


# ----------------------------------------------------------------------------- bad requests never crash it

@pytest.mark.parametrize("fields, param", [
    ({"temperature": -1}, "temperature"), ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 100000}, "max_tokens"),
    ({"n": 100}, "n"), ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"stop": 5}, "stop"), ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
    ({"extra_body": {"top_k": -1}}, "top_k"), ({"logprobs": 6}, "logprobs")])  # 0-5 are served (docs/evaluation.md)
def test_invalid_values_are_400s_in_openais_shape(base, base_run, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        base.client().completions.create(model=base_run.name, prompt="ROMEO:", **{"max_tokens": 5, **fields})
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert set(e.value.body) == {"message", "type", "param", "code"} and e.value.body["type"] == "invalid_request_error"


def test_an_unknown_model_is_404(base):
    with pytest.raises(openai.NotFoundError) as e:
        base.client().completions.create(model="gpt-9", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "gpt-9" in e.value.message


def test_the_responses_api_is_a_404_that_names_what_is_served(base, base_run):
    """Newer OpenAI examples call client.responses.create: a 404 in OpenAI's shape that says where to go instead."""
    with pytest.raises(openai.NotFoundError) as e:
        base.client().responses.create(model=base_run.name, input="hi")
    assert "/v1/chat/completions" in e.value.message and "Responses API is not served here" in e.value.message


def test_it_says_it_is_loading_before_it_serves(base):
    """A line at once on stderr (loading takes 20-40 s on a busy machine), and the "serving" line on stdout."""
    out, err = base.log()
    assert err.splitlines()[0].startswith("loading ") and out.splitlines()[0].startswith("serving "), (out, err)


def test_malformed_bodies_and_big_ones_are_refused_and_the_server_keeps_serving(base, base_run):
    status, body = base.post("/v1/completions", b'{"prompt": "ROMEO:", ')
    assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body = base.post("/v1/completions", b'["not", "an", "object"]')
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = base.post("/v1/completions", json.dumps({"prompt": "x" * 10_000}).encode())  # --max_body_kb=4
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = base.post("/v1/completions", json.dumps({"prompt": "ROMEO: \u6771", "max_tokens": 3}).encode())
    assert status == 400 and "prompt" == body["error"]["param"]  # a character this vocabulary has not
    status, body = base.post("/v1/nowhere", b"{}")
    assert status == 404 and "error" in body
    assert base.client().models.list().data  # still serving


def test_an_api_key_is_required_when_set(base_run):
    server = Server(f"--out_dir={base_run}", "--api_key=sesame")
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            server.client(api_key="wrong").models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert server.client(api_key="sesame").models.list().data[0].id == base_run.name
    finally:
        server.stop()


def test_a_prompt_longer_than_the_context_is_cut_from_the_left(base, base_run):
    long = "ROMEO: " * 20  # 140 characters, a context of 64
    got = base.client().completions.create(model=base_run.name, prompt=long, max_tokens=5, temperature=0)
    same = base.client().completions.create(model=base_run.name, prompt=long[-64:], max_tokens=5, temperature=0)
    assert got.choices[0].text == same.choices[0].text and got.usage.prompt_tokens == 140


# ----------------------------------------------------------------------------- load

@pytest.mark.slow
def test_sixteen_concurrent_streams_all_complete_and_models_answers_meanwhile(base, base_run):
    """/v1/models answers while sixteen generations run: after every stream's first token and before any stream's
    last. An order, not a time, so that a busy machine cannot fail it: 240 tokens each leave it a second when quiet,
    and load slows the generations as much as the answer."""
    begun = threading.Semaphore(0)

    def stream(i):
        chunks = []
        for chunk in base.client().completions.create(model=base_run.name, prompt="ROMEO:", max_tokens=240,
                                                      temperature=1.0, seed=i, stream=True):
            if not chunks:
                begun.release()
            chunks.append(chunk)
        return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason, time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(stream, i) for i in range(16)]
        assert all(begun.acquire(timeout=120) for _ in range(16))  # sixteen generations under way
        assert base.client().models.list().data
        answered = time.monotonic()
        results = [f.result(timeout=300) for f in futures]
    assert all(end == "length" and len(text) == 240 for text, end, _ in results)
    assert answered < min(ended for _, _, ended in results), "/v1/models waited for a generation to end"
    single = [base.client().completions.create(model=base_run.name, prompt="ROMEO:", max_tokens=240, temperature=1.0,
                                               seed=i).choices[0].text for i in (3, 11)]
    assert single == [results[3][0], results[11][0]]  # interleaved with fifteen others: the same text as alone


@pytest.mark.slow
def test_a_client_that_disconnects_mid_stream_stops_its_generation(base_run):
    server = Server(f"--out_dir={base_run}", "--max_tokens=100000")
    try:
        stream = server.client().completions.create(model=base_run.name, prompt="ROMEO:", max_tokens=100000, stream=True)
        for i, _ in enumerate(stream):
            if i == 20:
                break
        stream.close()
        deadline = time.monotonic() + 60  # only against a hang: it notices at its next token, not within a set time
        while "a client went away" not in server.log()[1] and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        code, _, err = server.stop()
    assert "a client went away: its generation stopped after" in err
    tokens = int(err.split("stopped after ")[1].split()[0])
    assert tokens < 5000
    assert code == 0 and "Traceback" not in err


def test_it_binds_to_loopback_by_default_and_says_when_it_does_not(base_run):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "tools/serve.py", f"--out_dir={base_run}", "--host=0.0.0.0",
                             f"--port={port}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if "reachable from the network" in line:
                assert "--api_key=KEY asks for a key" in line
                break
            assert "serving" in line, line
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    with socket.socket() as s:  # a port taken: one line, before loading the model
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = subprocess.run([sys.executable, "tools/serve.py", f"--out_dir={base_run}", f"--port={s.getsockname()[1]}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: cannot listen on 127.0.0.1:") and "Traceback" not in r.stderr


def test_without_fastapi_or_uvicorn_it_names_the_requirements_file(base_run, tmp_path):
    from conftest import assert_one_line_error
    for package in ("fastapi", "uvicorn"):
        hidden = tmp_path / package
        hidden.mkdir()
        (hidden / f"{package}.py").write_text("raise ImportError('not installed (simulated)')\n")
        r = run_script("tools/serve.py", f"--out_dir={base_run}", env={"PYTHONPATH": str(hidden)})
        assert_one_line_error(r, f"tools/serve.py needs the {package} package: pip install -r "
                                 f"requirements-optional.txt (FastAPI and uvicorn)")


def test_localhost_listens_on_127_0_0_1_where_clients_point(monkeypatch):
    """getaddrinfo lists ::1 first for localhost on macOS and Fedora: a server there on IPv6 alone refused the clients
    that hard-code 127.0.0.1 (lm-eval's base_url); uvicorn itself binds IPv4 unless the host has a ':'."""
    from tools.serve import listen
    real = socket.getaddrinfo

    def getaddrinfo(host, port, family=0, *args, **kwargs):  # as on macOS: IPv6 first when any family will do
        found = real(host, port, family, *args, **kwargs)
        if family == 0 and host == "localhost":
            found = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0))] + found
        return found
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    sock = listen("localhost", free_port())
    try:
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


def test_the_serving_line_comes_once_a_client_can_connect(base_run):
    """A script that waits for the "serving" line and then sends its request is answered (the line came ~50 ms
    before uvicorn listened: connection refused, 3 tries in 3)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "tools/serve.py", f"--out_dir={base_run}", f"--port={port}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().startswith("serving"), "no serving line"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=60) as r:  # at once: no retry
            assert r.status == 200 and json.loads(r.read())["data"][0]["id"] == base_run.name
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_ctrl_c_stops_it_cleanly(base_run):
    server = Server(f"--out_dir={base_run}")
    code, out, err = server.stop()
    assert code == 0 and "server stopped" in out and "Traceback" not in err


# ----------------------------------------------------------------------------- the chat page, in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]


@contextlib.contextmanager
def chromium_page():
    """A page of Debian's headless chromium, driven by Playwright (no browser download)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_chat_page_streams_a_reply_in_a_real_browser(chat, tmp_path):
    with chromium_page() as page:
        page.goto(chat.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny-chat'")
        assert "chat model" in page.inner_text("#info") and page.is_visible("#system")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "20")
        page.fill("#message", "who is Romeo?")
        page.press("#message", "Enter")
        page.wait_for_selector(".assistant[data-done='1']", state="attached", timeout=60_000)
        reply = page.inner_text(".assistant .text")
        labels = page.eval_on_selector_all(".turn .who", "els => els.map(e => e.textContent)")
        assert page.inner_text(".user") == "you: who is Romeo?"
        page.screenshot(path=str(tmp_path / "chat.png"))
    expected = chat.client().chat.completions.create(model="tiny-chat", temperature=0, max_tokens=20,
                                                     messages=[{"role": "user", "content": "who is Romeo?"}])
    assert reply == expected.choices[0].message.content and reply and labels == ["you: ", "model: "]
    assert (tmp_path / "chat.png").stat().st_size > 1000
    if os.environ.get("SCREENSHOT_TO"):  # how docs/chat_page.png is made
        shutil.copy(tmp_path / "chat.png", os.environ["SCREENSHOT_TO"])


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_chat_page_of_a_base_model_has_no_system_prompt_and_labels_both_turns(base, base_run):
    with chromium_page() as page:
        page.goto(base.url + "/")
        page.wait_for_function(f"document.getElementById('model').textContent === {json.dumps(base_run.name)}")
        assert page.inner_text("#info").startswith("base model: continues your text")
        assert not page.is_visible("#system") and not page.is_visible("label[for=system]")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "12")
        page.fill("#message", "ROMEO:")
        page.press("#message", "Enter")
        page.wait_for_selector(".assistant[data-done='1']", state="attached", timeout=60_000)
        turns = page.eval_on_selector_all(".turn", "els => els.map(e => [e.className, e.querySelector('.who')"
                                                   ".textContent, e.querySelector('.text').textContent])")
    expected = base.client().completions.create(model=base_run.name, prompt="ROMEO:", temperature=0, max_tokens=12)
    assert turns == [["turn user", "you: ", "ROMEO:"], ["turn assistant", "model: ", expected.choices[0].text]]
    assert expected.choices[0].text


def test_bench_serve_counts_the_tokens_the_server_generated_and_a_p90_at_or_above_the_median(base_run):
    """tools/bench_serve.py: tokens/s from the server's usage counts (requests/s x max_tokens for a model without a
    stop token), and the 90th percentile by nearest rank (it took the smallest of two values for the p90 of two)."""
    from tools import bench_serve
    assert [bench_serve.p90(v) for v in ([1.0, 2.0], [float(i) for i in range(1, 11)], [5.0])] == [2.0, 9.0, 5.0]
    with pytest.MonkeyPatch.context() as patch:  # streams that stop early (a stop token): 3 tokens each, not 6
        patch.setattr(bench_serve, "stream_one", lambda port, tokens, seed: (0.001, 3, 0.002))
        rps, _, _, tps = bench_serve.load(0, clients=2, requests=2, tokens=6)
    assert tps == pytest.approx(3 * rps)
    r = run_script("tools/bench_serve.py", f"--out_dir={base_run}", "--tokens=6", "--requests=2", "--clients=1,2")
    assert r.returncode == 0, r.stderr
    assert "a server for this benchmark (it stops when the benchmark ends): serving" in r.stdout
    assert "each client streams 2 completions of 6 tokens, one after another" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [row[0] for row in rows] == ["1", "2"], r.stdout
    for _, rps, median, _, ninety, _, tps in rows:
        assert float(ninety) >= float(median)
        assert float(tps) == pytest.approx(6 * float(rps), abs=0.6), r.stdout
