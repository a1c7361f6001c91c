"""What a run leaves behind besides the adapter: metrics JSONL, a loss/eval plot, a manifest, memory figures."""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import nn


class MetricsLog:
    """Append-only JSONL; each line is flushed, so a killed run keeps everything it logged."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.writer = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, record.get("step", 0))
            self.writer.flush()


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, png_path: Path) -> Path | None:
    """Training loss (raw and smoothed) and eval metrics against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if "loss" in r and r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    left.plot(steps, losses, alpha=0.35, label="train loss")
    smooth, ema = [], losses[0]
    for value in losses:
        ema = 0.9 * ema + 0.1 * value
        smooth.append(ema)
    left.plot(steps, smooth, label="train loss (EMA 0.9)")
    if evals and any("loss" in r for r in evals):
        left.plot([r["step"] for r in evals if "loss" in r], [r["loss"] for r in evals if "loss" in r], "o-",
                  label="eval loss")
    left.set_xlabel("optimizer step")
    left.set_ylabel("loss")
    left.legend()
    for key in ("exact_match", "accuracy"):
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            right.plot(*zip(*points), "o-", label=key)
    right.set_xlabel("optimizer step")
    right.set_ylim(-0.02, 1.02)
    if right.get_legend_handles_labels()[1]:  # no metric points without evaluations
        right.legend()
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(recipe_dict: dict, data_files: list[str]) -> dict[str, Any]:
    """Everything needed to re-create the run: recipe, data hashes, versions, commit, command line."""
    versions = {}
    for package in ("deltatune", "torch", "transformers", "safetensors", "peft"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "recipe": recipe_dict,
        "data": {path: sha256(path) for path in data_files},
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": commit,
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far. Linux: VmHWM of the current address space, because ru_maxrss
    survives exec and so also counts the peak of a parent process that forked and exec'd this one."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_estimate(model: nn.Module, trainable: int, tokens_per_micro_batch: int, vocab: int, chunk: int,
                    activation_bytes: int, gradient_checkpointing: bool) -> dict[str, int]:
    """A rough peak-memory estimate in bytes: weights + delta training state + activations + one loss chunk.

    Activations per token per layer are taken as 16 hidden-widths and 6 MLP-widths at the compute dtype (what a
    Llama-style block keeps for backward); with gradient checkpointing only one layer's worth plus the layer inputs.
    """
    config = model.config
    hidden = getattr(config, "hidden_size", 0)
    inner = getattr(config, "intermediate_size", 4 * hidden)
    layers = getattr(config, "num_hidden_layers", 1)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_layer = tokens_per_micro_batch * (16 * hidden + 6 * inner) * activation_bytes
    activations = per_layer * (1 if gradient_checkpointing else layers)
    if gradient_checkpointing:
        activations += tokens_per_micro_batch * hidden * activation_bytes * layers
    return {
        "weights": weights,
        "delta_training_state": trainable * 16,  # fp32 parameter + gradient + two Adam moments
        "activations": activations,
        "loss_chunk": chunk * vocab * 4 * 3,
        "total": weights + trainable * 16 + activations + chunk * vocab * 12,
    }
