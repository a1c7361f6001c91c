"""Subcommands of the merge package: merge, combine, convert, export, compress, decompress, merge-methods."""

from __future__ import annotations

import argparse
import json


def _print(report) -> None:
    print(json.dumps(report, indent=2))


def _cmd_merge(args: argparse.Namespace) -> int:
    from .config import load_merge_config
    from .full import run_merge

    out = run_merge(load_merge_config(args.config), args.out, progress=not args.quiet)
    print(f"merged model written to {out}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from .registry import merge_methods

    rows = []
    for name, spec in merge_methods().items():
        params = ", ".join(f"{s.name}{'[per model]' if s.per_model else ''}" for s in spec.settings.values())
        inputs = "lora-only" if spec.on_factors else spec.base
        rows.append({"name": name, "base": inputs, "parameters": params, "paper": spec.paper})
    if args.json:
        _print(rows)
    else:
        for row in rows:
            print(f"{row['name']:18s} base={row['base']:9s} {row['parameters']}")
    return 0


def _base_model(name: str):
    from .export import load_base

    return load_base(name)[0]


def _cmd_combine(args: argparse.Namespace) -> int:
    from .arithmetic import combine

    params = json.loads(args.params) if args.params else {}
    result = combine(_base_model(args.base), list(args.adapters), out=args.out, method=args.method,
                     weights=args.weights, params=params, output=args.output, rank=args.rank, energy=args.energy)
    _print(result.summary())
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from ..core.errors import DeltatuneError

    if (args.adapter is None) == (args.finetuned is None):
        raise DeltatuneError("convert takes either an ADAPTER or --finetuned DIR (a fully fine-tuned checkpoint)")
    if args.finetuned is not None:
        from .extract import extract_lora

        report = extract_lora(args.finetuned, args.base, out=args.out, rank=args.rank, energy=args.energy)
        _print({k: v for k, v in report.items() if k != "per_module"})
        return 0
    from .arithmetic import convert

    _print(convert(_base_model(args.base), args.adapter, out=args.out, rank=args.rank, energy=args.energy).summary())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export

    _print(export(args.adapter, args.base, args.out, max_shard_size=args.max_shard_size))
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from .compress import compress

    _print(compress(args.adapter, args.out, density=args.density, alpha=args.alpha, base=args.base))
    return 0


def _cmd_decompress(args: argparse.Namespace) -> int:
    from .compress import decompress

    _print(decompress(args.compressed, args.out))
    return 0


def _add_rank_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rank", type=int, help="target LoRA rank")
    p.add_argument("--energy", type=float, help="keep the smallest rank holding this fraction of Σσ² (0-1]")


def add_commands(sub) -> None:
    """Register this package's subcommands on the `deltatune` parser."""
    p = sub.add_parser("merge", help="merge full models from a mergekit-like YAML, out of core",
                       description="Merge transformers models tensor by tensor (TIES, DARE, SLERP, ... — see "
                                   "`deltatune merge-methods`) into a new model directory with sharded safetensors "
                                   "and the base model's tokenizer. Peak memory: a few tensors per model.")
    p.add_argument("config", help="merge YAML (merge_method, base_model, models or slices, parameters, dtype)")
    p.add_argument("--out", help="output directory (default: the config's 'output')")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("merge-methods", help="list the merge methods and their parameters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_methods)
    _add_adapter_commands(sub)


def _add_adapter_commands(sub) -> None:
    p = sub.add_parser("combine", help="weighted arithmetic / merging of adapters of any mergeable method",
                       description="Combine adapters into one (PEFT layout): Σ wᵢ·ΔWᵢ in LoRA factor space where "
                                   "possible, or any merge method in weight space; negative weights subtract.")
    p.add_argument("adapters", nargs="+", help="adapter directories")
    p.add_argument("--base", required=True, help="the base model (directory or embedded name)")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1 each)")
    p.add_argument("--method", default="task_arithmetic", help="merge method (default task_arithmetic)")
    p.add_argument("--params", help='method parameters as JSON, e.g. \'{"density": 0.3}\'')
    p.add_argument("--output", choices=["auto", "lora", "full"], default="auto",
                   help="write a plain LoRA or the full dense delta (auto: LoRA when exact or a rank is given)")
    _add_rank_args(p)
    p.set_defaults(func=_cmd_combine)

    p = sub.add_parser("convert", help="any mergeable adapter (or a full fine-tune) -> plain LoRA of a chosen rank",
                       description="Re-factorise an adapter's weight update into a plain PEFT LoRA (loadable by "
                                   "vLLM and other servers), or extract one from a fully fine-tuned checkpoint "
                                   "(--finetuned); prints the reconstruction error.")
    p.add_argument("adapter", nargs="?", help="adapter directory")
    p.add_argument("--finetuned", help="a fully fine-tuned model directory to extract a LoRA from (vs --base)")
    p.add_argument("--base", required=True, help="the base model (directory or embedded name)")
    p.add_argument("--out", required=True, help="output adapter directory")
    _add_rank_args(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("export", help="merge an adapter into its base and write a transformers model directory")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--base", required=True, help="the base model (directory or embedded name)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.set_defaults(func=_cmd_export)
    _add_compression_commands(sub)


def _add_compression_commands(sub) -> None:
    p = sub.add_parser("compress", help="ComPEFT: sparsify + ternary-quantise an adapter's update")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--out", required=True, help="output directory for the compressed adapter")
    p.add_argument("--density", type=float, default=0.1, help="fraction of entries kept (default 0.1)")
    p.add_argument("--alpha", type=float, default=None,
                   help="scale = alpha·σ(τ) as in ComPEFT (default: the least-squares scale, mean |τ| kept)")
    p.add_argument("--base", help="base model: also report the adapted model's output change on random tokens")
    p.set_defaults(func=_cmd_compress)

    p = sub.add_parser("decompress", help="a ComPEFT-compressed adapter back to a normal adapter directory")
    p.add_argument("compressed", help="directory written by `deltatune compress`")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.set_defaults(func=_cmd_decompress)
