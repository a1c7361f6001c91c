"""The training loop, readable top to bottom: prepare a run, then step, log, evaluate and checkpoint.

`prepare(recipe)` resolves the model, data, adapter and optimizer (used by train, eval, `--dry-run` and `deltatune
data` alike); `train(recipe)` runs it. A resumed run continues bit-for-bit: the data stream, RNG, optimizer and
learning-rate schedule all restart from the checkpoint, and each optimizer step's loss is the mean over all loss
tokens of its micro-batches, computed before any backward pass so gradient accumulation and data-parallel ranks
see exactly one global normalisation.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import api
from ..core.errors import DeltatuneError
from ..core.io import check_output_dir, load as load_adapter, save as save_adapter
from ..core.registry import config as method_config
from ..core.delta import Delta
from . import checkpoint as ckpt
from .data import BatchStream, DataStats, Example, detect_format, label_names, pack, read_jsonl, render
from .evaluate import DEFAULT_METRICS, evaluate
from .distributed import LossModule
from .models import load_model
from .optimizers import build_optimizer
from .recipe import Recipe
from .report import MetricsLog, manifest, memory_estimate, peak_rss_bytes, plot_curves

ADAPTER = "default"
HEAD = "head"  # classification: the new head, trained as a dense delta


@dataclass
class Run:
    """Everything a run needs, resolved from a recipe."""

    recipe: Recipe
    model: torch.nn.Module
    tokenizer: object
    fmt: str
    task: str
    train_examples: list[Example]
    eval_examples: list[Example]
    stats: DataStats
    labels: list[str] | None
    adapters: list[str]
    autocast: object
    dtype_name: str
    metrics: list[str] = field(default_factory=list)


def bf16_is_fast() -> bool:
    """Native bf16 matmuls (AVX512-BF16 / AMX) make bf16 autocast ~3× faster than fp32 on CPU."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> tuple[str, object]:
    name = ("bf16" if bf16_is_fast() else "fp32") if precision == "auto" else precision
    if name == "bf16":
        return name, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return name, contextlib.nullcontext


def prepare(recipe: Recipe, *, attach: bool = True, resume_from: Path | None = None) -> Run:
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    records = read_jsonl(recipe.data.train)
    fmt = detect_format(records, recipe.data.format)
    task = "classification" if fmt == "classification" else "causal_lm"
    labels = label_names(records, recipe.data.labels) if task == "classification" else None
    dtype_name, autocast = resolve_precision(recipe.precision)
    model, tokenizer = load_model(recipe.model, task=task, num_labels=len(labels or []),
                                  dtype=torch.bfloat16 if dtype_name == "bf16" else torch.float32)
    eval_records = read_jsonl(recipe.data.eval) if recipe.data.eval else []
    if eval_records:
        detect_format(eval_records, fmt)
    elif recipe.data.eval_split > 0:
        order = list(range(len(records)))
        random.Random(recipe.seed).shuffle(order)
        cut = max(1, int(len(records) * recipe.data.eval_split))
        eval_records = [records[i] for i in order[:cut]]
        records = [records[i] for i in order[cut:]]
    spec = recipe.data
    train_examples, stats = render(records, tokenizer, fmt, max_length=spec.max_length,
                                   completion_only=spec.completion_only, labels=labels)
    eval_examples = []
    if eval_records:
        eval_examples, _ = render(eval_records, tokenizer, fmt, max_length=spec.max_length,
                                  completion_only=spec.completion_only, labels=labels)
        if recipe.eval.max_examples:
            eval_examples = eval_examples[:recipe.eval.max_examples]
    adapters = [ADAPTER] + ([HEAD] if task == "classification" else [])
    run = Run(recipe, model, tokenizer, fmt, task, train_examples, eval_examples, stats, labels, adapters, autocast,
              dtype_name, recipe.eval.metrics or DEFAULT_METRICS[fmt])
    if attach:
        _attach_adapters(run, resume_from)
    return run


def _attach_adapters(run: Run, resume_from: Path | None) -> None:
    recipe, model = run.recipe, run.model
    if resume_from is not None:
        for name in run.adapters:
            load_adapter(model, resume_from / name, name=name, trainable=True)
    elif recipe.init_from:
        load_adapter(model, recipe.init_from, name=ADAPTER, trainable=True)
        if run.task == "classification":
            head_dir = Path(recipe.init_from).parent / HEAD
            load_adapter(model, head_dir, name=HEAD, trainable=True) if head_dir.is_dir() else _attach_head(model)
    else:
        api.attach(model, method_config(recipe.method, **recipe.delta), name=ADAPTER)
        if run.task == "classification":
            _attach_head(model)
    api.use(model, run.adapters)
    if recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _attach_head(model: torch.nn.Module) -> None:
    from ..core.hosts import host_kind

    heads = [p for p, m in model.named_modules() if p.endswith(("classifier", "score")) and host_kind(m)]
    if not heads:
        raise DeltatuneError(f"{type(model).__name__}: no classification head (classifier / score) found")
    api.attach(model, method_config("full", targets=heads), name=HEAD)


def total_steps(recipe: Recipe, stream: BatchStream) -> int:
    if recipe.steps is not None:
        return recipe.steps
    return max(1, math.ceil(recipe.epochs * stream.batches_per_epoch / recipe.grad_accum))


def lr_factor(step: int, total: int, recipe: Recipe) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based): warmup, then the schedule."""
    spec = recipe.schedule
    warmup = spec.warmup_steps or int(spec.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    if spec.name == "constant":
        return 1.0
    shape = 1.0 - progress if spec.name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * shape


def batch_context_classes(model: torch.nn.Module) -> list[type[Delta]]:
    """The delta classes in the model that need a context around each training batch (ReFT's prompt positions):
    those overriding `Delta.training_batch`. Found once per run, not on every micro-batch."""
    from ..core.slot import slots_of

    classes = {type(d) for _, _, slot in slots_of(model) for d in slot.values()}
    return [c for c in classes if c.training_batch.__func__ is not Delta.training_batch.__func__]


def micro_loss(step_module: torch.nn.Module, run: Run, batch: dict, context_classes: list[type[Delta]]):
    with run.autocast(), contextlib.ExitStack() as stack:
        for cls in context_classes:
            stack.enter_context(cls.training_batch(run.model, batch))
        return step_module(batch)


def loss_tokens(run: Run, batch: dict) -> int:
    if run.task == "classification":
        return int(batch["class_labels"].numel())
    return int((batch["labels"][:, 1:] != -100).sum())


def train(recipe: Recipe, *, resume: bool = False, progress: bool = True, distributed=None) -> dict:
    """Run a recipe to the end (or from its latest checkpoint with resume=True). Returns the final metrics."""
    out = check_output_dir(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    found = ckpt.checkpoints(out)
    if resume and not found:
        raise DeltatuneError(f"nothing to resume: {out}/checkpoints holds no complete checkpoint")
    if not resume and found:
        raise DeltatuneError(f"{out} already holds checkpoints of a run; pass --resume to continue it, or choose "
                             "another output_dir")
    is_main = distributed is None or distributed.is_main
    if resume and is_main:
        ckpt.clean_staging(out)
    latest = found[-1] if resume else None
    run = prepare(recipe, resume_from=latest)
    step_module = LossModule(run.model, run.task, recipe.loss_chunk)
    if distributed is not None:
        step_module = distributed.wrap(step_module)
    rows = pack(run.train_examples, recipe.data.max_length) if recipe.data.packing else [[e] for e in run.train_examples]
    world = 1 if distributed is None else distributed.world
    if len(rows) < recipe.batch_size * world:
        raise DeltatuneError(f"the training data has {len(rows)} rows, fewer than one global batch "
                             f"({recipe.batch_size} × {world}); lower batch_size")
    stream = BatchStream(rows, recipe.batch_size * world, recipe.seed, run.tokenizer.pad_token_id)
    steps = total_steps(recipe, stream)
    opt = recipe.optimizer
    if latest is None and recipe.initialize.name and recipe.init_from is None:
        _initialize(run, stream, recipe)
    optimizer = build_optimizer(run.model, opt)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    step = 0
    if latest is not None:
        state, tensors = ckpt.read_checkpoint(latest)
        ckpt.restore_optimizer(optimizer, tensors, state["optimizer"])
        ckpt.restore_rng(state, tensors)
        stream.seek(state["position"])
        step = state["step"]
    if latest is None and is_main:
        (out / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run in a reused directory starts a fresh log
    log = MetricsLog(out / "metrics.jsonl", out / "tensorboard" if recipe.tensorboard and is_main else None)
    if is_main and latest is None:
        (out / "manifest.json").write_text(json.dumps(manifest(recipe.to_dict(), _data_files(recipe)), indent=2))
    results = {"before": None}
    if latest is None and recipe.eval.before and run.eval_examples:
        results["before"] = _evaluate(run, log, step, distributed)
    bar = _progress(progress and is_main, steps, step)
    context_classes = batch_context_classes(run.model)
    best, started, tokens_seen = math.inf, time.perf_counter(), 0
    while step < steps:
        factor = lr_factor(step, steps, recipe)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        global_batches = [stream.next() for _ in range(recipe.grad_accum)]
        local = [distributed.shard(b) if distributed else b for b in global_batches]
        n_tokens = sum(loss_tokens(run, b) for b in global_batches)  # the normalisation of the whole step
        step_module.train()
        total = 0.0
        for batch in local:
            loss_sum, _, reg = micro_loss(step_module, run, batch, context_classes)
            objective = loss_sum * world / max(n_tokens, 1)  # DDP averages over ranks; undo that
            if reg is not None:  # once per optimizer step in total
                objective = objective + reg / recipe.grad_accum
            objective.backward()
            total += float(loss_sum.detach())
        if distributed is not None:
            total = distributed.sum(total)
        loss = total / max(n_tokens, 1)
        _watchdog(loss, best, step, out, recipe.max_loss_ratio)
        best = min(best, loss)
        if opt.grad_clip:
            torch.nn.utils.clip_grad_norm_(api.trainable_parameters(run.model), opt.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _after_step(run.model, optimizer, step + 1, steps)
        step += 1
        tokens_seen += sum(int(b["tokens"]) for b in global_batches)
        elapsed = time.perf_counter() - started
        if is_main and (step % recipe.log_every == 0 or step == steps):
            log.write({"kind": "train", "step": step, "loss": loss, "lr": opt.lr * factor, "tokens": tokens_seen,
                       "tokens_per_s": tokens_seen / max(elapsed, 1e-9), "elapsed_s": elapsed})
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}")
            bar.update(1)
        if recipe.eval.every and step % recipe.eval.every == 0 and step < steps and run.eval_examples:
            _evaluate(run, log, step, distributed)
        if recipe.checkpoint.every and step % recipe.checkpoint.every == 0:
            _checkpoint(run, out, step, optimizer, stream, distributed)
    if bar is not None:
        bar.close()
    results["after"] = _evaluate(run, log, step, distributed) if run.eval_examples else None
    with _gathered(distributed):
        if is_main:
            save_adapter(run.model, out / "adapter", name=ADAPTER)
            if run.task == "classification":
                save_adapter(run.model, out / HEAD, name=HEAD)
    if is_main:
        results["peak_rss_bytes"] = peak_rss_bytes()
        results["trainable_parameters"] = sum(p.numel() for p in api.trainable_parameters(run.model))
        results["train_seconds"] = time.perf_counter() - started
        results["tokens_per_s"] = tokens_seen / max(results["train_seconds"], 1e-9)
        plot_curves(out / "metrics.jsonl", out / "loss.png")
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if distributed is not None:
        distributed.barrier()
    return results


def _after_step(model: torch.nn.Module, optimizer, step: int, total: int) -> None:
    """Per-adapter training hooks (rank allocation, freezing, restarts) after every optimizer step."""
    from ..core.slot import slots_of

    by_adapter: dict[str, dict] = {}
    for path, _, slot in slots_of(model):
        for name, delta in slot.items():
            by_adapter.setdefault(name, {})[path] = delta
    for deltas in by_adapter.values():
        first = next(iter(deltas.values()))
        if type(first).after_step.__func__ is not Delta.after_step.__func__:
            restarted = type(first).after_step(deltas, step, total)
            for param in restarted or ():
                optimizer.state.pop(param, None)  # COLA: a restarted LoRA starts with fresh moments


def _initialize(run: Run, stream: BatchStream, recipe: Recipe) -> None:
    """A data-driven initialisation on the first training batches; the data stream starts again afterwards."""
    import importlib

    spec = recipe.initialize
    batches = [stream.next() for _ in range(spec.batches)]
    stream.seek({"epoch": 0, "index": 0})
    module = importlib.import_module("deltatune.algorithms.inits")
    with run.autocast():
        module.initialize(run.model, ADAPTER, spec.name, batches, **spec.options)


def _data_files(recipe: Recipe) -> list[str]:
    files = []
    for value in (recipe.data.train, recipe.data.eval):
        files += [value] if isinstance(value, str) else list(value or [])
    return files


def _progress(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _watchdog(loss: float, best: float, step: int, out: Path, ratio: float) -> None:
    """Stop before a bad update is applied; the last checkpoint stays the last good state."""
    kept = ckpt.checkpoints(out)
    where = f"the last good checkpoint is {kept[-1]}" if kept else "no checkpoint was written yet"
    if not math.isfinite(loss):
        raise DeltatuneError(f"training diverged at step {step + 1}: the loss is {loss}; {where} "
                             "(lower optimizer.lr or enable optimizer.grad_clip)")
    if step >= 10 and best < math.inf and loss > best * ratio and loss - best > 1.0:
        raise DeltatuneError(f"training diverged at step {step + 1}: loss {loss:.3f} is over {ratio:g}× its best "
                             f"{best:.3f}; {where} (lower optimizer.lr)")


def _gathered(distributed):
    return contextlib.nullcontext() if distributed is None else distributed.gathered()


def _evaluate(run: Run, log: MetricsLog, step: int, distributed) -> dict:
    """Every rank evaluates (sharded models need all ranks in each forward); the main rank logs."""
    spec = run.recipe.eval
    with _gathered(distributed):
        result = evaluate(run.model, run.tokenizer, run.eval_examples, metrics=run.metrics, batch_size=spec.batch_size,
                          max_new_tokens=spec.max_new_tokens, loss_chunk=run.recipe.loss_chunk, autocast=run.autocast)
    if distributed is None or distributed.is_main:
        log.write({"kind": "eval", "step": step, **{k: v for k, v in result.items() if k != "samples"}})
    return result


def _checkpoint(run: Run, out: Path, step: int, optimizer, stream: BatchStream, distributed) -> None:
    optimizer_state = ckpt.optimizer_payload(optimizer)  # every rank: gathering sharded state is collective
    with _gathered(distributed):
        if distributed is None or distributed.is_main:
            ckpt.save_checkpoint(out, step, run.model, run.adapters, optimizer_state, stream.position(),
                                 {"recipe": run.recipe.to_dict()}, run.recipe.checkpoint.keep)
    if distributed is not None:
        distributed.barrier()


def dry_run(recipe: Recipe) -> dict:
    """The resolved recipe, trainable parameters and a peak-memory estimate; nothing is trained or written."""
    run = prepare(recipe)
    trainable = sum(p.numel() for p in api.trainable_parameters(run.model))
    total = sum(p.numel() for p in run.model.parameters())
    lengths = sorted(run.stats.lengths)
    tokens = recipe.data.max_length * recipe.batch_size if recipe.data.packing else \
        recipe.batch_size * lengths[int(0.95 * (len(lengths) - 1))]
    estimate = memory_estimate(run.model, trainable, tokens, getattr(run.model.config, "vocab_size", 0),
                               recipe.loss_chunk, 2 if run.dtype_name == "bf16" else 4, recipe.gradient_checkpointing)
    return {"recipe": recipe.to_dict(), "format": run.fmt, "precision": run.dtype_name,
            "trainable_parameters": trainable, "total_parameters": total, "data": run.stats.summary(),
            "eval_examples": len(run.eval_examples), "memory_estimate_bytes": estimate}
