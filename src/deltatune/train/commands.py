"""Subcommands of the training package: train, eval, data, generate, chat, demo."""

from __future__ import annotations

import argparse
import json

from ..core.quantized import CLI_HELP as INT8_HELP


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps, progress=not args.quiet)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .distributed import Distributed, world_size
    from .loop import dry_run, train
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    if args.dry_run:
        print(json.dumps(dry_run(recipe), indent=2))
        return 0
    distributed = None
    if world_size() > 1:
        distributed = Distributed(recipe.distributed)
    try:
        results = train(recipe, resume=args.resume, progress=not args.quiet, distributed=distributed)
    finally:
        if distributed is not None:
            distributed.close()
    if distributed is not None and not distributed.is_main:
        return 0
    summary = {k: v for k, v in results.items() if k in ("before", "after", "tokens_per_s", "peak_rss_bytes")}
    for key in ("before", "after"):
        if summary.get(key):
            summary[key] = {k: v for k, v in summary[key].items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .interactive import adapter_dir
    from .loop import prepare
    from .evaluate import evaluate
    from .recipe import load_recipe
    from ..core.io import load as load_adapter

    recipe = load_recipe(args.recipe, args.set)
    run = prepare(recipe, attach=False)
    if args.adapter:
        load_adapter(run.model, adapter_dir(args.adapter))
    examples = run.eval_examples or run.train_examples
    result = evaluate(run.model, run.tokenizer, examples, metrics=run.metrics, batch_size=recipe.eval.batch_size,
                      max_new_tokens=recipe.eval.max_new_tokens, loss_chunk=recipe.loss_chunk, autocast=run.autocast)
    result.pop("samples", None)
    print(json.dumps({"examples": len(examples), "split": "eval" if run.eval_examples else "train", **result},
                     indent=2))
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from .loop import prepare
    from .preview import report
    from .recipe import load_recipe

    run = prepare(load_recipe(args.recipe, args.set), attach=False)
    print(report(run.train_examples, run.stats, run.tokenizer, run.fmt, first=args.n))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .interactive import generate_text, load_for_inference, prompt_ids

    model, tokenizer, autocast = load_for_inference(args.base, args.adapter, args.precision, args.int8)
    ids = prompt_ids(tokenizer, args.prompt, raw=args.raw)
    print(generate_text(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed, autocast=autocast))
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from .interactive import chat_loop, load_for_inference

    model, tokenizer, autocast = load_for_inference(args.base, args.adapter, args.precision, args.int8)
    chat_loop(model, tokenizer, autocast=autocast, max_new_tokens=args.max_new_tokens, greedy=args.greedy)
    return 0


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, dotted for sections (e.g. optimizer.lr=1e-4); repeatable")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="smollm2-135m", help="smollm2-135m, minilm-l6 or a model directory")
    p.add_argument("--adapter", help="adapter directory (or a training output directory)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--int8", action="store_true", help=INT8_HELP)


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from .leaderboard import leaderboard

    only = [m.strip() for m in args.methods.split(",")] if args.methods else None
    rows = leaderboard(args.recipe, args.out, all_methods=args.all, only=only, extra=args.set,
                       markdown_path=args.markdown)
    failed = [r["name"] for r in rows if "error" in r]
    print(f"{len(rows)} runs, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
          f"table: {args.out}/leaderboard.md")
    return 0


def add_commands(sub) -> None:
    """Register this package's subcommands on the `deltatune` parser."""
    p = sub.add_parser("train", help="fine-tune a model from a YAML recipe",
                       description="Train any registered method from a recipe. Writes the adapter (PEFT layout), "
                                   "metrics.jsonl, loss.png, manifest.json and checkpoints to output_dir.")
    _add_recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved recipe, trainable parameters and a memory estimate; train nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a base model or an adapter on a recipe's eval data")
    _add_recipe_args(p)
    p.add_argument("--adapter", help="adapter directory (default: the base model alone)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("data", help="preview a recipe's data: rendered examples, loss tokens, drops, lengths")
    _add_recipe_args(p)
    p.add_argument("-n", type=int, default=3, help="examples to show (default 3)")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("generate", help="generate from a prompt with a base model and optional adapter")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="user message (rendered with the chat template)")
    p.add_argument("--raw", action="store_true", help="use the prompt as raw text, without the chat template")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with a base model and optional adapter (/compare, /clear)")
    _add_model_args(p)
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("demo", help="the end-to-end demo: LoRA on SmolLM2-135M, before/after exact match",
                       description="Trains LoRA on the embedded SmolLM2-135M-Instruct to turn sentences into a "
                                   "fixed JSON record, and prints exact match on held-out sentences before and "
                                   "after (a few minutes on 2 CPU cores).")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("leaderboard", help="train every method the same way and rank them",
                       description="Trains each method (default: a representative subset plus LoRA+ and the LoRA "
                                   "initialisations; --all: every registered method) with the recipe's model, data, "
                                   "steps and seed, each in its own process, and writes one JSON per run and a "
                                   "markdown table.")
    _add_recipe_args(p)
    p.add_argument("--all", action="store_true", help="every registered method")
    p.add_argument("--methods", help="comma-separated method names instead of the default subset")
    p.add_argument("--out", default="runs/leaderboard", help="output directory (default: runs/leaderboard)")
    p.add_argument("--markdown", help="also write the table here (e.g. docs/leaderboard.md)")
    p.set_defaults(func=_cmd_leaderboard)
