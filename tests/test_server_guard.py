"""The server against hostile or careless clients: work off the event loop, prompts refused by their length before
tokenizing, Host header checks, slow clients cut off, bogus limits refused, one request cannot take the whole
batch, Ollama bodies without a JSON content type."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from server_util import LiveServer

import gemrun
from gemrun.engine import Engine, Token
from gemrun.generate import Prompt
from gemrun.prompt import PromptBuilder
from gemrun.sampling import SamplingParams

NAME = "gemma-3-270m-q4_k_m"
HELLO = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def model():
    return gemrun.load(dtype="bfloat16")


@pytest.fixture(scope="module")
def server(model):
    with LiveServer(lambda: model, header_timeout=1.0, body_timeout=1.0) as s:
        yield s


def test_prompt_work_runs_off_the_event_loop(server, monkeypatch):
    """A request whose tokenization blocks must not stall /health: tokenizing waits here until /health has
    answered, which it can only do if the event loop is free (the old server tokenized completions on it)."""
    answered, entered = threading.Event(), threading.Event()
    original = PromptBuilder.text

    def slow_text(self, text, bos=True):
        entered.set()
        answered.wait(30)
        return original(self, text, bos)

    monkeypatch.setattr(PromptBuilder, "text", slow_text)
    result = {}

    def completion():
        result["r"] = httpx.post(server.url + "/v1/completions", timeout=60,
                                 json={"model": NAME, "prompt": "The sea", "max_tokens": 2})

    worker = threading.Thread(target=completion)
    worker.start()
    assert entered.wait(30)
    try:
        health = httpx.get(server.url + "/health", timeout=10)
    finally:
        answered.set()
    worker.join(60)
    assert health.status_code == 200 and result["r"].status_code == 200


def test_prompt_too_long_by_its_bytes_is_refused_before_tokenizing(server, model, monkeypatch):
    calls = []
    monkeypatch.setattr(type(model.tokenizer), "encode", lambda *a, **k: calls.append(1) or [])
    text = "x" * (model.max_context * model.tokenizer.max_token_bytes + 1)
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": text, "max_tokens": 1}, timeout=60)
    assert r.status_code == 400 and "at least" in r.json()["error"]["message"] and not calls
    r = httpx.post(server.url + "/api/generate", json={"model": NAME, "prompt": text, "raw": True, "stream": False},
                   timeout=60)
    assert r.status_code == 400 and "context holds" in r.json()["error"] and not calls


def test_host_header(model, server):
    assert httpx.get(server.url + "/v1/models", headers={"host": "evil.example"}).status_code == 403
    assert httpx.get(server.url + "/api/tags", headers={"host": "evil.example:80"}).status_code == 403
    for host in ("localhost", f"localhost:{server.port}", "127.0.0.1", "[::1]:80", "app.localhost"):
        assert httpx.get(server.url + "/v1/models", headers={"host": host}).status_code == 200, host
    with LiveServer(lambda: model, allowed_hosts=["gemrun.internal"]) as s:
        assert httpx.get(s.url + "/v1/models", headers={"host": "gemrun.internal:8000"}).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers={"host": "evil.example"}).status_code == 403


def test_slow_clients_are_cut_off(server):
    """A request head trickled byte by byte is disconnected after the head deadline; a body that does not arrive
    gets 408."""
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"GET /health HTTP/1.1\r\n")
        closed = None
        for _ in range(60):  # one header byte every 0.1 s, forever
            try:
                s.sendall(b"X")
                if s.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        assert closed
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{")
        s.settimeout(30)
        assert s.recv(200).startswith(b"HTTP/1.1 408")


def test_bogus_limits_are_refused(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": NAME, "messages": HELLO,
                                                              "max_tokens": 10**18})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/api/chat", json={"model": NAME, "messages": HELLO, "stream": False,
                                                   "options": {"num_predict": 10**9}})
    assert r.status_code == 400


def test_ollama_routes_take_json_whatever_the_content_type(server):
    """`curl -d '{...}'` sends application/x-www-form-urlencoded, as Ollama's own docs do."""
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "Hi"}], "stream": false, ' \
           b'"options": {"num_predict": 2}}' % NAME.encode()
    r = httpx.post(server.url + "/api/chat", content=body,
                   headers={"content-type": "application/x-www-form-urlencoded"}, timeout=60)
    assert r.status_code == 200 and r.json()["done"]
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_one_request_cannot_take_every_batch_slot(model):
    """Four choices of one request on a batch of four leave a slot free, so another client starts at once."""
    eng = Engine(model, max_batch=4).start()
    try:
        params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        group = object()
        choices = [eng.submit(Prompt([2, 651, 5442]), params, set(), group=group) for _ in range(4)]
        other = eng.submit(Prompt([2, 651]), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), set())
        first = next(iter(other))
        assert isinstance(first, Token)
        # the other request got a token while at least one of the four choices was still waiting to start
        assert any(c.seq is None for c in choices)
    finally:
        eng.stop(1)


def test_a_stopped_app_lets_its_weights_go():
    """After shutdown an app holds no path to its model (FastAPI keeps route functions in a cache for the process's
    life, and their closures reach the app): the weights are freed once the caller drops them."""
    import gc
    import weakref

    held = [gemrun.load()]
    ref = weakref.ref(held[0])
    with LiveServer(lambda: held[0], cache_ram=0) as s:
        name = httpx.get(s.url + "/v1/models", timeout=600).json()["data"][0]["id"]
        assert httpx.post(s.url + "/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2},
                          timeout=600).status_code == 200
    held.clear()
    del s
    gc.collect()
    assert ref() is None
