"""The `deltatune` command. Thin: parse, call the library, print. Errors are one line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback


def _cmd_methods(args: argparse.Namespace) -> int:
    from .catalog import catalog, markdown_table, text_table

    if args.json:
        print(json.dumps(catalog(), indent=2))
    elif args.markdown:
        print(markdown_table(), end="")
    else:
        print(text_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatune",
        description="Parameter-efficient fine-tuning for any PyTorch model: one contract, every method.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("methods", help="list every registered method and what it supports",
                       description="Every registered method with its family, paper and capabilities (merge, "
                                   "mixed-batch path, PEFT format, host layers), read from the code.")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="machine-readable output")
    group.add_argument("--markdown", action="store_true", help="the docs/methods.md table")
    p.set_defaults(func=_cmd_methods)

    for add_commands in _command_packages():
        add_commands(sub)
    return parser


def _command_packages():
    """Each package above `methods` registers its own subcommands (explicit list, imported lazily)."""
    import functools

    from .analysis.commands import add_commands as analysis_commands
    from .merging.commands import add_commands as merge_commands
    from .serve.commands import add_commands as serve_commands
    from .store_routing import store_resolver
    from .train.commands import add_commands as train_commands

    # serve and analysis never import each other: `serve --store` gets the store's resolver from here
    serve_with_store = functools.partial(serve_commands, store_resolver=store_resolver)
    return [train_commands, merge_commands, serve_with_store, analysis_commands]


# glibc moves its mmap threshold as large blocks are freed, so a training step's many activation-sized
# allocations alternate between page-faulting mmaps and the heap; pinning it keeps them on the heap (~10 % faster
# steps on CPU). Long-running commands re-exec themselves once with it set (DELTATUNE_NO_MALLOC_PINNING=1: off).
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}
HEAVY_COMMANDS = {"train", "demo", "eval", "chat", "generate", "leaderboard", "serve",
                  "merge", "combine", "convert", "export"}


def _pin_malloc(argv: list[str] | None) -> None:
    if argv is not None or os.environ.get("DELTATUNE_NO_MALLOC_PINNING") or sys.platform != "linux":
        return
    if len(sys.argv) > 1 and sys.argv[1] in HEAVY_COMMANDS and any(
            os.environ.get(k) != v for k, v in PINNED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, "-m", "deltatune.cli", *sys.argv[1:]],
                  {**os.environ, **PINNED_MALLOC})


def main(argv: list[str] | None = None) -> int:
    from .core.errors import DeltatuneError

    _pin_malloc(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except DeltatuneError as err:
        print(f"deltatune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deltatune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: still one line unless asked for the traceback
        if os.environ.get("DELTATUNE_DEBUG"):
            traceback.print_exc()
        print(f"deltatune: internal error: {type(err).__name__}: {err} (set DELTATUNE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
