"""DSiRe: estimate how many examples an adapter was trained on, from its weights.

"Dataset Size Recovery from LoRA Weights", Salama et al., 2024, https://arxiv.org/abs/2406.19395. The norm and
spectrum of a LoRA update track the fine-tuning set size; DSiRe takes the singular values of each layer's update as
that layer's features, fits one nearest-neighbour classifier per layer on a calibration set of adapters with known
training-set sizes, and predicts by majority vote over layers. Here the features are the top singular values of
ΔW (read through the contract, so any mergeable method works); calibration adapters must share the method, the
targets and the base model of the adapter being estimated, and the estimate is one of the calibration sizes.

`train_calibration_set` trains such a set on the fly from the bundled demo task (several sizes × seeds, the same
number of epochs each, as a typical recipe would) so the whole pipeline can be shown end to end on a tiny model.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..core.errors import DeltatuneError
from .deltas import DeltaSet, open_deltas
from .spectra import singular_values

DEFAULT_VALUES = 8


def features_of(deltas: DeltaSet, values: int = DEFAULT_VALUES) -> dict[str, list[float]]:
    """Per layer: the top `values` singular values of ΔW (zero-padded)."""
    out = {}
    for path in deltas.paths:
        sv = singular_values(deltas.get(path).delta)[:values]
        out[path] = [float(v) for v in sv] + [0.0] * (values - sv.numel())
    return out


def fit(examples: list[tuple[dict[str, list[float]], int]], values: int = DEFAULT_VALUES) -> dict:
    """A DSiRe model (plain data) from (features, training-set size) pairs."""
    if len(examples) < 2 or len({size for _, size in examples}) < 2:
        raise DeltatuneError("DSiRe calibration needs at least two adapters with at least two different sizes")
    paths = sorted(set.intersection(*(set(f) for f, _ in examples)))
    if not paths:
        raise DeltatuneError("the calibration adapters share no adapted module; train them with the same targets")
    return {"method": "dsire-1nn", "values": values, "paths": paths,
            "examples": [{"size": int(size), "features": {p: f[p] for p in paths}} for f, size in examples]}


def predict(model: dict, features: dict[str, list[float]], exclude: int | None = None) -> dict:
    """Majority vote of per-layer 1-nearest-neighbour classifiers (`exclude`: leave that example out)."""
    paths = [p for p in model["paths"] if p in features]
    if not paths:
        raise DeltatuneError("the adapter adapts none of the calibration set's modules; calibrate with adapters "
                             "of the same method and targets")
    pool = [e for i, e in enumerate(model["examples"]) if i != exclude]
    votes: Counter = Counter()
    distance_sum: Counter = Counter()
    for path in paths:
        query = torch.tensor(features[path])
        dists = [float((torch.tensor(e["features"][path]) - query).norm()) for e in pool]
        best = min(range(len(pool)), key=dists.__getitem__)
        votes[pool[best]["size"]] += 1
        distance_sum[pool[best]["size"]] += dists[best]
    top = max(votes.values())
    tied = [size for size, n in votes.items() if n == top]
    estimate = min(tied, key=lambda size: distance_sum[size])  # ties: the size whose winning layers were nearest
    return {"estimate": estimate, "agreement": top / len(paths), "layers": len(paths),
            "votes": {str(size): n for size, n in sorted(votes.items())}}


def leave_one_out(model: dict) -> dict:
    """How well the calibration set predicts itself: accuracy and mean absolute error, each example held out."""
    hits, errors = 0, []
    for i, example in enumerate(model["examples"]):
        guess = predict(model, example["features"], exclude=i)["estimate"]
        hits += guess == example["size"]
        errors.append(abs(guess - example["size"]))
    n = len(model["examples"])
    return {"accuracy": hits / n, "mean_absolute_error": sum(errors) / n, "examples": n}


def read_calibration_file(path: str | Path) -> list[tuple[Path, int]]:
    """[{"adapter": DIR, "size": N}, ...] (paths relative to the file) as (directory, size) pairs."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeltatuneError(f"calibration file {str(path)!r}: cannot read it as JSON ({err})") from None
    if not isinstance(rows, list):
        raise DeltatuneError(f"{path}: expected a JSON list of {{\"adapter\": DIR, \"size\": N}} objects")
    entries = []
    for i, row in enumerate(rows):
        if not (isinstance(row, dict) and isinstance(row.get("adapter"), str) and isinstance(row.get("size"), int)
                and row["size"] > 0):
            raise DeltatuneError(f"{path}: entry {i} must be {{\"adapter\": DIR, \"size\": positive int}}, got {row!r}")
        entries.append((path.parent / row["adapter"], row["size"]))
    return entries


def calibrate(entries: list[tuple[Path, int]], model: nn.Module, values: int = DEFAULT_VALUES) -> dict:
    """Fit DSiRe on adapter directories with known training-set sizes, all against base `model`."""
    examples = []
    for directory, size in entries:
        with open_deltas(model, directory) as deltas:
            examples.append((features_of(deltas, values), size))
    fitted = fit(examples, values)
    fitted["leave_one_out"] = leave_one_out(fitted)
    return fitted


def train_calibration_set(out_dir: str | Path, sizes: list[int], seeds: list[int], *, model: str = "smollm2-135m",
                          epochs: float = 2.0, rank: int = 4, targets: list[str] | None = None,
                          progress: bool = False) -> Path:
    """Train one small LoRA per (size, seed) on a random subset of the demo task; write calibration.json.

    Every run makes the same number of passes over its own data (batch 4, constant learning rate), so a larger
    set means more updates and a larger, higher-rank ΔW: the signal DSiRe reads. Returns the calibration file.
    """
    from ..train.demo_task import DATA_DIR
    from ..train.loop import train
    from ..train.recipe import recipe_from_dict

    rows = (DATA_DIR / "train.jsonl").read_text().splitlines()
    if not sizes or max(sizes) > len(rows) or min(sizes) < 1:
        raise DeltatuneError(f"sizes must be between 1 and {len(rows)} (the demo task's training rows), got {sizes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for size in sizes:
        for seed in seeds:
            run = out / f"n{size}_s{seed}"
            data = out / f"data_n{size}_s{seed}.jsonl"
            data.write_text("\n".join(random.Random(seed).sample(rows, size)) + "\n")
            recipe = recipe_from_dict({
                "model": model, "method": "lora", "seed": seed, "epochs": epochs, "batch_size": min(4, size),
                "delta": {"r": rank, "alpha": 2 * rank, "targets": targets or ["q_proj", "v_proj"]},
                "data": {"train": str(data), "max_length": 96}, "optimizer": {"lr": 2e-3},
                "schedule": {"name": "constant"}, "eval": {"before": False}, "output_dir": str(run),
                "precision": "fp32",
            })
            train(recipe, progress=progress)
            entries.append({"adapter": f"{run.name}/adapter", "size": size})
    target = out / "calibration.json"
    target.write_text(json.dumps(entries, indent=2))
    return target
