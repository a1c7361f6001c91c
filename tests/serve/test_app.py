"""The HTTP API in-process: OpenAI routes and streaming, auth, adapter management, limits and JSON errors."""

from __future__ import annotations

import json
import shutil

import pytest
from starlette.testclient import TestClient

from deltatune.serve.app import Settings, create_app
from deltatune.serve.protocol import Limits

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client_for(make_engine):
    clients = []

    def make(api_key: str | None = KEY, **settings) -> TestClient:
        engine = make_engine(max_loaded=2)
        settings.setdefault("limits", Limits(max_tokens=32, max_context=256))
        client = TestClient(create_app(engine, Settings(base_name="tiny", api_key=api_key, **settings)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(client_for) -> TestClient:
    return client_for()


def chat(client, model="a0", headers=AUTH, **extra):
    return client.post("/v1/chat/completions", headers=headers,
                       json={"model": model, "messages": CHAT, "max_tokens": 8, "temperature": 0, **extra})


def sse_events(response) -> list:
    lines = [line for line in response.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def assert_error(response, status: int, words: str = "") -> None:
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert words.lower() in error["message"].lower() and error["type"]


def test_chat_and_completions_answer_in_openai_shape(client):
    body = chat(client).json()
    assert body["object"] == "chat.completion" and body["model"] == "a0"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8
    text = client.post("/v1/completions", headers=AUTH,
                       json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}).json()
    assert text["object"] == "text_completion" and text["choices"][0]["text"]
    assert chat(client).json()["choices"][0] == choice  # greedy: the same answer again


def test_streaming_sends_the_same_text_as_one_response(client):
    whole = chat(client).json()["choices"][0]["message"]["content"]
    response = chat(client, stream=True, stream_options={"include_usage": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert streamed == whole
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 8


def test_models_lists_the_base_and_adapters(client):
    chat(client, model="a1")  # found under the adapter root on first use
    ids = [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]]
    assert ids[0] == "tiny" and "a1" in ids
    assert client.get("/v1/models/a1", headers=AUTH).json()["parent"] == "tiny"
    assert_error(client.get("/v1/models/nope", headers=AUTH), 404)


def test_api_key_is_required_and_management_needs_one(client, client_for):
    assert_error(chat(client, headers={}), 401, "api key")
    assert_error(chat(client, headers={"Authorization": "Bearer wrong"}), 401)
    assert client.get("/health").status_code == 200
    open_server = client_for(api_key=None)
    assert chat(open_server, headers={}).status_code == 200
    assert_error(open_server.get("/v1/adapters"), 403, "--api-key")


def test_adapter_management_load_list_unload(client):
    assert client.post("/v1/adapters/load", headers=AUTH, json={"name": "a2"}).json() == {"name": "a2",
                                                                                         "loaded": True}
    listed = {a["name"]: a for a in client.get("/v1/adapters", headers=AUTH).json()["data"]}
    assert listed["a2"]["loaded"] and listed["a2"]["path"] == "a2"
    assert client.post("/v1/adapters/unload", headers=AUTH, json={"name": "a2"}).json()["loaded"] is False
    assert "a2" not in [a["name"] for a in client.get("/v1/adapters", headers=AUTH).json()["data"]]
    assert_error(client.post("/v1/adapters/unload", headers=AUTH, json={"name": "a2"}), 404)
    alias = client.post("/v1/adapters/load", headers=AUTH, json={"name": "sql", "path": "a2"})
    assert alias.status_code == 200 and chat(client, model="sql").status_code == 200


@pytest.mark.parametrize("name, path", [("x", "../a0"), ("x", "/etc"), ("../a0", None), ("a0/../a1", None),
                                        ("x", "a0/../../a0"), (".hidden", None), ("x", "nope")])
def test_no_request_reads_outside_the_adapter_root(client, name, path):
    body = {"name": name} if path is None else {"name": name, "path": path}
    response = client.post("/v1/adapters/load", headers=AUTH, json=body)
    assert_error(response, 400)
    assert_error(chat(client, model=name), 404)


def test_symlinks_out_of_the_root_are_refused(client, adapter_root, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(adapter_root / "a0", outside)  # a valid adapter, but not under the root
    (adapter_root / "escape").symlink_to(outside)
    try:
        assert_error(client.post("/v1/adapters/load", headers=AUTH, json={"name": "escape"}), 400, "leaves")
    finally:
        (adapter_root / "escape").unlink()


@pytest.mark.parametrize("body, words", [
    ({"messages": CHAT}, "model"),
    ({"model": "a0", "messages": []}, "messages"),
    ({"model": "a0", "messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"model": "a0", "messages": CHAT, "max_tokens": 33}, "max_tokens"),
    ({"model": "a0", "messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ({"model": "a0", "messages": CHAT, "temperature": "hot"}, "temperature"),
    ({"model": "a0", "messages": CHAT, "top_p": 0}, "top_p"),
    ({"model": "a0", "messages": CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "a0", "messages": CHAT, "n": 2}, "'n'"),
    ({"model": "a0", "messages": CHAT, "logprobs": True}, "logprobs"),
    ({"model": "a0", "messages": [{"role": "user", "content": "word " * 400}]}, "context"),
    ([1, 2], "object"),
])
def test_bad_requests_get_a_400_naming_the_problem(client, body, words):
    assert_error(client.post("/v1/chat/completions", headers=AUTH, json=body), 400, words)


def test_malformed_oversized_and_unknown_requests_are_json_errors(client_for):
    client = client_for(max_body_bytes=2000)
    assert_error(client.post("/v1/chat/completions", headers=AUTH, content=b"{not json"), 400, "json")
    assert_error(client.post("/v1/chat/completions", headers=AUTH, content=b"\xff\xfe"), 400, "json")
    big = {"model": "a0", "messages": [{"role": "user", "content": "x" * 5000}]}
    assert_error(client.post("/v1/chat/completions", headers=AUTH, json=big), 413)
    assert_error(chat(client, model="missing"), 404, "does not exist")
    assert_error(client.get("/v1/nothing-here"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)
    assert chat(client).status_code == 200, "the server keeps serving after errors"


def test_beyond_max_concurrent_requests_get_429(client_for):
    client = client_for(max_concurrent=1)
    gate = client.app.state.gate
    gate.count = 1  # one request in flight
    response = chat(client)
    assert_error(response, 429, "busy")
    assert response.headers["retry-after"] == "1"
    gate.count = 0
    assert chat(client).status_code == 200 and gate.count == 0


def test_engine_failures_are_json_500s(client, monkeypatch):
    engine = client.app.state.engine

    def boom(*args):
        raise RuntimeError("kaput")

    monkeypatch.setattr(engine, "_forward", boom)
    assert_error(chat(client), 500, "kaput")
    monkeypatch.undo()
    assert chat(client).status_code == 200
