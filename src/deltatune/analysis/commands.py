"""Subcommands of the analysis package: inspect, compare, calibrate, and the adapter store (`deltatune store ...`).

Thin: parse, call the library (which returns plain data), print text or --json."""

from __future__ import annotations

import argparse
import json

from ..core.errors import DeltatuneError


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def _write_outputs(args: argparse.Namespace, title: str, result: dict, figures_of) -> None:
    if not (args.report or args.plots):
        return
    from .report import write_figures, write_report

    figures = figures_of(result)
    if args.plots:
        print(f"figures: {write_figures(args.plots, figures)}")
    if args.report:
        print(f"report: {write_report(args.report, title, result, figures)}")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect
    from .report import inspect_figures
    from .textout import inspect_text

    calibration = None
    if args.calibration:
        from .deltas import base_model_name, load_base_model
        from .dsire import calibrate, read_calibration_file

        entries = read_calibration_file(args.calibration)
        name = base_model_name(args.base, args.source)
        base = load_base_model(name)  # loaded once, for the calibration set and the adapter alike
        calibration = calibrate(entries, base)
    result = inspect(args.source, base if calibration else args.base, intruder_k=args.intruder_k,
                     epsilon=args.epsilon, intruders=not args.no_intruders, calibration=calibration)
    if calibration is not None:
        result["analysed_against"] = name
        result["dataset_size"]["calibration_leave_one_out"] = calibration["leave_one_out"]
    _print_json(result) if args.json else print(inspect_text(result))
    _write_outputs(args, f"deltatune inspect {args.source}", result, inspect_figures)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .inspect import compare
    from .report import compare_figures
    from .textout import compare_text

    result = compare(args.a, args.b, args.base, top_k=args.top_k)
    _print_json(result) if args.json else print(compare_text(result))
    _write_outputs(args, f"deltatune compare {args.a} {args.b}", result, compare_figures)
    return 0


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DeltatuneError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise DeltatuneError(f"{what} needs at least one value")
    return values


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .deltas import load_base_model
    from .dsire import calibrate, read_calibration_file, train_calibration_set

    path = train_calibration_set(args.out, _ints(args.sizes, "--sizes"), _ints(args.seeds, "--seeds"),
                                 model=args.model, epochs=args.epochs, progress=not args.quiet)
    fitted = calibrate(read_calibration_file(path), load_base_model(args.model))
    print(json.dumps({"calibration": str(path), "leave_one_out": fitted["leave_one_out"]}, indent=2))
    return 0


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="base model: smollm2-135m, minilm-l6 or a model directory (default: the one the "
                                  "adapter records)")
    p.add_argument("--report", metavar="FILE.html", help="write a self-contained HTML report (figures inlined)")
    p.add_argument("--plots", metavar="DIR", help="write the figures as PNG files into DIR")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")


def add_commands(sub) -> None:
    """Register this package's subcommands on the `deltatune` parser."""
    from .store_commands import add_store_commands

    p = sub.add_parser("inspect", help="look inside an adapter: spectra, ranks, intruder dimensions, size estimate",
                       description="Method, targets, parameter counts and, per layer, the norms, singular-value "
                                   "spectrum and effective rank of ΔW and the intruder dimensions of W0+ΔW. SOURCE is "
                                   "an adapter directory or a fully fine-tuned model directory (ΔW = W_ft - W0).")
    p.add_argument("source", help="adapter directory (or a fine-tuned model directory)")
    _add_output_args(p)
    p.add_argument("--intruder-k", type=int, default=10, help="top singular vectors examined (default 10)")
    p.add_argument("--epsilon", type=float, default=0.5, help="cosine threshold for an intruder (default 0.5)")
    p.add_argument("--no-intruders", action="store_true", help="skip intruder dimensions (faster)")
    p.add_argument("--calibration", metavar="FILE.json",
                   help='DSiRe: [{"adapter": DIR, "size": N}, ...] adapters with known training-set sizes '
                        "(see `deltatune calibrate`); adds a dataset-size estimate")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("compare", help="compare two adapters (or an adapter and a fine-tuned model) layer by layer",
                       description="Per-layer cosine similarity of ΔW, overlap of the top singular subspaces, and "
                                   "the layers that differ most. A and B are adapter or fine-tuned model directories.")
    p.add_argument("a")
    p.add_argument("b")
    _add_output_args(p)
    p.add_argument("--top-k", type=int, default=8, help="singular vectors per subspace (default 8)")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("calibrate", help="train a DSiRe calibration set on the demo task (sizes × seeds)",
                       description="Trains one small LoRA per (size, seed) on random subsets of the demo task and "
                                   "writes OUT/calibration.json for `deltatune inspect --calibration`.")
    p.add_argument("out", help="output directory")
    p.add_argument("--sizes", default="8,32,128", help="training-set sizes (default 8,32,128)")
    p.add_argument("--seeds", default="0,1", help="seeds per size (default 0,1)")
    p.add_argument("--model", default="smollm2-135m", help="base model (default smollm2-135m)")
    p.add_argument("--epochs", type=float, default=2.0, help="epochs per run (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_calibrate)

    add_store_commands(sub)
