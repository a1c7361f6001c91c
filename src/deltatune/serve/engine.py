"""The serving engine: one thread owns the model and runs continuous batching over many adapters.

Each iteration (`Engine.step`) runs queued management calls, admits waiting requests into free KV slots (each
prompt prefilled in its own forward, up to a token budget per step), then runs one decode step for every running
row at once. Rows carry their own adapter through `deltatune.per_sample` (the methods' gathered per-row kernels),
their own position and their own KV slot (`kvcache.RaggedCache`), so a request joins a running batch at any step
and leaves it as soon as it finishes. Greedy tokens are those of `model.generate` on the request alone (see
`kvcache`).

Results go back through each request's `emit` callback, called on the engine thread (the HTTP layer hands them
to its event loop). A failing forward fails the requests it carried, and the engine keeps serving.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import inspect
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core import api
from ..core.errors import DeltatuneError
from ..core.slot import get_state
from ..train.evaluate import stop_token_ids
from .adapters import AdapterStore
from .kvcache import KVPool, RaggedCache, prepare_model
from .sampling import SamplingParams, TextStream, choose_tokens

log = logging.getLogger("deltatune.serve")


@dataclass
class Event:
    """What a request hears from the engine: new text, and at the end a finish reason (or an error)."""

    text: str = ""
    finish_reason: str | None = None  # "stop", "length" or "cancelled" on the last event
    error: str | None = None
    status: int = 500
    prompt_tokens: int = 0
    completion_ids: list[int] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # public adapter name; None is the base model
    emit: Callable[[Event], None] = lambda event: None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class _Sequence:
    request: Request
    slot: int
    internal: str | None  # adapter name on the model
    stream: TextStream
    generator: torch.Generator | None
    length: int = 0  # tokens in the KV cache
    last: int = 0  # the token to feed next
    generated: list[int] = field(default_factory=list)
    done: bool = False


class Engine:
    """Continuous batching for one base model and its adapters. `start()` runs it on a thread; without a thread,
    `run(requests)` drives it synchronously (tests, benchmarks)."""

    def __init__(self, model: nn.Module, tokenizer, adapters: AdapterStore, *, autocast=None, max_batch: int = 32,
                 prefill_budget: int = 2048) -> None:
        if max_batch < 1:
            raise DeltatuneError(f"--max-batch must be >= 1, got {max_batch}")
        prepare_model(model)
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.autocast = autocast or contextlib.nullcontext
        self.max_batch, self.prefill_budget = max_batch, prefill_budget
        self.eos = set(stop_token_ids(model, tokenizer))
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.pool = KVPool(max_batch)
        self.free_slots = list(range(max_batch - 1, -1, -1))
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[_Sequence] = []
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled: set[str] = set()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.stats = collections.Counter()

    # ---- any thread -------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        self.inbox.put(request)
        self.wake.set()

    def cancel(self, request_id: str) -> None:
        with self.lock:
            self.cancelled.add(request_id)
        self.wake.set()

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future:
        """Run `fn` on the engine thread between steps (model changes: adapter load / unload)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if self.thread is None:
            _settle(future, fn)
        else:
            self.calls.put((future, fn))
            self.wake.set()
        return future

    def start(self) -> None:
        if self.thread is None:
            self.stopping = False
            self.thread = threading.Thread(target=self._loop, name="deltatune-engine", daemon=True)
            self.thread.start()

    def run_here(self, until: Callable[[], bool], first: Callable[[], object] | None = None) -> None:
        """Run the engine loop on the calling thread until `until()` returns True (checked at least every second);
        `first` runs once the engine counts as running (requests and calls from other threads are queued).

        `deltatune serve` runs the engine on the main thread and HTTP on a second one: torch's OpenMP workers
        answer the thread that loaded the model fastest; decoding from a second thread ran up to ~2x slower on CPU."""
        self.thread, self.stopping = threading.current_thread(), False
        try:
            if first is not None:
                first()
            while not self.stopping and not until():
                self._iterate()
        finally:
            self.thread = None

    def stop(self) -> None:
        if self.thread is not None and self.thread is not threading.current_thread():
            self.stopping = True
            self.wake.set()
            self.thread.join()
            self.thread = None
        self._take_inbox()
        for seq in list(self.running):
            self._fail(seq, "the server is shutting down", 503)
        while self.waiting:
            _emit(self.waiting.popleft(), Event(error="the server is shutting down", status=503))

    def run(self, requests: list[Request]) -> list[Event]:
        """Serve `requests` to completion and return each one's final event (text joined)."""
        results: dict[str, Event] = {}
        texts: dict[str, list[str]] = collections.defaultdict(list)
        done = threading.Event()

        def collector(request_id: str) -> Callable[[Event], None]:
            def emit(event: Event) -> None:
                texts[request_id].append(event.text)
                if event.final:
                    event.text = "".join(texts[request_id])
                    results[request_id] = event
                    if len(results) == len(requests):
                        done.set()
            return emit

        for request in requests:
            request.emit = collector(request.id)
            self.submit(request)
        if self.thread is not None:
            done.wait()
        while len(results) < len(requests):
            self.step()
        return [results[r.id] for r in requests]

    # ---- the engine thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self.stopping:
            self._iterate()

    def _iterate(self) -> None:
        try:
            busy = self.step()
        except Exception:  # a bug outside the guarded forward: log it, the loop must not die
            log.exception("engine iteration failed")
            busy = False
        if not busy:
            self.wake.wait(timeout=1.0)

    def step(self) -> bool:
        """One iteration: calls, admissions (prefill), one decode step. Returns whether work remains."""
        self.wake.clear()
        while not self.calls.empty():
            _settle(*self.calls.get())
        self._take_inbox()
        self._drop_cancelled()
        try:
            self._admit()
            if self.running:
                self._decode()
        except Exception as exc:  # a bug or an out-of-memory: fail the rows involved, keep serving
            log.exception("engine step failed")
            for seq in list(self.running):
                self._fail(seq, f"generation failed: {type(exc).__name__}: {exc}", 500)
        return bool(self.running or self.waiting or not self.inbox.empty())

    def _take_inbox(self) -> None:
        while not self.inbox.empty():
            self.waiting.append(self.inbox.get())

    def _drop_cancelled(self) -> None:
        with self.lock:
            cancelled, self.cancelled = self.cancelled, set()
        if not cancelled:
            return
        for request in [r for r in self.waiting if r.id in cancelled]:
            self.waiting.remove(request)
            _emit(request, Event(finish_reason="cancelled", prompt_tokens=len(request.prompt_ids)))
        for seq in [s for s in self.running if s.request.id in cancelled]:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        batch: list[_Sequence] = []
        tokens = 0
        for request in list(self.waiting):
            if not self.free_slots or (batch and tokens + len(request.prompt_ids) > self.prefill_budget):
                break
            try:
                internal = self.adapters.acquire(request.adapter) if request.adapter else None
            except Exception as exc:  # noqa: BLE001 -- a broken or mismatched adapter fails its own requests only
                self.waiting.remove(request)
                status = 422 if isinstance(exc, DeltatuneError) else 500
                _emit(request, Event(error=f"adapter {request.adapter!r} could not be loaded: {exc}", status=status))
                continue
            if request.adapter and internal is None:
                continue  # every loaded adapter is busy: wait for a row to finish
            self.waiting.remove(request)
            params = request.params
            batch.append(_Sequence(request, self.free_slots.pop(), internal,
                                   TextStream(self.tokenizer, params.stop), params.generator()))
            tokens += len(request.prompt_ids)
        if batch:
            self.running.extend(batch)
            self._prefill(batch)

    def _prefill(self, batch: list[_Sequence]) -> None:
        """Each new prompt in a forward of its own. Prefilling prompts together (right-padded) is faster, but bf16
        matmul kernels block their work by the number of rows they get, so a prompt prefilled beside others gets
        other low bits than alone, and greedy tokens then drift (measured on SmolLM2: 1 request in 12 changed).
        A decode step's matmuls (one row per sequence) give each row its bits alone up to 32 rows (measured on
        SmolLM2's shapes; the default --max-batch)."""
        for seq in batch:
            length = len(seq.request.prompt_ids)
            ids = torch.tensor([seq.request.prompt_ids])
            cache = RaggedCache(self.pool, [seq.slot], [0], [length])
            # the last position by index, not logits_to_keep=1: that slice is a strided (1, 1, dim) view, and
            # the LM head on it goes through bmm on a copied (dim, vocab) weight (~74 ms on SmolLM2)
            last = torch.tensor([[length - 1]])
            logits = self._forward([seq], ids, torch.arange(length).unsqueeze(0), cache, last)
            self.stats["prefill_tokens"] += length
            seq.length = length
            self._choose([seq], logits)

    def _decode(self) -> None:
        rows = list(self.running)
        ids = torch.tensor([[s.last] for s in rows])
        positions = torch.tensor([[s.length] for s in rows])
        cache = RaggedCache(self.pool, [s.slot for s in rows], [s.length for s in rows], [1] * len(rows))
        logits = self._forward(rows, ids, positions, cache, 1)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(rows)
        for seq in rows:
            seq.length += 1
        self._choose(rows, logits)

    @torch.no_grad()
    def _forward(self, rows: list[_Sequence], ids, positions, cache: RaggedCache, keep) -> torch.Tensor:
        self._route([s.internal for s in rows])
        with self.autocast():
            out = self.model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=keep,
                             **{self.cache_kwarg: cache})
        return out.logits[:, -1]

    def _route(self, names: list[str | None]) -> None:
        """Per-row adapters for the next forward; kept while the rows do not change (the per-row plans and their
        gathered factors are cached by the routing state until it changes)."""
        state = get_state(self.model)
        if state is None:
            return  # no adapter was ever loaded: every row is the base model
        if state.rows != tuple(names):
            api.per_sample(self.model, names)

    def _choose(self, rows: list[_Sequence], logits: torch.Tensor) -> None:
        tokens = choose_tokens(logits, [s.request.params for s in rows], [s.generator for s in rows])
        for seq, token in zip(rows, tokens):
            self._accept(seq, token)
        self.running = [s for s in self.running if not s.done]

    def _accept(self, seq: _Sequence, token: int) -> None:
        seq.generated.append(token)
        seq.last = token
        if token in self.eos:
            return self._finish(seq, "stop")
        text = seq.stream.add(token)
        if seq.stream.stopped:
            return self._finish(seq, "stop", text)
        if len(seq.generated) >= seq.request.params.max_tokens:
            return self._finish(seq, "length", text)
        if text:
            _emit(seq.request, Event(text=text))

    def _finish(self, seq: _Sequence, reason: str, text: str = "") -> None:
        event = Event(text=text + seq.stream.finish(), finish_reason=reason,
                      prompt_tokens=len(seq.request.prompt_ids), completion_ids=list(seq.generated))
        self._release(seq)
        _emit(seq.request, event)

    def _fail(self, seq: _Sequence, message: str, status: int) -> None:
        self._release(seq)
        _emit(seq.request, Event(error=message, status=status))

    def _release(self, seq: _Sequence) -> None:
        if seq.done:
            return
        seq.done = True
        self.free_slots.append(seq.slot)
        if seq.request.adapter:
            self.adapters.release(seq.request.adapter)
        self.running = [s for s in self.running if s is not seq]


def _emit(request: Request, event: Event) -> None:
    try:
        request.emit(event)
    except Exception:  # a vanished client must not stop the engine
        log.exception("could not deliver an event for request %s", request.id)


def _settle(future: concurrent.futures.Future, fn: Callable[[], object]) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:  # noqa: BLE001 -- handed to the caller through the future
        future.set_exception(exc)
