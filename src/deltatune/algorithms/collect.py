"""What data-driven inits read from a few batches: the inputs each adapted layer sees, and the full gradient of its
base weight — both taken on the *base* model (adapters switched off), with a progress bar.

Batches are dicts from `deltatune.train.data.collate` (input_ids, attention_mask, labels, ...), tuples
(inputs, targets), or plain input tensors (activation statistics only). The loss of a batch is the causal-LM loss
when it has `labels`, cross-entropy on `class_labels`, cross-entropy / MSE against the targets of a tuple, or
`loss_fn(model, batch)` when given.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import api
from ..core.errors import DeltatuneError
from ..core.hosts import base_weight_parameter, to_matrix
from ..core.slot import slots_of

IGNORE_INDEX = -100
_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")
LossFn = Callable[[nn.Module, object], Tensor]


def progress_bar(items: list, desc: str, enabled: bool):
    """tqdm over `items` (a plain iterator when progress is off)."""
    if not enabled:
        return iter(items)
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="batch", dynamic_ncols=True, leave=False)


def as_batches(batches: Iterable) -> list:
    items = list(batches)
    if not items:
        raise DeltatuneError("a data-driven init needs at least one batch; got none")
    return items


def run_model(model: nn.Module, batch) -> object:
    """Forward one batch (no loss)."""
    if isinstance(batch, dict):
        return model(**{k: batch[k] for k in _INPUT_KEYS if k in batch})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def token_mask(batch, use_labels: bool) -> Tensor | None:
    """(batch, tokens) bool: the positions whose activations count (loss tokens, else non-padding), or None."""
    if not isinstance(batch, dict):
        return None
    if use_labels and "labels" in batch:
        return batch["labels"] != IGNORE_INDEX
    mask = batch.get("attention_mask")
    return mask.bool() if mask is not None and mask.ndim == 2 else None


def batch_loss(model: nn.Module, batch, loss_fn: LossFn | None = None) -> Tensor:
    if loss_fn is not None:
        return loss_fn(model, batch)
    if isinstance(batch, dict) and "labels" in batch:
        inputs = {k: batch[k] for k in _INPUT_KEYS if k in batch}
        return model(**inputs, labels=batch["labels"]).loss
    if isinstance(batch, dict) and "class_labels" in batch:
        return F.cross_entropy(_logits(run_model(model, batch)).float(), batch["class_labels"])
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        out, target = _logits(model(batch[0])).float(), batch[1]
        if target.dtype in (torch.long, torch.int32, torch.int64):
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
        return F.mse_loss(out, target.float())
    raise DeltatuneError("this init needs a loss: give batches with labels / class_labels, (inputs, targets) "
                         "tuples, or pass loss_fn=callable(model, batch)")


def _logits(out) -> Tensor:
    return out.logits if hasattr(out, "logits") else out


def adapter_hosts(model: nn.Module, adapter: str) -> dict[str, tuple[nn.Module, object]]:
    """{path: (host module, delta)} of one adapter."""
    return {path: (module, slot[adapter]) for path, module, slot in slots_of(model) if adapter in slot}


@contextmanager
def base_model(model: nn.Module):
    """Adapters off and eval mode (no dropout) while statistics are taken; everything restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with api.use(model, None):
            yield
    finally:
        model.train(was_training)


def collect_inputs(model: nn.Module, modules: dict[str, nn.Module], batches: list, on_rows: Callable, *,
                   use_labels: bool = True, progress: bool = True, desc: str = "init") -> dict[str, list[str]]:
    """Run the base model over `batches` and call on_rows(path, rows) with each module's input rows (n, in_features,
    float32) at the counted positions. Modules that receive the very same input tensor (q, k and v) are reported
    once, under the first of them: returns {that path: every path of its group}."""
    groups: dict[str, list[str]] = {}
    seen: dict[int, tuple[weakref.ref, str]] = {}
    mask_now: list = [None]

    def hook(path):
        def record(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            entry = seen.get(id(x))
            if entry is not None and entry[0]() is x:  # the same live tensor: a sibling of an earlier module
                if path not in groups[entry[1]]:
                    groups[entry[1]].append(path)
                return
            seen[id(x)] = (weakref.ref(x), path)
            groups.setdefault(path, [path])
            mask = mask_now[0]
            good = mask is not None and x.ndim == 3 and tuple(mask.shape) == tuple(x.shape[:2])
            rows = x[mask] if good else x.reshape(-1, x.shape[-1])
            on_rows(path, rows.detach().float())
        return record

    handles = [m.register_forward_pre_hook(hook(p), with_kwargs=True) for p, m in modules.items()]
    try:
        with base_model(model), torch.no_grad():
            for batch in progress_bar(batches, desc, progress):
                seen.clear()
                mask_now[0] = token_mask(batch, use_labels)
                run_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return groups


def collect_gradients(model: nn.Module, hosts: dict[str, nn.Module], batches: list, *,
                      loss_fn: LossFn | None = None, progress: bool = True, desc: str = "init") -> dict[str, Tensor]:
    """The mean over batches of ∂L/∂W for every host's base weight, in the matrix view (out, fan_in), float32."""
    from ..core.hosts import host_info

    weights = {p: base_weight_parameter(m) for p, m in hosts.items()}
    flags = {p: w.requires_grad for p, w in weights.items()}
    sums = {p: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for p, w in weights.items()}
    try:
        for weight in weights.values():
            weight.requires_grad_(True)
            weight.grad = None
        with base_model(model):
            for batch in progress_bar(batches, desc, progress):
                batch_loss(model, batch, loss_fn).backward()
                for path, weight in weights.items():
                    if weight.grad is not None:
                        sums[path] += weight.grad.float()
                    weight.grad = None
    finally:
        for path, weight in weights.items():
            weight.requires_grad_(flags[path])
            weight.grad = None
        for p in api.trainable_parameters(model):
            p.grad = None
    return {p: to_matrix(host_info(hosts[p], p), s / len(batches)) for p, s in sums.items()}
