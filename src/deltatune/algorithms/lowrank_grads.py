"""Optimizers that change the gradients of LoRA's factors before a standard update.

Every LoRA-family delta (lora, rslora, dora, and methods built on their B·A) is a pair (A (r, in), B (out, r),
scaling s) with ΔW = s·B·A. With G = ∂L/∂W the LoRA gradients are g_A = s·Bᵀ·G and g_B = s·G·Aᵀ.

- LoRA-FA (Zhang et al., 2023, https://arxiv.org/abs/2308.03303; the optimizer form of PEFT's `LoraFAOptimizer`):
  A is frozen and g_B ← (1/s²)·g_B·(A·Aᵀ)⁻¹, so s·g_B·A is the best approximation of G in B's row space.
- Riemannian preconditioner / scaled GD (Zhang & Pilanci, 2024, https://arxiv.org/abs/2402.02347):
  g_A ← (BᵀB + δI)⁻¹·g_A and g_B ← g_B·(AAᵀ + δI)⁻¹ (PEFT's `create_riemannian_optimizer`).
- ALLoRA (Huang & Balestriero, 2024, https://arxiv.org/abs/2410.09692): each row of each factor gets its gradient
  scaled by 1/√(‖row‖² + 1/η²) — a large step at zero, smaller as the row grows.
- LoRA-Pro (Wang et al., 2024, https://arxiv.org/abs/2407.18242): the gradients are replaced by the closed-form
  minimisers of ‖s·(B·g_A + g_B·A) − M‖_F, g_A = (1/s)(BᵀB)⁻¹BᵀM, g_B = (1/s)(I − B(BᵀB)⁻¹Bᵀ)·M·Aᵀ(AAᵀ)⁻¹
  (+ the paper's X·A / −B·X term from a Sylvester equation, which leaves s·(B·g_A + g_B·A) unchanged); M is the
  full gradient G (recovered from g_A, g_B) for SGD, or, for AdamW, Adam's update of the "equivalent gradient"
  s·(B·g_A + g_B·A), whose moments are kept full-size as in the paper.
- GOR (Group Orthogonalization Regularization, Kurtz et al., 2023, https://arxiv.org/abs/2306.10001): λ·Σ_g
  ‖W_g·W_gᵀ − I‖²_F over groups of rows of every trainable matrix (A's rows, B's columns); its gradient is added to
  the parameters' gradients, which is the same as adding the term to the loss.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from ..core.slot import slots_of
from ..methods.lora import LoraDelta


@dataclasses.dataclass
class Pair:
    """One LoRA update: the factor parameters and the scaling, viewed as matrices by `a()`, `b()`, `ga()`, `gb()`."""

    lora_a: nn.Parameter
    lora_b: nn.Parameter
    scaling: float

    @property
    def r(self) -> int:
        return self.lora_a.shape[0]

    def a(self) -> Tensor:
        return self.lora_a.detach().reshape(self.r, -1).float()

    def b(self) -> Tensor:
        return self.lora_b.detach().reshape(-1, self.r).float()


def lora_pairs(model: nn.Module) -> list[Pair]:
    """Every LoRA-family delta of the model whose B trains."""
    pairs = []
    for _, _, slot in slots_of(model):
        for delta in slot.values():
            if isinstance(delta, LoraDelta) and delta.lora_B.requires_grad:
                pairs.append(Pair(delta.lora_A, delta.lora_B, delta.scaling))
    return pairs


def damped_inverse(matrix: Tensor, damping: float) -> Tensor:
    return torch.linalg.pinv(matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device))


def _write(grad: Tensor, value: Tensor) -> None:
    grad.copy_(value.reshape(grad.shape).to(grad.dtype))


# ---- the transforms ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def lorafa_transform(pairs: list[Pair]) -> None:
    for pair in pairs:
        if pair.lora_b.grad is not None:
            a = pair.a()
            g_b = pair.lora_b.grad.reshape(-1, pair.r).float()
            _write(pair.lora_b.grad, g_b @ damped_inverse(a @ a.t(), 1e-8) / pair.scaling**2)


@torch.no_grad()
def riemannian_transform(pairs: list[Pair], damping: float) -> None:
    for pair in pairs:
        a, b = pair.a(), pair.b()
        if pair.lora_a.grad is not None:
            _write(pair.lora_a.grad, damped_inverse(b.t() @ b, damping) @ pair.lora_a.grad.reshape(pair.r, -1).float())
        if pair.lora_b.grad is not None:
            _write(pair.lora_b.grad, pair.lora_b.grad.reshape(-1, pair.r).float() @ damped_inverse(a @ a.t(), damping))


@torch.no_grad()
def allora_transform(params: list[nn.Parameter], eta: float) -> None:
    for param in params:
        if param.grad is None or param.ndim < 2:
            continue
        rows = param.detach().reshape(param.shape[0], -1).float()
        coefficient = (rows.pow(2).sum(dim=1) + 1.0 / eta**2).rsqrt()
        param.grad.mul_(coefficient.view(-1, *([1] * (param.ndim - 1))).to(param.grad.dtype))


def gor_penalty(weight: Tensor, group_size: int) -> Tensor:
    """Σ_g ‖W_g·W_gᵀ − I‖²_F over consecutive groups of `group_size` rows of a matrix (the last may be smaller)."""
    total = weight.new_zeros(())
    for group in weight.split(group_size, dim=0):
        gram = group @ group.t()
        total = total + (gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).pow(2).sum()
    return total


@torch.no_grad()
def gor_transform(pairs: list[Pair], weight: float, group_size: int) -> None:
    """Add ∇(weight·GOR) to the factors' gradients: A's rows and B's columns are the groups' vectors."""
    for pair in pairs:
        for param, as_rows in ((pair.lora_a, pair.a()), (pair.lora_b, pair.b().t())):
            if param.grad is None:
                continue
            with torch.enable_grad():
                rows = as_rows.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(gor_penalty(rows, group_size) * weight, rows)
            grad = grad if param is pair.lora_a else grad.t()
            param.grad.add_(grad.reshape(param.grad.shape).to(param.grad.dtype))


# ---- LoRA-Pro ---------------------------------------------------------------------------------------------------------
def sylvester(left: Tensor, right: Tensor, rhs: Tensor) -> Tensor:
    """X with left·X + X·right = rhs, for symmetric positive (semi-)definite r × r left and right."""
    d1, p = torch.linalg.eigh(left)
    d2, q = torch.linalg.eigh(right)
    denominator = d1.unsqueeze(1) + d2.unsqueeze(0)
    return p @ ((p.t() @ rhs @ q) / denominator.clamp_min(1e-12)) @ q.t()


def lora_pro_gradients(a: Tensor, b: Tensor, scaling: float, target: Tensor, damping: float = 1e-8,
                       use_sylvester: bool = True) -> tuple[Tensor, Tensor]:
    """The closed-form (g_A, g_B) whose equivalent gradient s·(B·g_A + g_B·A) is the projection of `target` (out, in)
    onto the tangent space at B·A: P_B·M + (I − P_B)·M·P_A."""
    btb_inv = damped_inverse(b.t() @ b, damping)
    aat_inv = damped_inverse(a @ a.t(), damping)
    g_a = btb_inv @ (b.t() @ target) / scaling
    residual = target - b @ (btb_inv @ (b.t() @ target))
    g_b = residual @ a.t() @ aat_inv / scaling
    if use_sylvester:  # the paper's X (Theorem 2.2): BᵀB·X + X·AAᵀ = −(1/s²)(BᵀB)⁻¹·g_A^LoRA·Aᵀ
        x = sylvester(b.t() @ b, a @ a.t(), -g_a @ a.t())
        g_a, g_b = g_a + x @ a, g_b - b @ x
    return g_a, g_b


def full_gradient(pair: Pair) -> Tensor:
    """G (out, in) as far as the LoRA gradients determine it: the least-squares G with s·Bᵀ·G = g_A and
    s·G·Aᵀ = g_B (exact when B and A have full column / row rank)."""
    a, b = pair.a(), pair.b()
    g_a = pair.lora_a.grad.reshape(pair.r, -1).float() / pair.scaling  # Bᵀ·G
    g_b = pair.lora_b.grad.reshape(-1, pair.r).float() / pair.scaling  # G·Aᵀ
    projected = torch.linalg.pinv(b.t()) @ g_a  # P_B·G = B(BᵀB)⁻¹·BᵀG
    return projected + (g_b - projected @ a.t()) @ torch.linalg.pinv(a.t())  # + (I − P_B)·G·Aᵀ(AAᵀ)⁻¹A


class LoraProOptimizer(torch.optim.AdamW):
    """AdamW for every parameter except LoRA pairs, which get LoRA-Pro's adjusted update (with full-size moments of
    the equivalent gradient in each pair's B state when adam=True)."""

    def __init__(self, groups: list[dict], pairs: list[Pair], *, adam: bool = True, use_sylvester: bool = True,
                 **kwargs) -> None:
        super().__init__(groups, **kwargs)
        self.pairs, self.adam, self.use_sylvester = pairs, adam, use_sylvester
        self.paired = {id(p) for pair in pairs for p in (pair.lora_a, pair.lora_b)}

    def _group_of(self, param: nn.Parameter) -> dict:
        return next(g for g in self.param_groups if any(p is param for p in g["params"]))

    @torch.no_grad()
    def step(self, closure=None):
        for pair in self.pairs:
            if pair.lora_a.grad is not None and pair.lora_b.grad is not None:
                self._pair_step(pair)
        held = {}
        for group in self.param_groups:  # plain AdamW for the rest
            held[id(group)] = group["params"]
            group["params"] = [p for p in group["params"] if id(p) not in self.paired]
        try:
            return super().step(closure)
        finally:
            for group in self.param_groups:
                group["params"] = held[id(group)]

    def _pair_step(self, pair: Pair) -> None:
        group, state = self._group_of(pair.lora_b), self.state[pair.lora_b]
        target = full_gradient(pair)
        if self.adam:
            a, b = pair.a(), pair.b()
            g_a, g_b = lora_pro_gradients(a, b, pair.scaling, target, use_sylvester=self.use_sylvester)
            equivalent = pair.scaling * (b @ g_a + g_b @ a)
            target = self._adam_direction(state, equivalent, group)
        g_a, g_b = lora_pro_gradients(pair.a(), pair.b(), pair.scaling, target, use_sylvester=self.use_sylvester)
        for param, update in ((pair.lora_a, g_a), (pair.lora_b, g_b)):
            lr = self._group_of(param)["lr"]
            param.mul_(1 - lr * group["weight_decay"])
            param.add_(update.reshape(param.shape).to(param.dtype), alpha=-lr)

    @staticmethod
    def _adam_direction(state: dict, grad: Tensor, group: dict) -> Tensor:
        beta1, beta2 = group["betas"]
        if "pro_exp_avg" not in state:
            state["pro_step"] = 0
            state["pro_exp_avg"], state["pro_exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
        state["pro_step"] += 1
        state["pro_exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["pro_exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = state["pro_exp_avg"] / (1 - beta1 ** state["pro_step"])
        v_hat = state["pro_exp_avg_sq"] / (1 - beta2 ** state["pro_step"])
        return m_hat / (v_hat.sqrt() + group["eps"])


def tangent_projection(a: Tensor, b: Tensor, target: Tensor) -> Tensor:
    """P_B·M + (I − P_B)·M·P_A: the projection of M onto the tangent space of rank-r matrices at B·A."""
    p_b = b @ torch.linalg.pinv(b)
    p_a = torch.linalg.pinv(a) @ a
    return p_b @ target + (target - p_b @ target) @ p_a


def check_finite(value: float, name: str) -> float:
    if not math.isfinite(value) or value <= 0:
        from ..core.errors import DeltatuneError

        raise DeltatuneError(f"optimizer option {name} must be a positive number, got {value}")
    return value
