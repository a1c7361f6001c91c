"""Subcommands of the serve package (registered on the `deltatune` parser by cli.py): `deltatune serve`.

`--store` routing needs the adapter store, which lives in a sibling package that serve must not import: cli.py
hands `add_commands` a `store_resolver` factory (store directory, access groups, base model, top-k, the served
model) -> resolver (see `serve.app.Resolver`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from ..core.errors import DeltatuneError
from ..core.quantized import CLI_HELP as INT8_HELP

API_KEY_ENV = "DELTATUNE_API_KEY"


def adapter_pairs(values: list[str]) -> list[tuple[str, str]]:
    """NAME=DIR pairs from --adapter flags."""
    pairs = []
    for value in values:
        name, sep, directory = value.partition("=")
        if not sep or not name or not directory:
            raise DeltatuneError(f"--adapter takes NAME=DIR, got {value!r}")
        pairs.append((name, directory))
    return pairs


def store_groups(value: str) -> list[str]:
    """Access groups from --store-groups g1,g2."""
    groups = [g.strip() for g in value.split(",") if g.strip()]
    if not groups:
        raise DeltatuneError(f"--store-groups takes comma-separated group names, got {value!r}")
    return groups


def _resolver(args: argparse.Namespace, model):
    if not getattr(args, "store", None):
        return None
    factory = getattr(args, "store_resolver", None)
    if factory is None:
        raise DeltatuneError("--store routing is not available in this build of deltatune (no store resolver)")
    return factory(args.store, store_groups(args.store_groups), args.base, args.store_top_k, model)


def build_server(args: argparse.Namespace):
    """(engine, settings) from the command line: the base model, its adapters and the limits."""
    import torch

    from ..train.interactive import load_for_inference
    from .adapters import AdapterStore
    from .app import Settings
    from .engine import Engine
    from .protocol import Limits

    pairs = adapter_pairs(args.adapter)
    model, tokenizer, autocast = load_for_inference(args.base, None, args.precision, args.int8)
    store = AdapterStore(model, args.adapter_root, args.max_loaded,
                         compute_dtype=torch.bfloat16 if model.dtype == torch.bfloat16 else torch.float32)
    for name, directory in pairs:
        store.register(name, directory)
    resolver = _resolver(args, model)
    for name, _ in pairs[: args.max_loaded]:
        store.load_now(name)  # fail at start-up, not on the first request, if an adapter does not fit the base
    context = min(args.max_context, getattr(model.config, "max_position_embeddings", args.max_context))
    settings = Settings(base_name=Path(args.base).name if os.sep in args.base else args.base,
                        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                        max_concurrent=args.max_concurrent, max_body_bytes=args.max_body_bytes,
                        limits=Limits(max_tokens=args.max_tokens, max_context=context), resolver=resolver)
    engine = Engine(model, tokenizer, store, autocast=autocast, max_batch=args.max_batch)
    return engine, settings


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app

    engine, settings = build_server(args)
    if settings.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"deltatune serve: warning: listening on {args.host} without an API key (set {API_KEY_ENV})")
    app = create_app(engine, settings, engine_thread=False)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=5))
    run_engine_and_http(engine, server)
    if not server.started:
        raise DeltatuneError(f"the HTTP server could not start on {args.host}:{args.port} (see the log above); "
                             "pick another --port or --host")
    return 0


def run_engine_and_http(engine, server) -> None:
    """HTTP (uvicorn) on a second thread, the engine on this one (see `Engine.run_here`), until the server stops.
    Ctrl-C or SIGTERM: uvicorn stops taking requests, and the engine finishes the ones in flight in its grace
    period."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    http = threading.Thread(target=server.run, name="deltatune-http")
    try:
        engine.run_here(until=lambda: not http.is_alive(), first=http.start)
    except KeyboardInterrupt:
        server.should_exit = True
        engine.run_here(until=lambda: not http.is_alive())
    finally:
        server.should_exit = True
        if http.is_alive():
            http.join()
        engine.stop()
        signal.signal(signal.SIGTERM, previous)


def add_commands(sub, store_resolver: Callable | None = None) -> None:
    """Register this package's subcommands on the `deltatune` parser (`store_resolver`: see the module doc)."""
    p = sub.add_parser(
        "serve", help="serve a base model and many adapters behind an OpenAI-compatible HTTP API",
        description="One base model, many adapters, one server: /v1/completions and /v1/chat/completions (with "
                    "streaming), /v1/models, and adapter management. A request picks its adapter with "
                    "\"model\": \"<adapter name>\"; rows with different adapters share each forward pass.")
    p.add_argument("--base", default="smollm2-135m", help="smollm2-135m or a local transformers model directory")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve the adapter in DIR as model NAME (repeatable)")
    p.add_argument("--adapter-root", help="directory whose sub-directories may be loaded by name (on request or "
                                          "through /v1/adapters/load); nothing outside it is read")
    p.add_argument("--max-loaded", type=_positive, default=8,
                   help="adapters kept on the model at once; the least recently used idle one is evicted (8)")
    p.add_argument("--store", metavar="DIR",
                   help="route requests for model \"store:auto\" over this adapter store: the adapters whose "
                        "descriptions best match the request are composed into one LoRA (cached in the store) "
                        "and served")
    p.add_argument("--store-groups", default="public", metavar="G1,G2",
                   help="access groups of the server's users: routing only sees adapters these groups may see "
                        "(public)")
    p.add_argument("--store-top-k", type=_positive, default=2, metavar="K", help="adapters composed per routed request (2)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help=f"required as 'Authorization: Bearer KEY'; enables adapter management "
                                     f"(or set {API_KEY_ENV})")
    p.add_argument("--max-tokens", type=_positive, default=512, help="most new tokens one request may ask for")
    p.add_argument("--max-context", type=_positive, default=8192, help="most prompt + new tokens per request")
    p.add_argument("--max-concurrent", type=_positive, default=64,
                   help="requests queued or running at once; more are answered 429 (64)")
    p.add_argument("--max-batch", type=_positive, default=32,
                   help="rows decoded together (KV slots) (32; above 32, bf16 kernels may change a row's low bits "
                        "with the batch, so greedy output is no longer guaranteed identical to a request alone)")
    p.add_argument("--max-body-bytes", type=_positive, default=1 << 20, help="largest request body (1 MiB)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 where the CPU has native bf16, as deltatune generate")
    p.add_argument("--int8", action="store_true", help=INT8_HELP)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_cmd_serve, store_resolver=store_resolver)
