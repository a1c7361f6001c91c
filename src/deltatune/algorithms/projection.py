"""Gradient-projection AdamW for memory-efficient training of large matrices (e.g. the `full` method's dense ΔW).

- GaLore (Zhao et al., 2024, https://arxiv.org/abs/2403.03507): for a matrix parameter W (m × n) with gradient G,
  every `update_every` steps P = the top-`rank` left singular vectors of G (right ones when m > n); the gradient is
  projected, R = Pᵀ·G (rank × n), Adam runs on R — its moments live in the projected space — and the update
  `scale`·P·Adam(R) is projected back.
- Flora (Hao et al., 2024, https://arxiv.org/abs/2402.03293): the same with a random Gaussian P (entries
  N(0, 1/rank)) drawn again every `update_every` steps from (seed, parameter index, period), so no SVD is needed; the
  first moment is carried into the new subspace (m ← P_newᵀ·P_old·m).
Vectors and matrices whose smaller side is at most `rank` get plain AdamW.
"""

from __future__ import annotations

import torch
from torch import Tensor


class ProjectedAdamW(torch.optim.Optimizer):
    """AdamW with low-rank projected moments for matrices; mode is "galore" (SVD) or "flora" (random)."""

    def __init__(self, groups: list[dict], *, mode: str = "galore", rank: int = 8, update_every: int = 200,
                 scale: float = 0.25, seed: int = 0, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "mode": mode,
                    "rank": rank, "update_every": update_every, "scale": scale, "seed": seed}
        super().__init__(groups, defaults)

    def projected(self, param: Tensor, group: dict) -> bool:
        return param.ndim >= 2 and min(param.shape[0], param[0].numel()) > group["rank"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                index += 1
                if param.grad is None:
                    continue
                state = self.state[param]
                grad = param.grad.float()
                if self.projected(param, group):
                    update = self._projected_update(param, grad.reshape(param.shape[0], -1), state, group, index)
                    update = update.reshape(param.shape)
                else:
                    update = self._adam(state, grad, group)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-group["lr"])
        return loss

    def _projected_update(self, param: Tensor, grad: Tensor, state: dict, group: dict, index: int) -> Tensor:
        left = grad.shape[0] <= grad.shape[1]  # project the shorter side, as GaLore
        step = state.get("step", 0)
        if step % group["update_every"] == 0:
            new = self._basis(grad, left, group, index, step)
            old = state.get("projection")
            if old is not None and group["mode"] == "flora" and "exp_avg" in state:
                carry = new.t() @ old if left else old.t() @ new
                state["exp_avg"] = carry @ state["exp_avg"] if left else state["exp_avg"] @ carry
            state["projection"] = new
        basis = state["projection"]
        low = basis.t() @ grad if left else grad @ basis  # (rank, n) or (m, rank)
        direction = self._adam(state, low, group)
        return group["scale"] * (basis @ direction if left else direction @ basis.t())

    @staticmethod
    def _basis(grad: Tensor, left: bool, group: dict, index: int, step: int) -> Tensor:
        rank = group["rank"]
        if group["mode"] == "flora":
            period = step // group["update_every"]
            g = torch.Generator().manual_seed((group["seed"] * 1_000_003 + index * 10_007 + period) & 0x7FFFFFFF)
            size = grad.shape[0] if left else grad.shape[1]
            return (torch.randn(size, rank, generator=g) / rank**0.5).to(grad)
        u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        return u[:, :rank].contiguous() if left else vh[:rank].t().contiguous()

    @staticmethod
    def _adam(state: dict, grad: Tensor, group: dict) -> Tensor:
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
        state["step"] = state.get("step", 0) + 1
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = state["exp_avg"] / (1 - beta1 ** state["step"])
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** state["step"])
        return m_hat / (v_hat.sqrt() + group["eps"])
