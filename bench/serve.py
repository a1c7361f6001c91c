"""Serving many adapters on one base: `deltatune serve` vs PEFT + transformers, and llama.cpp for the base model.

Workload: the embedded SmolLM2-135M-Instruct, 8 random non-zero LoRA adapters (r=16, alpha=32, all linear layers,
as the demo trains), prompts from the demo task rendered with the chat template, request i on adapter i mod 8,
greedy, `MAX_TOKENS` new tokens at most. All in the precision `deltatune generate` picks (bf16 on CPUs with native
bf16), on the same machine, in one run:
- deltatune serve: a real server process (uvicorn) and an asyncio load generator keeping CONCURRENCY requests in
  flight over HTTP. Throughput, p50 / p95 latency, errors.
- PEFT one by one: `PeftModel.set_adapter` + `generate` per request (sequential, so a subset gives its throughput).
- PEFT batched: `generate(adapter_names=...)` on left-padded batches of CONCURRENCY mixed-adapter requests.
- base model, one request at a time: decode tokens/s (streamed: first text chunk to the end) and end-to-end
  tokens/s, for deltatune serve (bf16, and --int8) and llama.cpp's server (`llama-cpp-python[server]`, the embedded
  Q4_1 GGUF file, same prompt text through /v1/completions; a python with it installed via
  DELTATUNE_BENCH_LLAMA_PYTHON). llama-cpp-python keeps the previous prompt's KV and reuses the common prefix (the
  chat template's system prompt): that shortens its prefill, not its decode.
- how exact --int8 is: next-token agreement with the fp32 model, beside bf16's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import environment, write

ADAPTERS, RANK, MAX_TOKENS, CONCURRENCY = 8, 16, 32, 32
LLAMA_PYTHON_ENV = "DELTATUNE_BENCH_LLAMA_PYTHON"  # a python with llama-cpp-python[server], if not this one
# llama.cpp's server with its "extra buffer types" off: on CPUs with AMX, ggml's AMX matmul segfaults in this VM
# (SIGSEGV in ggml_backend_amx_mul_mat on the first decode); with them off it runs its AVX-512 kernels.
LLAMA_SERVER = """
import runpy, llama_cpp.llama_cpp as low
default_params = low.llama_model_default_params
def params():
    p = default_params()
    p.use_extra_bufts = False
    return p
low.llama_model_default_params = params
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


def make_adapters(root: Path, count: int) -> list[str]:
    import deltatune
    from deltatune.train.models import load_model

    model, _ = load_model("smollm2-135m")
    names = []
    for i in range(count):
        name = f"adapter{i}"
        torch.manual_seed(i)
        deltatune.attach(model, deltatune.config("lora", r=RANK, alpha=2 * RANK, targets="all-linear",
                                                 init="random"), name)
        with torch.no_grad():  # random but mild: the adapted model still writes text
            for pname, p in deltatune.named_trainable_parameters(model):
                if f".{name}.lora_B" in pname:
                    p.mul_(0.05)
        deltatune.save(model, root / name, name=name)
        deltatune.delete(model, name)
        names.append(name)
    return names


def workload(count: int, names: list[str]) -> list[tuple[str, str]]:
    """(prompt text with the chat template applied, adapter) per request."""
    from transformers import AutoTokenizer

    from deltatune.train.demo_task import DATA_DIR
    from deltatune.train.models import model_directory

    tokenizer = AutoTokenizer.from_pretrained(model_directory("smollm2-135m"))
    records = [json.loads(line) for line in (DATA_DIR / "train.jsonl").read_text().splitlines()]
    texts = [tokenizer.apply_chat_template(r["messages"][:1], tokenize=False, add_generation_prompt=True)
             for r in records]
    return [(texts[i % len(texts)], names[i % len(names)]) for i in range(count)]


# ---- servers over HTTP ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def server(command: list[str], port: int, timeout: float = 300.0):
    import httpx

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


async def _load(url: str, jobs: list[tuple[str, str]], concurrency: int) -> dict:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    latencies, tokens, errors = [], [], []

    async def one(client, prompt: str, model: str) -> None:
        async with gate:
            start = time.perf_counter()
            body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            try:
                response = await client.post(f"{url}/v1/completions", json=body)
                if response.status_code != 200:
                    errors.append(response.status_code)
                    return
                tokens.append(response.json()["usage"]["completion_tokens"])
                latencies.append(time.perf_counter() - start)
            except httpx.HTTPError as exc:
                errors.append(type(exc).__name__)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, p, m) for p, m in jobs))
        wall = time.perf_counter() - start
    return _summary(len(jobs), wall, tokens, latencies, errors)


def _summary(requests: int, wall: float, tokens: list[int], latencies: list[float], errors: list) -> dict:
    ordered = sorted(latencies) or [float("nan")]
    return {"requests": requests, "errors": len(errors), "error_kinds": sorted(set(map(str, errors))),
            "wall_s": wall, "requests_per_s": len(latencies) / wall, "tokens_per_s": sum(tokens) / wall,
            "completion_tokens": sum(tokens), "p50_s": ordered[len(ordered) // 2],
            "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]}


async def _decode_rate(url: str, jobs: list[tuple[str, str]]) -> dict:
    """One request at a time: each job once whole (end-to-end latency, tokens) and once streamed, where the time
    from the first text chunk to the end is decode time: decode tokens/s = sum(tokens - 1) / sum(decode time)."""
    import httpx

    latencies, tokens, decode_s, errors = [], [], 0.0, []
    async with httpx.AsyncClient(timeout=600) as client:
        for prompt, model in jobs:
            body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            start = time.perf_counter()
            response = await client.post(f"{url}/v1/completions", json=body)
            if response.status_code != 200:
                errors.append(response.status_code)
                continue
            latencies.append(time.perf_counter() - start)
            tokens.append(response.json()["usage"]["completion_tokens"])
            first = None
            async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as stream:
                async for line in stream.aiter_lines():
                    if line.startswith("data: {") and first is None and json.loads(line[6:])["choices"][0]["text"]:
                        first = time.perf_counter()
            if first is None:  # a failed or empty stream: no decode time to count
                errors.append("stream without text")
                continue
            decode_s += time.perf_counter() - first
    summary = _summary(len(jobs), sum(latencies), tokens, latencies, errors)
    summary["decode_tokens_per_s"] = sum(t - 1 for t in tokens) / decode_s if decode_s else float("nan")
    return summary


def _serve_command(root: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deltatune.cli", "serve", "--base", "smollm2-135m", "--adapter-root", str(root),
            "--max-loaded", str(ADAPTERS), "--port", str(port), "--max-batch", str(CONCURRENCY),
            "--max-concurrent", str(4 * CONCURRENCY), "--log-level", "warning", *extra]


def deltatune_serve(root: Path, jobs, base_jobs) -> dict:
    """The mixed-adapter load (bf16 weights), then the base model one request at a time, bf16 and --int8."""
    port = _free_port()
    with server(_serve_command(root, port), port) as url:
        asyncio.run(_load(url, jobs[:ADAPTERS], ADAPTERS))  # warm-up: loads every adapter once
        mixed = asyncio.run(_load(url, jobs, CONCURRENCY))
        sequential_base = asyncio.run(_decode_rate(url, base_jobs))
    port = _free_port()
    with server(_serve_command(root, port, "--int8"), port) as url:
        asyncio.run(_load(url, base_jobs[:1], 1))
        int8_base = asyncio.run(_decode_rate(url, base_jobs))
    return {"mixed": mixed, "base_one_at_a_time": sequential_base, "base_one_at_a_time_int8": int8_base}


def llama_cpp(base_jobs) -> dict:
    from deltatune.train.models import EMBEDDED, _package_dir

    python = os.environ.get(LLAMA_PYTHON_ENV, sys.executable)
    check = subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True, text=True, check=False)
    if check.returncode != 0:
        return {"available": False, "reason": f"llama-cpp-python[server] not importable by {python} "
                                              f"(set {LLAMA_PYTHON_ENV}): {check.stderr.strip()[-300:]}"}
    entry = EMBEDDED["smollm2-135m"]
    gguf = _package_dir(entry, "smollm2-135m") / entry.relative
    port = _free_port()
    command = [python, "-c", LLAMA_SERVER, "--model", str(gguf), "--model_alias", "smollm2-135m", "--host",
               "127.0.0.1", "--port", str(port), "--n_threads", str(torch.get_num_threads()), "--n_ctx", "2048",
               "--verbose", "false"]
    try:
        with server(command, port) as url:
            asyncio.run(_load(url, base_jobs[:1], 1))
            result = asyncio.run(_decode_rate(url, base_jobs))
    except RuntimeError as exc:
        return {"available": False, "reason": f"llama.cpp server failed: {exc}"}
    if not result["completion_tokens"]:
        return {"available": False, "reason": f"every request to llama.cpp failed ({result['error_kinds']})"}
    return {"available": True, "weights": "Q4_1 GGUF (4-bit), AVX-512, no AMX", **result}


# ---- PEFT + transformers in this process ----------------------------------------------------------------------------
def _peft_model(root: Path, names: list[str]):
    from peft import PeftModel

    from deltatune.train.interactive import load_for_inference

    model, tokenizer, autocast = load_for_inference("smollm2-135m")
    model = PeftModel.from_pretrained(model, root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(root / name, adapter_name=name)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer, autocast


def _generated(rows: torch.Tensor, eos: set[int]) -> int:
    count = 0
    for row in rows.tolist():
        count += next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
    return count


@torch.no_grad()
def peft_runs(root: Path, names: list[str], jobs, one_by_one: int, batched: int) -> dict:
    from deltatune.train.evaluate import stop_token_ids

    model, tokenizer, autocast = _peft_model(root, names)
    eos = set(stop_token_ids(model, tokenizer))
    settings = {"max_new_tokens": MAX_TOKENS, "do_sample": False, "eos_token_id": sorted(eos),
                "pad_token_id": tokenizer.pad_token_id}
    latencies, tokens = [], []
    start = time.perf_counter()
    for prompt, name in jobs[:one_by_one]:
        began = time.perf_counter()
        model.set_adapter(name)
        inputs = tokenizer(prompt, return_tensors="pt")
        with autocast():
            out = model.generate(**inputs, **settings)
        tokens.append(_generated(out[:, inputs["input_ids"].shape[1]:], eos))
        latencies.append(time.perf_counter() - began)
    sequential = _summary(one_by_one, time.perf_counter() - start, tokens, latencies, [])
    latencies, tokens = [], []
    start = time.perf_counter()
    for first in range(0, batched, CONCURRENCY):
        chunk = jobs[first:first + CONCURRENCY]
        began = time.perf_counter()
        inputs = tokenizer([p for p, _ in chunk], return_tensors="pt", padding=True)
        with autocast():
            out = model.generate(**inputs, adapter_names=[n for _, n in chunk], **settings)
        tokens.append(_generated(out[:, inputs["input_ids"].shape[1]:], eos))
        latencies += [time.perf_counter() - began] * len(chunk)
    return {"one_by_one": sequential, "batched": _summary(batched, time.perf_counter() - start, tokens, latencies, [])}


@torch.no_grad()
def int8_agreement(records: int = 20) -> dict:
    """How exact --int8 is: teacher-forced next-token (top-1) agreement with the fp32 model on demo conversations,
    beside the same figure for bf16 weights."""
    from deltatune.train.demo_task import DATA_DIR
    from deltatune.train.interactive import load_for_inference

    reference, tokenizer, _ = load_for_inference("smollm2-135m", precision="fp32")
    others = {"bf16": load_for_inference("smollm2-135m", precision="bf16")[0],
              "int8": load_for_inference("smollm2-135m", precision="bf16", int8=True)[0]}
    lines = (DATA_DIR / "train.jsonl").read_text().splitlines()[:records]
    agree, total = dict.fromkeys(others, 0), 0
    for line in lines:
        text = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        expected = reference(ids).logits.argmax(-1)
        total += expected.numel()
        for name, model in others.items():
            agree[name] += int((model(ids).logits.argmax(-1) == expected).sum())
    return {"tokens": total, **{f"{name}_vs_fp32": count / total for name, count in agree.items()}}


# ---- the report -----------------------------------------------------------------------------------------------------
def run(quick: bool = False) -> dict:
    requests, one_by_one, batched, base_requests = (64, 6, 32, 3) if quick else (500, 48, 128, 16)
    root = Path(tempfile.mkdtemp(prefix="deltatune-serve-bench-"))
    try:
        names = make_adapters(root, ADAPTERS)
        jobs = workload(requests, names)
        base_jobs = [(prompt, "smollm2-135m") for prompt, _ in jobs[:base_requests]]  # the base model, by name
        ours = deltatune_serve(root, jobs, base_jobs)
        print("deltatune serve:", json.dumps(ours), flush=True)  # long runs: show each part as it ends
        peft = peft_runs(root, names, jobs, one_by_one, batched)
        print("PEFT:", json.dumps(peft), flush=True)
        llama = llama_cpp(base_jobs)
        agreement = int8_agreement()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results = {"deltatune_serve": ours, "peft": peft, "llama_cpp": llama, "int8_agreement": agreement,
               "settings": {"requests": requests, "adapters": ADAPTERS, "rank": RANK, "max_tokens": MAX_TOKENS,
                            "concurrency": CONCURRENCY, "peft_one_by_one_requests": one_by_one,
                            "peft_batched_requests": batched, "base_requests": base_requests}}
    mixed = ours["mixed"]
    results["ratios"] = {
        "vs_peft_one_by_one": mixed["requests_per_s"] / peft["one_by_one"]["requests_per_s"],
        "vs_peft_batched": mixed["requests_per_s"] / peft["batched"]["requests_per_s"],
        **{f"base_decode_{kind}_vs_llama_cpp": (ours[key]["decode_tokens_per_s"] / llama["decode_tokens_per_s"]
                                                if llama.get("available") else None)
           for kind, key in (("bf16", "base_one_at_a_time"), ("int8", "base_one_at_a_time_int8"))},
    }
    write("serve", {"environment": environment(), "results": results}, _table(results, quick))
    return results


def _table(r: dict, quick: bool) -> str:
    s, ours, peft, llama = r["settings"], r["deltatune_serve"], r["peft"], r["llama_cpp"]
    rows = [("deltatune serve, concurrency 32 over HTTP", ours["mixed"]),
            ("PEFT + transformers generate, one by one", peft["one_by_one"]),
            ("PEFT batched generate (adapter_names, batches of 32)", peft["batched"])]
    lines = [(f"# Serving {s['adapters']} LoRA adapters (r={s['rank']}, all-linear) on SmolLM2-135M"
              f"{' (quick)' if quick else ''}"), "",
             (f"torch {environment()['torch']}, {environment()['threads']} threads; greedy, max_tokens "
              f"{s['max_tokens']}; {s['requests']} requests for deltatune serve, the first "
              f"{s['peft_one_by_one_requests']} / {s['peft_batched_requests']} for PEFT one by one / batched. "
              "The systems run one after another: load from other processes shifts the ratios."), "",
             "| system | requests | errors | req/s | tokens/s | p50 latency (s) | p95 latency (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['requests']} | {m['errors']} | {m['requests_per_s']:.3f} | "
                     f"{m['tokens_per_s']:.1f} | {m['p50_s']:.2f} | {m['p95_s']:.2f} |")
    ratios = r["ratios"]
    lines += ["", (f"Throughput vs PEFT one by one: **{ratios['vs_peft_one_by_one']:.2f}×** (target ≥ 3×); "
                   f"vs PEFT batched: **{ratios['vs_peft_batched']:.2f}×** (target > 1×)."), "",
              ("Base model, one request at a time, same prompt text: decode tokens/s (streamed; first text chunk "
               "to the end) and end-to-end tokens/s (prefill included):"), "",
              "| system | decode tokens/s | end-to-end tokens/s | p50 latency (s) |", "|---|---|---|---|"]
    base_rows = [("deltatune serve, bf16 weights", ours["base_one_at_a_time"]),
                 ("deltatune serve --int8", ours["base_one_at_a_time_int8"])]
    if llama.get("available"):
        base_rows.append((f"llama.cpp server ({llama['weights']})", llama))
    for name, m in base_rows:
        lines.append(f"| {name} | {m['decode_tokens_per_s']:.1f} | {m['tokens_per_s']:.1f} | {m['p50_s']:.2f} |")
    if llama.get("available"):
        lines += ["", (f"Decode tokens/s vs llama.cpp: bf16 **{ratios['base_decode_bf16_vs_llama_cpp']:.2f}×**, "
                       f"--int8 **{ratios['base_decode_int8_vs_llama_cpp']:.2f}×**.")]
    else:
        lines += ["", f"llama.cpp: not measured ({llama['reason']})"]
    a = r["int8_agreement"]
    lines += ["", (f"How exact --int8 is: next-token agreement with the fp32 model over {a['tokens']} teacher-forced "
                   f"demo tokens: int8 {a['int8_vs_fp32']:.1%}, bf16 {a['bf16_vs_fp32']:.1%}.")]
    return "\n".join(lines) + "\n"
