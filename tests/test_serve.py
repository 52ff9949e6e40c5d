"""`lowc serve`'s app on loopback: uvicorn in a thread, httpx clients, every loop and wait bounded."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest import randomize_weights  # noqa: E402

from lowc.runtime.engine import Engine  # noqa: E402
from lowc.runtime.generate import SamplingConfig, generate  # noqa: E402
from lowc.runtime.load import load  # noqa: E402
from lowc.runtime.serve import ServeLimits, create_app  # noqa: E402

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}the{% endif %}")
TIMEOUT = httpx.Timeout(30.0)


class Served:
    """A uvicorn server for `app` on 127.0.0.1, a free port, in a daemon thread."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Served":
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive(), "uvicorn did not stop"

    def __exit__(self, *exc) -> None:
        if self.thread.is_alive():
            self.stop()


class SlowEngine(Engine):
    """Decode steps take at least 20 ms, so requests stay in flight long enough to observe."""

    def _decode_step(self) -> None:
        time.sleep(0.02)
        super()._decode_step()


@pytest.fixture(scope="module")
def chat_model_dir(tiny_llama, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "tiny-chat"
    shutil.copytree(tiny_llama, path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE, "bos_token": "[PAD]"}))
    return path


@pytest.fixture(scope="module")
def model(chat_model_dir):
    return randomize_weights(load(chat_model_dir))


def sse_events(text: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded (except the final [DONE])."""
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_health_models_and_completions(model):
    engine = Engine(model, max_batch=4)
    with Served(create_app(engine, "tiny", ServeLimits(max_tokens=64))) as s, httpx.Client(base_url=s.url,
                                                                                          timeout=TIMEOUT) as c:
        assert c.get("/health").json()["status"] == "ok"
        assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"
        expected = generate(model, "the city of", SamplingConfig(max_new_tokens=10))
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "the city of", "max_tokens": 10,
                                            "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["choices"][0]["text"] == expected
        assert body["usage"]["prompt_tokens"] == 3 and body["choices"][0]["finish_reason"] in ("length", "stop")
        # token-id prompts and stop strings
        r = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0, "stop": ["zz"]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5
        # chat, through the template in tokenizer_config.json, streamed and not
        messages = [{"role": "system", "content": "the"}, {"role": "user", "content": [{"type": "text",
                                                                                        "text": "city of"}]}]
        r = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        reply = r.json()["choices"][0]["message"]
        assert reply["role"] == "assistant" and reply["content"]
        r = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0,
                                                 "stream": True, "stream_options": {"include_usage": True}})
        events = sse_events(r.text)
        assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"]) == \
            reply["content"]
        assert events[-2]["usage"]["completion_tokens"] == 6


def test_concurrent_streams_all_complete(model):
    prompts = [" ".join(["the", "city", "of", "school", "time", "world"][: 1 + i % 6]) + " was" for i in range(12)]
    expected = [generate(model, p, SamplingConfig(max_new_tokens=12, stop_at_eos=False)) for p in prompts]
    engine = Engine(model, max_batch=4)  # 12 streams, 4 slots: continuous batching does the rest

    async def stream(client, prompt):
        text, finish, done = "", None, False
        async with client.stream("POST", "/v1/completions", json={
                "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True, "ignore_eos": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
        return text, finish, done

    async def main(url):
        async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as client:
            return await asyncio.wait_for(asyncio.gather(*(stream(client, p) for p in prompts)), timeout=45)

    with Served(create_app(engine, "tiny", ServeLimits(max_concurrent=32))) as s:
        results = asyncio.run(main(s.url))
    for (text, finish, done), exp in zip(results, expected):
        assert done and finish == "length" and text == exp


def test_bad_requests_get_4xx(model):
    engine = Engine(model, max_batch=2)
    limits = ServeLimits(max_tokens=32, max_prompt_tokens=20)
    bad = [
        ({"max_tokens": 4}, 400, "prompt"),  # missing prompt
        ({"prompt": "the", "max_tokens": 33}, 400, "max_tokens"),  # over the server's limit
        ({"prompt": "the", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "the", "temperature": -0.5}, 400, "temperature"),
        ({"prompt": "the", "top_p": 1.5}, 400, "top_p"),
        ({"prompt": "the " * 25, "max_tokens": 4}, 400, "prompt"),  # too long a prompt
        ({"prompt": [1, 2, 10_000]}, 400, "prompt"),  # token id outside the vocabulary
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": ["a", "b"]}, 400, "prompt"),
        ({"prompt": "the", "n": 3}, 400, "n"),
        ({"prompt": "the", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"prompt": "the", "max_tokens": "many"}, 400, "max_tokens"),
        ([1, 2, 3], 400, None),
    ]
    with Served(create_app(engine, "tiny", limits)) as s, httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
        for body, status, param in bad:
            r = c.post("/v1/completions", json=body)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"] == "invalid_request_error" and err["param"] == param, (body, err)
        r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = c.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "hi"}]})
        assert r.status_code == 400
        assert c.get("/v1/nothing").status_code == 404
        # unknown fields and another model name are tolerated
        r = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 2, "model": "gpt-x", "user": "u1",
                                            "something_new": {"a": 1}})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
        assert c.get("/health").json()["status"] == "ok"


def test_chat_without_template_is_501(model):
    engine = Engine(model)
    with Served(create_app(engine, "tiny", chat_template=None)) as s, httpx.Client(base_url=s.url,
                                                                                  timeout=TIMEOUT) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 501 and "chat template" in r.json()["error"]["message"]


def test_429_over_max_concurrent(model):
    engine = SlowEngine(model, max_batch=4)
    body = {"prompt": "the city", "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True}
    with Served(create_app(engine, "tiny", ServeLimits(max_concurrent=2))) as s, \
            httpx.Client(base_url=s.url, timeout=TIMEOUT) as c1, httpx.Client(base_url=s.url, timeout=TIMEOUT) as c2:
        with c1.stream("POST", "/v1/completions", json=body) as r1, c2.stream("POST", "/v1/completions",
                                                                             json=body) as r2:
            assert r1.status_code == 200 and r2.status_code == 200
            r3 = httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, timeout=TIMEOUT)
            assert r3.status_code == 429 and r3.json()["error"]["type"] == "rate_limit_error"
            for r in (r1, r2):
                assert sse_events(r.read().decode())[-1] == "[DONE]"
        r4 = httpx.post(s.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=TIMEOUT)
        assert r4.status_code == 200  # capacity is back once they finished


def test_graceful_shutdown_ends_streams_cleanly(model):
    engine = SlowEngine(model, max_batch=4)
    app = create_app(engine, "tiny", ServeLimits(shutdown_grace_s=0.2))
    body = {"prompt": "the school", "max_tokens": 100, "temperature": 0, "ignore_eos": True, "stream": True}
    with Served(app) as s, httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
            app.state.begin_shutdown()  # what Ctrl-C / SIGTERM does in `lowc serve`
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "abort"
        assert c.post("/v1/completions", json={"prompt": "the"}).status_code == 503
        assert c.get("/health").status_code == 503
        s.stop()
    assert not engine.running
