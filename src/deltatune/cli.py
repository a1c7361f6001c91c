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


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps)
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

    p = sub.add_parser("demo", help="train a LoRA end to end on a tiny model (seconds, CPU)",
                       description="Trains LoRA on a tiny random Llama on a counting task, prints accuracy before "
                                   "and after, checks merge, and saves the adapter.")
    p.add_argument("--out", default="demo-output", help="output directory (default: demo-output)")
    p.add_argument("--steps", type=int, default=150, help="training steps (default: 150)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .core.errors import DeltatuneError

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
