"""Data-parallel training under `torchrun`: DDP or FSDP2 (`fully_shard`), on the gloo backend (CPU).

`deltatune train` notices WORLD_SIZE > 1 and runs one rank per process. Every rank walks the same global batch
sequence (batch_size × world rows per micro-batch) and takes its own slice of rows; the loss of a step is the sum
of token losses over the whole global batch divided by its token count, so the result matches a single process
with the same global batch. Adapters are saved by rank 0 with the full (gathered) tensors.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..core.errors import DeltatuneError
from .loss import causal_lm_loss, classification_loss


class LossModule(nn.Module):
    """The whole loss computation as one module, so DDP / FSDP see it as the forward they wrap."""

    def __init__(self, model: nn.Module, task: str, chunk: int) -> None:
        super().__init__()
        self.model, self.task, self.chunk = model, task, chunk

    def forward(self, batch: dict) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """(sum of token losses, loss tokens, the deltas' regularisation terms or None)."""
        if self.task == "classification":
            loss, n, _ = classification_loss(self.model, batch)
        else:
            loss, n = causal_lm_loss(self.model, batch, chunk=self.chunk)
        return loss, n, regularization(self.model)


def regularization(model: nn.Module) -> torch.Tensor | None:
    """Sum of `regularization_loss()` over the deltas that train (AdapterFusion, KaSA, mixtures, ...)."""
    from ..core.slot import slots_of

    terms = []
    for _, _, slot in slots_of(model):
        for delta in slot.values():
            if any(p.requires_grad for p in delta.parameters()):
                term = delta.regularization_loss()
                if term is not None:
                    terms.append(term)
    return torch.stack([t.float() for t in terms]).sum() if terms else None


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (the ModuleList holding most parameters)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise DeltatuneError(f"{type(model).__name__}: no list of layers found to shard with FSDP")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


class Distributed:
    """One rank of a data-parallel run."""

    def __init__(self, strategy: str) -> None:
        if strategy not in ("ddp", "fsdp"):
            raise DeltatuneError(f"distributed must be 'ddp' or 'fsdp', got {strategy!r}")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
        self.strategy = strategy
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.sharded: list[nn.Module] = []

    def wrap(self, module: LossModule) -> nn.Module:
        """The loss module as the training step should call it."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(module)
        from torch.distributed.fsdp import fully_shard

        for layer in layer_stack(module.model):
            fully_shard(layer)
            self.sharded.append(layer)
        fully_shard(module)
        self.sharded.append(module)
        return module

    def shard(self, batch: dict) -> dict:
        """This rank's rows of a global micro-batch."""
        rows = batch["input_ids"].shape[0] // self.world
        part = slice(self.rank * rows, (self.rank + 1) * rows)
        return {k: (v[part] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in batch.items()}

    def sum(self, value: float) -> float:
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total)

    def gathered(self):
        """Context in which every parameter is a full local tensor (FSDP all-gathers; DDP has nothing to do)."""
        rank = self

        class _Gathered:
            def __enter__(self):
                for module in rank.sharded:
                    module.unshard()

            def __exit__(self, *exc):
                for module in rank.sharded:
                    module.reshard()

        return _Gathered()

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
