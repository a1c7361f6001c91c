"""`deltatune serve` for real: a uvicorn process on a free port, spoken to over HTTP; and its command-line errors."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from deltatune.cli import main

KEY = "real-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 120.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError("server did not come up")


def test_a_real_server_answers_streams_and_survives_bad_requests(tiny_dir, adapter_root):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DELTATUNE_API_KEY": KEY}
    command = [sys.executable, "-m", "deltatune.cli", "serve", "--base", str(tiny_dir), "--adapter",
               f"first={adapter_root / 'a0'}", "--adapter-root", str(adapter_root), "--port", str(port),
               "--max-tokens", "16", "--max-concurrent", "8", "--log-level", "warning", "--precision", "fp32"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until_up(url, process)
        headers = {"Authorization": f"Bearer {KEY}"}

        def ask(model: str) -> httpx.Response:
            body = {"model": model, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 6,
                    "temperature": 0}
            return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)

        assert httpx.post(f"{url}/v1/chat/completions", content=b"][", headers=headers).status_code == 400
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, ["first", "a1", "tiny", "first", "a1", "tiny"]))
        assert [a.status_code for a in answers] == [200] * 6
        contents = [a.json()["choices"][0]["message"]["content"] for a in answers]
        assert contents[:3] == contents[3:] and len(set(contents[:3])) == 3

        body = {"model": "first", "prompt": "Hello", "max_tokens": 6, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=60) as stream:
            lines = [line for line in stream.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        assert httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"] == tiny_dir.name
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode == 0, "SIGTERM stops the server cleanly"


def test_a_port_in_use_is_one_error_line(tiny_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "deltatune.cli", "serve", "--base", str(tiny_dir), "--port", str(port),
                   "--precision", "fp32", "--log-level", "critical"]
        done = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                              timeout=120, check=False)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        f"deltatune: error: the HTTP server could not start on 127.0.0.1:{port} (see the log above); pick another "
        "--port or --host")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args, words", [
    (["--adapter", "nodir"], "NAME=DIR"),
    (["--adapter", "x=/definitely/missing"], "adapter directory"),
    (["--adapter", "../x=/tmp"], "invalid adapter name"),
    (["--adapter-root", "/definitely/missing"], "not a directory"),
])
def test_serve_refuses_bad_arguments_in_one_line(tiny_dir, capsys, args, words):
    assert main(["serve", "--base", str(tiny_dir), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
