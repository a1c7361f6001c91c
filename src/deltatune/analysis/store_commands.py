"""`deltatune store add|list|search|show|remove|export|compose|cluster|route`: the adapter store from the shell."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.errors import DeltatuneError


def _open(args: argparse.Namespace, create: bool = False):
    from .store import AdapterStore, default_store_dir

    return AdapterStore(args.store or default_store_dir(), create=create)


def _groups(args: argparse.Namespace):
    from .store_schema import parse_groups

    return parse_groups(getattr(args, "groups", None))


def _labels(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _metrics(text: str | None) -> dict | None:
    if not text:
        return None
    source = Path(text)
    try:
        data = json.loads(source.read_text() if source.is_file() else text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeltatuneError(f"--metrics must be a JSON object or a JSON file, got {text!r} ({err})") from None
    if not isinstance(data, dict):
        raise DeltatuneError(f"--metrics must be a JSON object, got {type(data).__name__}")
    return data


def _show(args: argparse.Namespace, data, text_of) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text_of(data))


def _cmd_add(args: argparse.Namespace) -> int:
    from .textout import entries_text

    with _open(args, create=True) as store:
        entry = store.add(args.adapter, name=args.name, description=args.description, tags=_labels(args.tags),
                          metrics=_metrics(args.metrics), owner=args.owner, group=args.group,
                          base_model=args.base_model)
    _show(args, entry, lambda e: "added:\n" + entries_text([e]))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .textout import entries_text

    with _open(args) as store:
        entries = store.search(args.text, groups=_groups(args), base_model=args.base_model, method=args.method,
                               tags=_labels(args.tags), limit=args.limit) if args.command_name == "search" else \
            store.list(groups=_groups(args), base_model=args.base_model, method=args.method, tags=_labels(args.tags))
    _show(args, entries, entries_text)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    with _open(args) as store:
        entry = store.show(args.ref, _groups(args))
    print(json.dumps(entry, indent=2, default=str))
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    with _open(args) as store:
        report = store.remove(args.ref, _groups(args))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"removed {report['removed']!r}; deleted blob(s): {', '.join(report['blobs_deleted']) or '(shared, kept)'}")
    if report["composed_removed"]:
        print(f"also removed {len(report['composed_removed'])} composed artefact(s) derived from it: "
              f"{', '.join(report['composed_removed'])}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    with _open(args) as store:
        print(f"exported to {store.export(args.ref, args.out, _groups(args))}")
    return 0


def _cmd_compose(args: argparse.Namespace) -> int:
    from .deltas import load_base_model
    from .library import compose_into_store

    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise DeltatuneError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
    with _open(args) as store:
        model = load_base_model(args.base)
        entry = compose_into_store(store, model, args.refs, weights, name=args.name, description=args.description,
                                   groups=_groups(args), max_rank=args.max_rank)
    print(json.dumps(entry, indent=2, default=str) if args.json else
          f"stored {entry['name']!r}: rank {entry['rank']}, relative error {entry['relative_error']:.2e}")
    return 0


def _cmd_cluster(args: argparse.Namespace) -> int:
    from .mbc import cluster

    with _open(args) as store:
        model = None
        if args.by == "delta":
            from .deltas import load_base_model

            model = load_base_model(args.base) if args.base else None
        result = cluster(store, k=args.k, by=args.by, model=model, groups=_groups(args), base_model=args.base,
                         method=args.method, seed=args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['k']} clusters by {result['by']} similarity (silhouette {result['silhouette']:.3f}):")
    for i, c in enumerate(result["clusters"]):
        print(f"  cluster {i} (mean cosine {c['mean_similarity']:.3f}): {', '.join(c['members'])}")
    return 0


def _cmd_route(args: argparse.Namespace) -> int:
    from .routing import routed_generate

    with _open(args) as store:
        result = routed_generate(store, args.base, args.prompt, groups=_groups(args), mode=args.mode,
                                 top_k=args.top_k, max_new_tokens=args.max_new_tokens, greedy=not args.sample,
                                 temperature=args.temperature, top_p=args.top_p, seed=args.seed, raw=args.raw)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    shares = ", ".join(f"{a['name']} {a['weight']:.2f}" for a in result["adapters"])
    print(f"routing ({result['mode']}): {shares}\n{result['text']}")
    return 0


def _common(p: argparse.ArgumentParser, groups: bool = True, json_flag: bool = True) -> None:
    p.add_argument("--store", help="store directory (default: $DELTATUNE_STORE or ~/.deltatune/store)")
    if groups:
        p.add_argument("--groups", help="comma-separated access groups of the caller: only entries these groups "
                                        "may see are used (default: no restriction, the store owner's view)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", help="only adapters of this base model")
    p.add_argument("--method", help="only adapters of this method")
    p.add_argument("--tags", help="only adapters carrying all these comma-separated tags")


def _add_query_commands(store_sub) -> None:
    for name, text in (("list", False), ("search", True)):
        p = store_sub.add_parser(name, help="list stored adapters" if not text else
                                 "search by text (MiniLM embeddings of the descriptions), base model, method, tags")
        if text:
            p.add_argument("text", nargs="?", help="what the adapter should do, in words")
            p.add_argument("--limit", type=int, default=10)
        _common(p)
        _filters(p)
        p.set_defaults(func=_cmd_list, command_name=name, text=None, limit=None)
    p = store_sub.add_parser("show", help="everything stored about one adapter (name or id prefix)")
    p.add_argument("ref")
    _common(p, json_flag=False)
    p.set_defaults(func=_cmd_show)


def _add_write_commands(store_sub) -> None:
    p = store_sub.add_parser("add", help="store an adapter directory with its metadata (creates the store)")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--name", help="unique name (default: the directory's name)")
    p.add_argument("--description", default="", help="what it does and what data it was trained on")
    p.add_argument("--tags", help="comma-separated tags")
    p.add_argument("--metrics", help="JSON object, or a JSON file (e.g. a run's results.json)")
    p.add_argument("--owner", help="owner (default: $USER)")
    p.add_argument("--group", default="public", help="access group (default: public, visible to everyone)")
    p.add_argument("--base-model", help="base model name (default: the adapter's base_model_name_or_path)")
    _common(p, groups=False)
    p.set_defaults(func=_cmd_add)
    p = store_sub.add_parser("remove", help="delete an adapter, its blob and every composition derived from it")
    p.add_argument("ref")
    _common(p)
    p.set_defaults(func=_cmd_remove)
    p = store_sub.add_parser("export", help="write a stored adapter as a PEFT-layout directory")
    p.add_argument("ref")
    p.add_argument("out", help="new directory")
    _common(p, json_flag=False)
    p.set_defaults(func=_cmd_export)
    p = store_sub.add_parser("compose", help="store a weighted sum of stored adapters as one exact LoRA")
    p.add_argument("refs", nargs="+")
    p.add_argument("--weights", required=True, help="comma-separated, one per adapter")
    p.add_argument("--name", required=True)
    p.add_argument("--base", required=True, help="the base model the adapters were trained on")
    p.add_argument("--description", default="")
    p.add_argument("--max-rank", type=int, help="truncate the composed rank (lossy; the error is reported)")
    _common(p)
    p.set_defaults(func=_cmd_compose)


def add_store_commands(sub) -> None:
    store = sub.add_parser("store", help="a local, searchable store of adapters (SQLite + content-addressed blobs)",
                           description="Add, find, compose, cluster and route over stored adapters. Entries carry "
                                       "an access group; --groups restricts every query to what those groups see.")
    store_sub = store.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    _add_write_commands(store_sub)
    _add_query_commands(store_sub)
    p = store_sub.add_parser("cluster", help="MBC: cluster stored adapters by parameter (or ΔW) similarity")
    p.add_argument("--k", type=int, help="number of clusters (default: best silhouette)")
    p.add_argument("--by", choices=["params", "delta"], default="params")
    p.add_argument("--base", help="base model (filters the adapters; needed for --by delta)")
    p.add_argument("--method", help="only adapters of this method")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=_cmd_cluster)
    p = store_sub.add_parser("route", help="answer a prompt with the store's adapters routed and composed for it")
    p.add_argument("prompt")
    p.add_argument("--base", required=True, help="base model (smollm2-135m or a directory)")
    p.add_argument("--mode", choices=["arrow", "description"], default="arrow")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--raw", action="store_true", help="use the prompt as raw text, without the chat template")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="with --sample (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="with --sample (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="with --sample (default 0)")
    _common(p)
    p.set_defaults(func=_cmd_route)
