"""AdaLoRA: "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", Zhang et al., 2023,
https://arxiv.org/abs/2303.10512 — and the SVD-form machinery IncreLoRA and ElaLoRA share.

Update rule (matrix view):  W' = W + s/ranknum · P·diag(Λ)·Q,  with P = lora_B (out, r), Λ = lora_E (r, 1),
Q = lora_A (r, in), s = alpha (PEFT: `lora_alpha`, or r when alpha is 0) and ranknum = init_r (fixed: pruning
does not rescale). Init: P, Q ~ N(0, 0.02²), Λ = 0, so the model is unchanged at step 0.
Training (PEFT's `RankAllocator`, run by `after_step` after every optimizer step): each entry's sensitivity
|w·∂L/∂w| is smoothed (β₁) and its uncertainty tracked (β₂); a triplet (P_i, Λ_i, Q_i) scores the smoothed
sensitivity × uncertainty of Λ_i plus the means over Q's row i and P's column i. The rank budget falls from
Σ init_r to target_r × modules on a cubic schedule between `tinit` and `total_step − tfinal`; every `delta_t`
steps the lowest-scoring triplets have Λ_i set to 0; from `total_step − tfinal` on the final mask is re-applied
every step. `regularization_loss` is the orthogonality penalty orth_reg_weight · mean over matrices of
‖QQᵀ − I‖_F and ‖PᵀP − I‖_F. Gradients are read from `param.grad`, or from a post-accumulate hook when the
trainer has already cleared them.
File format: PEFT's (peft_type ADALORA, tensors lora_A, lora_B, lora_E; `rank_pattern` masks read on load,
modules then built with the kept ranks and ranknum = init_r, as PEFT).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from ..core.config import DeltaConfig
from ..core.errors import DeltatuneError
from ..core.hosts import HostInfo
from ..core.registry import PeftFormat, register_method
from ..core.slot import Host
from .factored import FactoredDelta, check_dropout, check_positive, refuse_unknown_peft_fields


# ---- gradients and importance, shared by the rank-allocation methods -------------------------------------------------
class GradientTap:
    """Keeps a reference to each parameter's latest accumulated gradient, so a hook that runs after the trainer
    cleared `.grad` (set_to_none) still sees it. Registered lazily (and again after a deepcopy or a move)."""

    def __init__(self) -> None:
        self.grads: dict[str, Tensor] = {}
        self.hooked: dict[str, int] = {}

    def watch(self, module: nn.Module) -> None:
        if not torch.is_grad_enabled():
            return
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and self.hooked.get(name) != id(param):
                param.register_post_accumulate_grad_hook(lambda p, n=name: self.grads.__setitem__(n, p.grad))
                self.hooked[name] = id(param)

    def grad(self, module: nn.Module, name: str) -> Tensor | None:
        param = getattr(module, name)
        return param.grad if param.grad is not None else self.grads.get(name)


class Sensitivity:
    """AdaLoRA's importance of every entry: I = |w·g| smoothed with β₁, uncertainty U = EMA_β₂ |I − Ī|; score Ī·U."""

    def __init__(self, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.ipt: dict[str, Tensor] = {}
        self.unc: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, module: nn.Module, tap: GradientTap, names: tuple[str, ...]) -> None:
        for name in names:
            param, grad = getattr(module, name), tap.grad(module, name)
            if grad is None:
                continue
            now = (param * grad).abs()
            ipt = self.ipt.get(name, torch.zeros_like(now))
            unc = self.unc.get(name, torch.zeros_like(now))
            self.ipt[name] = self.beta1 * ipt + (1 - self.beta1) * now
            self.unc[name] = self.beta2 * unc + (1 - self.beta2) * (now - self.ipt[name]).abs()

    def score(self, name: str, like: Tensor) -> Tensor:
        if name not in self.ipt:
            return torch.zeros_like(like)
        return self.ipt[name] * self.unc[name]

    def reset(self) -> None:
        self.ipt.clear()
        self.unc.clear()


# ---- the config and the SVD-form delta --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaloraConfig(DeltaConfig):
    """Attributes:
    init_r: initial rank of every module. target_r: average rank the budget ends at.
    alpha: scaling numerator (s = alpha / init_r; 0 means s = 1, as PEFT). dropout: on the adapter's input.
    tinit / tfinal: steps before the budget starts to fall / during which the final mask is kept.
    delta_t: steps between two reallocations. beta1, beta2: EMA factors of sensitivity and uncertainty.
    orth_reg_weight: weight of the orthogonality penalty. total_step: training length (None: the trainer's).
    rank_pattern: module path -> kept-triplet mask (what PEFT saves after allocation).
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        check_positive(self.method, init_r=self.init_r, target_r=self.target_r, delta_t=self.delta_t)
        check_dropout(self.method, self.dropout)
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise DeltatuneError(f"{self.method}: beta1 and beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        if self.orth_reg_weight < 0 or self.alpha < 0:
            raise DeltatuneError(f"{self.method}: orth_reg_weight and alpha must be >= 0")

    def rank_for(self, path: str) -> int:
        mask = self.rank_pattern.get(path)
        return self.init_r if mask is None else sum(mask)


class SvdFormDelta(FactoredDelta):
    """ΔW = s/ranknum · P·diag(Λ ⊙ mask)·Q with a fixed capacity; subclasses decide how the mask moves."""

    fast_parameters = ("lora_B",)
    masked = False  # AdaLoRA zeroes Λ instead of masking (PEFT's behaviour); IncreLoRA / ElaLoRA mask

    def __init__(self, config, info: HostInfo, path: str, rank: int, active: int | None = None) -> None:
        super().__init__(config, info, path)
        self.r, self.dropout = rank, config.dropout
        if rank < 0:  # 0 is allowed: PEFT's allocation can prune a module completely
            self.check_rank(rank)
        self.lora_A = nn.Parameter(torch.randn(rank, info.fan_in) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(rank, 1))
        self.lora_B = nn.Parameter(torch.randn(info.out_features, rank) * 0.02)
        self.register_buffer("ranknum", torch.tensor(float(config.init_r)), persistent=False)
        self.register_buffer("mask", torch.arange(rank) < (rank if active is None else active), persistent=False)
        self.tap, self.sensitivity = GradientTap(), Sensitivity(config.beta1, config.beta2)
        self.adapter_size = 0  # modules in this adapter (for the regulariser's mean); learnt in forward

    @property
    def scaling(self) -> float:
        alpha = self.config.alpha if self.config.alpha > 0 else float(self.config.init_r)
        return alpha / (float(self.ranknum) + 1e-5)

    def values(self) -> Tensor:
        return self.lora_E * self.mask.unsqueeze(1) if self.masked else self.lora_E

    def factors(self, host: Host) -> tuple[Tensor, Tensor]:
        return self.lora_A * self.values(), self.lora_B * self.scaling

    def forward(self, x: Tensor, y: Tensor, host: Host) -> Tensor:
        if self.r == 0:
            return y
        self.tap.watch(self)
        if self.training and not self.adapter_size:
            name = next(n for n, d in host.slot.items() if d is self)
            self.adapter_size = len(host.slot.state.adapters[name].paths)
        return super().forward(x, y, host)

    def regularization_loss(self) -> Tensor:
        """This module's share of PEFT's orthogonality penalty (mean over all the adapter's A and B matrices)."""
        eye = torch.eye(self.r, dtype=self.lora_A.dtype, device=self.lora_A.device)
        penalty = torch.linalg.norm(self.lora_A @ self.lora_A.t() - eye) + \
            torch.linalg.norm(self.lora_B.t() @ self.lora_B - eye)
        return self.config.orth_reg_weight * penalty / (2 * max(self.adapter_size, 1))

    def track(self) -> None:
        self.sensitivity.update(self, self.tap, ("lora_A", "lora_E", "lora_B"))

    def triplet_scores(self) -> Tensor:
        """(r,): score of Λ_i + mean score of Q's row i + mean score of P's column i."""
        s = self.sensitivity
        return (s.score("lora_E", self.lora_E).view(-1) + s.score("lora_A", self.lora_A).mean(dim=1)
                + s.score("lora_B", self.lora_B).mean(dim=0))

    @classmethod
    def num_parameters(cls, config, info: HostInfo, path: str) -> int:
        return config.rank_for(path) * (info.fan_in + info.out_features + 1)


def budget_schedule(step: int, total: int, tinit: int, tfinal: int, delta_t: int, start: int, end: int):
    """PEFT's cubic budget: (budget, whether to reallocate now)."""
    if step <= tinit:
        return start, False
    if step > total - tfinal:
        return end, True
    progress = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((start - end) * progress**3 + end), step % delta_t == 0


class AdaloraDelta(SvdFormDelta):
    def __init__(self, config: AdaloraConfig, info: HostInfo, path: str) -> None:
        super().__init__(config, info, path, config.rank_for(path))

    @classmethod
    def after_step(cls, deltas: dict[str, SvdFormDelta], step: int, total_steps: int) -> None:
        config = next(iter(deltas.values())).config
        total = config.total_step or total_steps
        if config.tinit >= total - config.tfinal:
            raise DeltatuneError(f"adalora: tinit={config.tinit} and tfinal={config.tfinal} leave no budgeting "
                                 f"phase in {total} steps; lower them or raise total_step")
        final = total - config.tfinal
        if step < final:
            for delta in deltas.values():
                delta.track()
            start = sum(d.r for d in deltas.values())
            budget, now = budget_schedule(step, total, config.tinit, config.tfinal, config.delta_t, start,
                                          config.target_r * len(deltas))
            if now:
                mask_to_budget(deltas, budget)
        elif step == final:
            mask_to_budget(deltas, config.target_r * len(deltas))
            for delta in deltas.values():
                delta.sensitivity.reset()
        else:
            with torch.no_grad():
                for delta in deltas.values():
                    delta.lora_E.masked_fill_(~delta.mask.unsqueeze(1), 0.0)


@torch.no_grad()
def mask_to_budget(deltas: dict[str, SvdFormDelta], budget: int) -> None:
    """Zero Λ_i of the lowest-scoring triplets so that `budget` of them remain (ties at the threshold go too)."""
    scores = {p: d.triplet_scores() for p, d in deltas.items()}
    total = sum(s.numel() for s in scores.values())
    if total - budget <= 0:
        return
    threshold = torch.kthvalue(torch.cat(list(scores.values())), total - budget).values
    for path, delta in deltas.items():
        delta.mask.copy_(scores[path] > threshold)
        delta.lora_E.masked_fill_(~delta.mask.unsqueeze(1), 0.0)


def rank_masks(deltas: dict[str, SvdFormDelta]) -> dict[str, list[bool]]:
    """The current kept-triplet masks, as PEFT's `rank_pattern` (module path -> list of bools)."""
    return {p: d.mask.tolist() for p, d in deltas.items()}


# ---- PEFT's file format -----------------------------------------------------------------------------------------------
_ADALORA_FIELDS = {"init_r", "target_r", "lora_alpha", "lora_dropout", "tinit", "tfinal", "deltaT", "beta1", "beta2",
                   "orth_reg_weight", "total_step", "rank_pattern", "r", "fan_in_fan_out", "bias", "init_lora_weights",
                   "use_rslora", "use_dora", "lora_bias", "alpha_pattern", "loftq_config", "eva_config",
                   "corda_config", "layer_replication", "runtime_config", "megatron_core", "use_qalora",
                   "qalora_group_size", "ensure_weight_tying", "target_parameters", "trainable_token_indices",
                   "arrow_config", "lora_ga_config", "velora_config", "kasa_config"}


def _to_peft(config: AdaloraConfig) -> dict:
    return {"init_r": config.init_r, "target_r": config.target_r, "r": 8, "lora_alpha": config.alpha,
            "lora_dropout": config.dropout, "tinit": config.tinit, "tfinal": config.tfinal, "deltaT": config.delta_t,
            "beta1": config.beta1, "beta2": config.beta2, "orth_reg_weight": config.orth_reg_weight,
            # PEFT refuses None; only allocation reads it
            "total_step": config.total_step or max(1000, config.tinit + config.tfinal + 1),
            "rank_pattern": {f"{p}.lora_E": m for p, m in config.rank_pattern.items()} or None,
            "bias": "none", "init_lora_weights": True, "fan_in_fan_out": False}


def _from_peft(raw: dict) -> dict:
    refuse_unknown_peft_fields("AdaLoRA", raw, _ADALORA_FIELDS)
    if raw.get("bias", "none") != "none" or raw.get("use_dora") or raw.get("lora_bias"):
        raise DeltatuneError("PEFT AdaLoRA with bias, DoRA or lora_bias is not supported by deltatune")
    pattern = {k.removesuffix(".lora_E"): [bool(v) for v in mask] for k, mask in (raw.get("rank_pattern") or {}).items()}
    return {"init_r": raw.get("init_r", 12), "target_r": raw.get("target_r", 8), "alpha": raw.get("lora_alpha", 8),
            "dropout": raw.get("lora_dropout", 0.0), "tinit": raw.get("tinit", 0), "tfinal": raw.get("tfinal", 0),
            "delta_t": raw.get("deltaT", 1), "beta1": raw.get("beta1", 0.85), "beta2": raw.get("beta2", 0.85),
            "orth_reg_weight": raw.get("orth_reg_weight", 0.5), "total_step": raw.get("total_step"),
            "rank_pattern": pattern}


PAPER = ("Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., 2023) "
         "https://arxiv.org/abs/2303.10512")
register_method("adalora", config=AdaloraConfig, family="rank-allocation", paper=PAPER,
                peft=PeftFormat("ADALORA", _to_peft, _from_peft, lambda raw: True))(AdaloraDelta)
