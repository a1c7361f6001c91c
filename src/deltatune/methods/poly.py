"""Polytropon (Poly) and Multi-Head Routing (MHR): task-indexed routing over an inventory of LoRA skills.

- Poly: "Combining Modular Skills in Multitask Learning", Ponti et al., 2022, https://arxiv.org/abs/2202.13914
- MHR: "Multi-Head Adapter Routing for Cross-Task Generalization", Caccia et al., 2023,
  https://arxiv.org/abs/2211.03831 (n_splits > 1)

Every adapted layer holds K LoRA skills (Aₖ, Bₖ) and a routing matrix Z of shape (tasks, K) — one logit per task and
skill. A row of task t uses the normalised skill weights
    wₖ = σ(Z[t, k]) / Σⱼ σ(Z[t, j])           (training: a relaxed-Bernoulli sample instead of σ, temperature 1),
    A_t = Σₖ wₖ·Aₖ,  B_t = Σₖ wₖ·Bₖ,   y = W·x + (1/r)·B_tᵀ·A_tᵀ·x   (Aₖ stored (in, r), Bₖ (r, out), as PEFT).
MHR splits the input and output dimensions into S heads, each with its own routing over the skills' slices: Z has
S·K logits per task, Aₖ (S, in/S, r) and Bₖ (S, r, out/S). Poly is MHR with S = 1.
Init (PEFT's): Aₖ Kaiming-uniform (bound 1/√(in/S)), Bₖ = 0 (identity at init; init="random" draws B too), Z uniform
in ±10⁻³. Shapes: poly_lora_A (S, K, in/S, r), poly_lora_B (S, K, r, out/S), poly_router.module_logits (tasks, S·K):
K·r·(in + out) + tasks·S·K trainable parameters per layer. PEFT format: peft_type "POLY", PEFT's tensor names.

Task ids: `with poly.tasks(model, [0, 2, 1]): model(x)` gives row i the task ids[i] (one id for every row is accepted
too); with n_tasks = 1 no ids are needed. For one task the update is the weight ΔW = (1/r)·(A_t·B_t)ᵀ, so a Poly
adapter merges (for the current task; change tasks only while unmerged). Mixed batches: gathered (one batched matmul
for the whole batch, each row with its adapter's and task's mixed factors). `last_routing` holds the skill weights.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from ..core.config import DeltaConfig
from ..core.delta import Delta
from ..core.errors import DeltatuneError
from ..core.hosts import LINEAR_KINDS, HostInfo, from_matrix
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host, slots_of
from .factored import refuse_unknown_peft_fields
from .mixture import check_counts, kaiming_rows_, record_routing

EPS = 1e-12  # PEFT's guard in the normalisation of the skill weights


@dataclasses.dataclass(frozen=True, kw_only=True)
class PolyConfig(DeltaConfig):
    """Attributes:
    r: rank of every skill.
    n_tasks: rows of the routing matrix (task ids run from 0 to n_tasks - 1).
    n_skills: K, the LoRA skills in each layer's inventory.
    n_splits: S, MHR's routing heads (1 = Poly); must divide the layers' input and output widths.
    init: "default" (B = 0, identity at init) or "random" (B Kaiming-uniform too; tests, PEFT's init_weights=False).
    """

    r: int = 8
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1
    init: Literal["default", "random"] = "default"

    def validate(self) -> None:
        super().validate()
        check_counts(self.method, r=self.r, n_tasks=self.n_tasks, n_skills=self.n_skills, n_splits=self.n_splits)


class PolyDelta(Delta):
    """A skill inventory with a per-task router; `task_ids` is set by `tasks(...)`."""

    task_ids: Tensor | None = None

    def __init__(self, config: PolyConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path)
        splits, skills, r = config.n_splits, config.n_skills, config.r
        if info.in_features % splits or info.out_features % splits:
            raise DeltatuneError(f"poly: n_splits={splits} must divide the widths of {path!r} ({info.in_features} -> "
                                 f"{info.out_features}); pick a divisor or exclude the module")
        d_in, d_out = info.in_features // splits, info.out_features // splits
        a = kaiming_rows_(torch.empty(splits, skills, r, d_in))  # PEFT: Kaiming of (r, d_in), stored transposed
        self.poly_lora_A = nn.Parameter(a.transpose(2, 3).contiguous())
        self.poly_lora_B = nn.Parameter(torch.zeros(splits, skills, r, d_out))
        if config.init == "random":
            kaiming_rows_(self.poly_lora_B.data.transpose(2, 3))
        self.module_logits = nn.Parameter(torch.empty(config.n_tasks, splits * skills).uniform_(-1e-3, 1e-3))

    # ---- routing --------------------------------------------------------------------------------------------------
    def row_tasks(self, batch: int) -> Tensor:
        """The task id of each of `batch` rows (ids given for fewer rows are repeated, as generate() expands them)."""
        ids = self.task_ids
        if ids is None:
            if self.config.n_tasks > 1:
                raise DeltatuneError(f"poly adapter at {self.path!r} has n_tasks={self.config.n_tasks}: give each "
                                     "row's task with `with deltatune.methods.poly.tasks(model, ids): ...`")
            return torch.zeros(batch, dtype=torch.long, device=self.module_logits.device)
        ids = ids.to(self.module_logits.device)
        if ids.numel() == 1:
            return ids.expand(batch)
        if batch % ids.numel():
            raise DeltatuneError(f"poly: {ids.numel()} task ids for a batch of {batch} rows at {self.path!r}; give "
                                 "one id per row (or one for all)")
        return ids.repeat_interleave(batch // ids.numel())

    def skill_weights(self, ids: Tensor, sample: bool) -> Tensor:
        """(rows, S, K) normalised skill weights for task ids (sampled from a relaxed Bernoulli while training)."""
        logits = self.module_logits[ids].view(-1, self.config.n_splits, self.config.n_skills)
        gates = RelaxedBernoulli(temperature=1.0, logits=logits).rsample() if sample else torch.sigmoid(logits)
        return gates / (gates.sum(dim=-1, keepdim=True) + EPS)

    def mixed_factors(self, ids: Tensor, sample: bool) -> tuple[Tensor, Tensor]:
        """Per row: A_t (rows, in, r) and B_t / r (rows, r, out)."""
        weights = self.skill_weights(ids, sample)
        record_routing(self, weights)
        rows, r = ids.shape[0], self.config.r
        a = torch.einsum("bqs,qsdr->bqdr", weights, self.poly_lora_A).reshape(rows, self.info.in_features, r)
        b = torch.einsum("bqs,qsrd->bqrd", weights, self.poly_lora_B)  # (rows, S, r, out/S)
        b = b.transpose(1, 2).reshape(rows, r, self.info.out_features)
        return a, b / r

    # ---- the contract ---------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        a, b = self.mixed_factors(self.row_tasks(x.shape[0]), sample=self.training)
        return y + _apply_rows(x, a, b).to(y.dtype)

    def delta_weight(self, host: Host) -> Tensor:
        ids = self.row_tasks(1) if self.task_ids is None or self.task_ids.numel() == 1 else self.task_ids.unique()
        if ids.numel() != 1:
            raise DeltatuneError(f"poly: merging needs one task, but the current task ids are {ids.tolist()}; set a "
                                 "single task with deltatune.methods.poly.tasks(model, [t])")
        a, b = self.mixed_factors(ids, sample=False)
        return from_matrix(self.info, (a[0] @ b[0]).t())

    @classmethod
    def per_row(cls, deltas, slots, x, y, host, cache):
        """One batched matmul for the whole batch: each row gets its adapter's factors for its task, padded to the
        largest rank, zeros for rows without an adapter."""
        batch, r_max = x.shape[0], max(d.config.r for d in deltas)
        dtype = deltas[0].poly_lora_A.dtype
        a_rows = x.new_zeros((batch, host.info.in_features, r_max), dtype=dtype)
        b_rows = x.new_zeros((batch, r_max, host.info.out_features), dtype=dtype)
        for k, delta in enumerate(deltas):
            rows = (slots == k).nonzero().squeeze(1)
            if rows.numel():
                a, b = delta.mixed_factors(delta.row_tasks(batch)[rows], sample=delta.training)
                a_rows = a_rows.index_copy(0, rows, F.pad(a, (0, r_max - a.shape[2])))
                b_rows = b_rows.index_copy(0, rows, F.pad(b, (0, 0, 0, r_max - b.shape[1])))
        return y + _apply_rows(x, a_rows, b_rows).to(y.dtype)

    @classmethod
    def num_parameters(cls, config: PolyConfig, info: HostInfo, path: str) -> int:
        skills = config.n_skills
        return skills * config.r * (info.in_features + info.out_features) + config.n_tasks * config.n_splits * skills

    # ---- on disk: PEFT's tensor names -----------------------------------------------------------------------------
    def state_tensors(self, host: Host) -> dict[str, Tensor]:
        return {"poly_lora_A": self.poly_lora_A.detach(), "poly_lora_B": self.poly_lora_B.detach(),
                "poly_router.module_logits": self.module_logits.detach()}

    def load_state_tensors(self, tensors: dict[str, Tensor], host: Host) -> None:
        own = {"poly_lora_A": self.poly_lora_A, "poly_lora_B": self.poly_lora_B,
               "poly_router.module_logits": self.module_logits}
        with torch.no_grad():
            for key, value in tensors.items():
                own[key].copy_(value)


def _apply_rows(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """x·A_row·B_row for every batch row: x (batch, ..., in), a (batch, in, r), b (batch, r, out)."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
    return flat.bmm(a).bmm(b).reshape(*x.shape[:-1], b.shape[-1])


class tasks:
    """Set the task id of every batch row for Poly adapters (all of them, or only adapter `name`).

    Use as a context manager (restores the previous ids on exit) or as a plain call (stays in effect):
        with deltatune.methods.poly.tasks(model, [0, 2]): model(batch_of_two)
    """

    def __init__(self, model: nn.Module, task_ids, name: str | None = None) -> None:
        ids = torch.as_tensor(task_ids, dtype=torch.long).reshape(-1)
        chosen = [(slot, n, d) for _, _, slot in slots_of(model) for n, d in slot.items()
                  if isinstance(d, PolyDelta) and name in (None, n)]
        if not chosen:
            raise DeltatuneError(f"no Poly adapter{'' if name is None else f' named {name!r}'} is attached")
        for slot, n, delta in chosen:
            if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= delta.config.n_tasks:
                raise DeltatuneError(f"poly adapter {n!r} has tasks 0..{delta.config.n_tasks - 1}; got task ids "
                                     f"{ids.tolist()}")
            if n in slot.merged_names:
                raise DeltatuneError(f"poly adapter {n!r} is merged for its current task; unmerge before changing "
                                     "tasks")
        self.previous = [(d, d.__dict__.get("task_ids")) for _, _, d in chosen]
        for _, _, delta in chosen:
            delta.task_ids = ids

    def __enter__(self) -> "tasks":
        return self

    def __exit__(self, *exc) -> None:
        for delta, ids in self.previous:
            delta.task_ids = ids


# ---- PEFT's PolyConfig ----------------------------------------------------------------------------------------------
def _to_peft(config: PolyConfig) -> dict:
    return {"r": config.r, "n_tasks": config.n_tasks, "n_skills": config.n_skills, "n_splits": config.n_splits,
            "poly_type": "poly", "init_weights": config.init == "default"}


def _from_peft(raw: dict) -> dict:
    refuse_unknown_peft_fields("Poly", raw, {"r", "n_tasks", "n_skills", "n_splits", "poly_type", "init_weights"})
    if raw.get("poly_type", "poly") != "poly":
        raise DeltatuneError(f"PEFT Poly poly_type={raw['poly_type']!r} is not supported; deltatune reads 'poly'")
    return {"r": raw.get("r", 8), "n_tasks": raw.get("n_tasks", 1), "n_skills": raw.get("n_skills", 4),
            "n_splits": raw.get("n_splits", 1), "init": "default" if raw.get("init_weights", True) else "random"}


PAPER = ("Combining Modular Skills in Multitask Learning (Ponti et al., 2022) https://arxiv.org/abs/2202.13914; "
         "MHR: Multi-Head Adapter Routing for Cross-Task Generalization (Caccia et al., 2023) "
         "https://arxiv.org/abs/2211.03831")
register_method("poly", config=PolyConfig, family="mixture", paper=PAPER, hosts=LINEAR_KINDS,
                peft=PeftFormat("POLY", _to_peft, _from_peft, lambda raw: True))(PolyDelta)
