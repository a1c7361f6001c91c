"""Training recipes: one YAML file, validated strictly, with `--set key=value` overrides.

Every section is a dataclass; an unknown key anywhere is an error that lists the valid keys of that section, and
values are checked against the field types. Relative data paths are resolved against the recipe's directory
(so recipes/ can ship their data beside them); `output_dir` is relative to the working directory. A data path
`demo:train` / `demo:eval` names the bundled demo task.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..core.config import check_value
from ..core.errors import DeltatuneError
from ..core.registry import config as method_config
from .demo_task import DATA_DIR
from .models import EMBEDDED


@dataclasses.dataclass
class DataSpec:
    """Attributes:
    train: JSONL file(s) of training examples.
    eval: JSONL file(s) of held-out examples (optional).
    eval_split: fraction of train held out for eval when no eval file is given.
    format: auto | prompt_completion | chat | text | classification.
    completion_only: loss only on the completion / assistant turns (default: yes for those formats).
    max_length: longest tokenised example; longer ones are truncated (and dropped if no loss tokens remain).
    packing: pack several examples per row (positions reset, no attention across examples).
    labels: class names for classification (default: sorted labels found in train).
    """

    train: Union[str, list[str]] = ""
    eval: Union[str, list[str], None] = None
    eval_split: float = 0.0
    format: Literal["auto", "prompt_completion", "chat", "text", "classification"] = "auto"
    completion_only: Union[bool, None] = None
    max_length: int = 512
    packing: bool = False
    labels: Union[list[str], None] = None


@dataclasses.dataclass
class OptimizerSpec:
    """Attributes: name (a registered optimizer: adamw, ...), lr, weight_decay, betas, eps, lora_plus_ratio (B-side
    lr multiplier; 1 = off), grad_clip (max gradient norm; null = off), options (extra arguments of the optimizer)."""

    name: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lora_plus_ratio: float = 1.0
    grad_clip: Union[float, None] = 1.0
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class InitSpec:
    """Attributes: name (a data-driven initialisation, e.g. eva; null = none), batches (training batches it reads),
    options (its extra arguments)."""

    name: Union[str, None] = None
    batches: int = 8
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ScheduleSpec:
    """Attributes: name (constant | linear | cosine), warmup_steps, warmup_ratio (of total steps), min_lr_ratio."""

    name: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0


@dataclasses.dataclass
class EvalSpec:
    """Attributes:
    every: evaluate every N optimizer steps (0: only before and after training).
    before: also evaluate before training (the baseline the demo prints).
    metrics: any of loss, perplexity, exact_match, accuracy (default: by data format).
    max_new_tokens: generation length for exact match.
    batch_size: eval batch size.
    max_examples: evaluate on at most this many held-out examples.
    """

    every: int = 0
    before: bool = True
    metrics: Union[list[Literal["loss", "perplexity", "exact_match", "accuracy"]], None] = None
    max_new_tokens: int = 64
    batch_size: int = 16
    max_examples: Union[int, None] = None


@dataclasses.dataclass
class CheckpointSpec:
    """Attributes: every (optimizer steps between checkpoints; 0 = none), keep (how many to keep)."""

    every: int = 0
    keep: int = 2


@dataclasses.dataclass
class Recipe:
    """A training run. Attributes (sections are documented on their own classes):
    model: smollm2-135m | minilm-l6 | a local transformers directory.
    method: a registered method; delta: its config fields (targets, r, ...).
    init_from: start from this saved adapter (a new run on top of it; not a resume).
    initialize: a data-driven initialisation run on training batches before the first step.
    batch_size, grad_accum: micro-batch rows and micro-batches per optimizer step.
    steps / epochs: run length (steps wins when both are set).
    precision: auto (bf16 autocast where the CPU has native bf16, else fp32) | fp32 | bf16.
    gradient_checkpointing: recompute every layer in backward (least memory, ~30 % slower).
    loss_chunk: tokens per chunk of the LM head + cross-entropy (memory ∝ chunk × vocab).
    seed, output_dir, log_every, tensorboard, max_loss_ratio (divergence watchdog: stop when the loss exceeds this
    multiple of its running minimum), distributed (ddp | fsdp, used when launched under torchrun).
    """

    model: str = "smollm2-135m"
    method: str = "lora"
    delta: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_from: Union[str, None] = None
    initialize: InitSpec = dataclasses.field(default_factory=InitSpec)
    data: DataSpec = dataclasses.field(default_factory=DataSpec)
    batch_size: int = 8
    grad_accum: int = 1
    steps: Union[int, None] = None
    epochs: Union[float, None] = None
    optimizer: OptimizerSpec = dataclasses.field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = dataclasses.field(default_factory=ScheduleSpec)
    eval: EvalSpec = dataclasses.field(default_factory=EvalSpec)
    checkpoint: CheckpointSpec = dataclasses.field(default_factory=CheckpointSpec)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    loss_chunk: int = 512
    seed: int = 0
    output_dir: str = "runs/default"
    log_every: int = 1
    tensorboard: bool = False
    max_loss_ratio: float = 10.0
    distributed: Literal["ddp", "fsdp"] = "ddp"

    def validate(self) -> None:
        if not self.data.train:
            raise DeltatuneError("recipe: data.train is required (a JSONL file, or demo:train)")
        if self.steps is None and self.epochs is None:
            raise DeltatuneError("recipe: set steps or epochs")
        for name in ("batch_size", "grad_accum", "loss_chunk", "log_every"):
            if getattr(self, name) <= 0:
                raise DeltatuneError(f"recipe: {name} must be > 0, got {getattr(self, name)}")
        if (self.steps is not None and self.steps <= 0) or (self.epochs is not None and self.epochs <= 0):
            raise DeltatuneError("recipe: steps / epochs must be > 0")
        if not 0.0 <= self.data.eval_split < 1.0:
            raise DeltatuneError(f"recipe: data.eval_split must be in [0, 1), got {self.data.eval_split}")
        if self.data.max_length < 8:
            raise DeltatuneError(f"recipe: data.max_length must be >= 8, got {self.data.max_length}")
        if self.optimizer.lr <= 0 or self.optimizer.lora_plus_ratio <= 0:
            raise DeltatuneError("recipe: optimizer.lr and optimizer.lora_plus_ratio must be > 0")
        from .optimizers import registered

        optimizers = registered()
        if self.optimizer.name not in optimizers:
            raise DeltatuneError(f"recipe: unknown optimizer {self.optimizer.name!r}; valid: {', '.join(optimizers)}")
        method_config(self.method, **self.delta)  # unknown method or field: an error listing the valid ones
        if self.model not in EMBEDDED and not Path(self.model).expanduser().is_dir():
            raise DeltatuneError(f"recipe: unknown model {self.model!r}: not an embedded model "
                                 f"({', '.join(EMBEDDED)}) and not a local directory")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise DeltatuneError(f"{where or 'recipe'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise DeltatuneError(
            f"{where or 'recipe'}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, path)
        else:
            value = _numeric(value, hint)
            values[name] = check_value(value, hint, f"recipe: {path}")
    return cls(**values)


def _numeric(value: Any, hint: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) as a string; accept it where a float is expected."""
    if isinstance(value, str) and (hint is float or float in typing.get_args(hint)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _set(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise DeltatuneError(f"--set {dotted}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    out = []
    for pair in pairs:
        if "=" not in pair:
            raise DeltatuneError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override, validate and resolve paths of a YAML recipe."""
    source = Path(path)
    if not source.is_file():
        raise DeltatuneError(f"recipe {str(source)!r} does not exist")
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else str(source)
        raise DeltatuneError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    return recipe_from_dict(data, base_dir=source.parent, overrides=overrides)


def recipe_from_dict(data: dict, base_dir: Path = Path("."), overrides: list[str] = ()) -> Recipe:
    data = dict(data)
    for key, value in parse_overrides(list(overrides)):
        _set(data, key, value)
    recipe = _build(Recipe, data, "")
    recipe.data.train = _resolve(recipe.data.train, base_dir)
    recipe.data.eval = _resolve(recipe.data.eval, base_dir)
    if recipe.init_from:
        recipe.init_from = str(_resolve_one(recipe.init_from, base_dir))
    recipe.validate()
    return recipe


def _resolve_one(value: str, base_dir: Path) -> str:
    if value.startswith("demo:"):
        name = value.split(":", 1)[1]
        if name not in ("train", "eval"):
            raise DeltatuneError(f"unknown bundled data {value!r}; use demo:train or demo:eval")
        return str(DATA_DIR / f"{name}.jsonl")
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base_dir / path)


def _resolve(value, base_dir: Path):
    if value is None or value == "":
        return value
    if isinstance(value, list):
        return [_resolve_one(v, base_dir) for v in value]
    return _resolve_one(value, base_dir)
