"""The contract every method implements: a `Delta` is one adapter's parameters on one host module.

A method subclasses `Delta` and provides:

- `forward(x, y, host) -> Tensor`: the host's output `y` (for input `x`) with this delta applied. Several active
  deltas on one host are applied in turn, each receiving the output of the previous one. Weight-space methods return
  `y + x·ΔWᵀ` (possibly computed in factored form); activation-space methods (bottleneck adapters, ReFT, ...) may
  transform `y` any way they like — the core never assumes a delta is a weight.
- `delta_weight(host) -> Tensor | None`: ΔW in the host weight's own layout when the update can be written as a weight
  (and `delta_bias(host)` for a bias update). Merge, unmerge, weighted arithmetic, conversion to LoRA, analysis and
  export are built on this alone. Deltas that leave it as None are simply not mergeable.
- `per_row(deltas, slots, x, y, host, cache)` (classmethod, optional): apply several deltas of this class to one
  batch, row `i` getting `deltas[slots[i]]` (or nothing where `slots[i] < 0`). Override it with a gathered
  (bmm/einsum) kernel; the inherited version runs each delta on its own rows only.
- `num_parameters(config, info, path)` (classmethod): the paper's parameter-count formula, checked against the real
  count by the test matrix.
- `pre_forward(args, kwargs, host)` (optional): change the host's *inputs* before it runs (prompt and prefix
  tuning insert virtual tokens at the model body); `per_row_pre_forward` is its mixed-batch form.
- `setup(host)` (optional): initialisation that needs the base weight (DoRA's magnitude, SVD-based inits).
- `make_shared(config, hosts)` (classmethod, optional): a module of adapter-wide tensors (a vector bank, shared
  random bases, a hypernetwork) created once per adapter; every delta of that adapter sees it as `self.shared`.
  It is registered under the adapter's first delta only, so it is saved, moved and trained exactly once.
- `state_tensors(host)` / `load_state_tensors(tensors, host)`: the on-disk tensors, keyed by the suffix that follows
  the module path in the file (PEFT names for methods PEFT knows).
"""

from __future__ import annotations

import contextlib

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from .errors import DeltatuneError
from .hosts import HostInfo, per_channel

if TYPE_CHECKING:
    from .slot import Host


class Delta(nn.Module):
    """Base class of all deltas. Subclasses set the class attributes and implement the contract above.

    Class attributes:
        identity_at_init: the default init leaves the host's output unchanged.
        fast_parameters: parameter names that LoRA+ gives the higher learning rate (the "B" side).
        frozen_parameters: parameter names that never train (e.g. LoRA-FA's A).
        uses_base_weight: delta_weight depends on the base weight (DoRA, OFT, ...), so merging keeps a copy of
            what it added in order to unmerge exactly.
        peft_layer_copies: key suffixes PEFT also writes under every layer for adapter-wide tensors (RandLoRA's
            bases); dropped on load (the adapter-wide key is loaded once), never written.
    """

    identity_at_init: ClassVar[bool] = True
    fast_parameters: ClassVar[tuple[str, ...]] = ()
    frozen_parameters: ClassVar[tuple[str, ...]] = ()
    uses_base_weight: ClassVar[bool] = False
    raw_output: ClassVar[bool] = False  # forward gets the host's output as is (tuple / ModelOutput), not a tensor
    peft_layer_copies: ClassVar[tuple[str, ...]] = ()

    shared: nn.Module | None = None  # set by attach when the method has adapter-wide tensors (see make_shared)

    def __init__(self, config: Any, info: HostInfo, path: str) -> None:
        super().__init__()
        self.config = config
        self.info = info
        self.path = path

    # ---- the contract -------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, y: Tensor, host: "Host") -> Tensor:
        """Default for weight-space deltas: y + host_op(x, ΔW) (+ Δb)."""
        weight = self.delta_weight(host)
        if weight is None:
            raise NotImplementedError(f"{type(self).__name__} must implement forward or delta_weight")
        out = y + host.apply(x, weight).to(y.dtype)
        bias = self.delta_bias(host)
        if bias is not None:
            out = out + per_channel(self.info, bias.to(y.dtype), out.ndim)
        return out

    def delta_weight(self, host: "Host") -> Tensor | None:
        """ΔW in the host weight's layout, or None when the update is not a weight."""
        return None

    def delta_bias(self, host: "Host") -> Tensor | None:
        """Δb of shape (out_features,), or None."""
        return None

    @classmethod
    def per_row(
        cls, deltas: list["Delta"], slots: Tensor, x: Tensor, y: Tensor, host: "Host", cache: dict
    ) -> Tensor:
        """Grouped fallback: each delta runs on the rows routed to it, the other rows pass through."""
        out = y
        for k, delta in enumerate(deltas):
            rows = (slots == k).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            part = delta(x.index_select(0, rows), y.index_select(0, rows), host.select_rows(rows))
            out = out.index_copy(0, rows, part)
        return out

    def pre_forward(self, args: tuple, kwargs: dict, host: "Host") -> tuple[tuple, dict]:
        """The host's inputs, changed (default: unchanged; only called for classes that override it)."""
        return args, kwargs

    @classmethod
    def per_row_pre_forward(cls, deltas: list["Delta"], slots: Tensor, args: tuple, kwargs: dict, host: "Host",
                            cache: dict) -> tuple[tuple, dict]:
        """Mixed-batch form of `pre_forward`: row i uses deltas[slots[i]] (or none when slots[i] < 0)."""
        raise DeltatuneError(f"{cls.__name__} changes its host's inputs and has no per-row path for mixed batches")

    def setup(self, host: "Host") -> None:
        """Called once after the delta is placed on its host; for inits that read the base weight."""

    @classmethod
    def num_parameters(cls, config: Any, info: HostInfo, path: str) -> int:
        """Trainable parameters this delta has on a host, from the paper's formula."""
        raise NotImplementedError(f"{cls.__name__} must give its parameter-count formula")

    @classmethod
    def after_step(cls, deltas: dict[str, "Delta"], step: int, total_steps: int) -> None:
        """Called by the trainer after every optimizer step with one adapter's deltas ({module path: delta}), for
        methods that reallocate rank, freeze, prune or restart during training (AdaLoRA, DyLoRA, COLA, ...)."""

    @classmethod
    def training_batch(cls, model: nn.Module, batch: dict) -> contextlib.AbstractContextManager:
        """A context the trainer enters around one training batch's forward, once per delta class in the model
        (ReFT: which positions are the prompt's, so training edits the positions that generation edits)."""
        return contextlib.nullcontext()

    def regularization_loss(self) -> Tensor | None:
        """A term the trainer adds to the loss while this delta trains (e.g. AdapterFusion's value-identity
        regulariser, a mixture's load-balancing loss); None when the method has none."""
        return None

    @classmethod
    def num_shared_parameters(cls, config: Any, hosts: dict[str, HostInfo]) -> int:
        """Trainable parameters of the adapter-wide module (the paper's formula), 0 without one."""
        return 0

    @classmethod
    def identity_for(cls, config: Any) -> bool:
        """Whether this config starts as the identity (methods where it depends on a field override this)."""
        return cls.identity_at_init

    @classmethod
    def make_shared(cls, config: Any, hosts: dict[str, HostInfo]) -> nn.Module | None:
        """Adapter-wide tensors shared by all this adapter's deltas, or None."""
        return None

    @classmethod
    def shared_state_tensors(cls, shared: nn.Module) -> dict[str, Tensor]:
        """On-disk tensors of the shared module, keyed relative to `base_model.` (where PEFT puts adapter-wide
        tensors, e.g. `base_model.vera_A`); by default under `base_model.model.deltatune_shared.`."""
        return {f"model.deltatune_shared.{k}": v.detach() for k, v in shared.state_dict().items()}

    @classmethod
    def load_shared_state_tensors(cls, shared: nn.Module, tensors: dict[str, Tensor]) -> None:
        """Inverse of `shared_state_tensors`; keys and shapes were checked by the caller."""
        own = shared.state_dict()
        with torch.no_grad():
            for key, value in tensors.items():
                own[key[len("model.deltatune_shared."):]].copy_(value)

    # ---- serialisation ------------------------------------------------------------------------------------------
    def state_tensors(self, host: "Host") -> dict[str, Tensor]:
        """On-disk tensors by key suffix. Default: every parameter and persistent buffer under its own name."""
        return {name: t.detach() for name, t in self._own_state().items()}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: "Host") -> None:
        """Inverse of `state_tensors`; keys and shapes were checked by the caller against `state_tensors(host)`."""
        own = self._own_state()
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value)

    def _own_state(self) -> dict[str, Tensor]:
        """This delta's tensors, without the adapter-wide module that the first delta also holds."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("shared.")}

    # ---- helpers for subclasses ---------------------------------------------------------------------------------
    def trainable(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n not in self.frozen_parameters]

    def check_rank(self, r: int, limit: int | None = None) -> None:
        if r <= 0:
            raise DeltatuneError(f"{self.config.method}: rank must be > 0 at {self.path!r}, got {r}")
        if limit is not None and r > limit:
            raise DeltatuneError(f"{self.config.method}: rank {r} exceeds {limit} at {self.path!r}; lower r")


def has_pre_forward(delta_cls: type[Delta]) -> bool:
    return delta_cls.pre_forward is not Delta.pre_forward


def is_mergeable(delta_cls: type[Delta]) -> bool:
    """A method can merge iff it says how to write its update as a weight."""
    return delta_cls.delta_weight is not Delta.delta_weight


def mixed_batch_path(delta_cls: type[Delta]) -> str:
    """'gathered' when the method has its own per-row kernel, else 'grouped'."""
    return "gathered" if delta_cls.per_row.__func__ is not Delta.per_row.__func__ else "grouped"
