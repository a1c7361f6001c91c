"""The registered optimizers, each checked for what defines it: LoRA-FA (A never moves; PEFT parity), the Riemannian
preconditioner (PEFT parity), LoRA-Pro (the equivalent gradient is the tangent projection of the full gradient),
ALLoRA, GOR, GaLore / Flora (moments in the projected space), LISA / OwLore (only sampled layers move)."""

from __future__ import annotations

import types

import pytest
import torch
from peft_roundtrip import peft
from toys import make, run

import deltatune
import deltatune.algorithms
from deltatune import DeltatuneError
from deltatune.algorithms import layerwise, lowrank_grads
from deltatune.core.slot import slots_of
from deltatune.train.optimizers import build_optimizer

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _spec(name: str, lr: float = 1e-2, **options):
    return types.SimpleNamespace(name=name, lr=lr, weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8,
                                 lora_plus_ratio=1.0, options=options)


def _lora(method: str = "lora", **fields):
    model, x = make("llama")
    deltatune.attach(model, deltatune.config(method, targets=TARGETS, **({"r": 4, "alpha": 8.0} | fields)))
    for _, _, slot in slots_of(model):  # B ≠ 0 so that every factor has a gradient
        torch.nn.init.normal_(slot["default"].lora_B, std=0.1)
    return model, x


def _steps(model, x, optimizer, n: int = 3, loss_scale: float = 1.0) -> None:
    model.train()
    for _ in range(n):
        # Adam ignores the loss scale except through eps (whose placement differs between implementations): a
        # large scale keeps every gradient far above it.
        (model(x).logits.pow(2).sum() * loss_scale).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _deltas(model) -> dict:
    return {p: s["default"] for p, _, s in slots_of(model)}


def _peft_twin(model, x):
    """A PEFT LoRA model with the very same factors as our `model`."""
    twin, _ = make("llama")
    twin = peft.get_peft_model(twin, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for path, delta in _deltas(model).items():
            layer = twin.get_submodule(f"base_model.model.{path}")
            layer.lora_A["default"].weight.copy_(delta.lora_A)
            layer.lora_B["default"].weight.copy_(delta.lora_B)
    torch.testing.assert_close(run(twin, x), run(model, x))
    return twin


def _same_factors(model, twin, atol: float, rtol: float) -> None:
    for path, delta in _deltas(model).items():
        layer = twin.get_submodule(f"base_model.model.{path}")
        torch.testing.assert_close(delta.lora_A, layer.lora_A["default"].weight, atol=atol, rtol=rtol)
        torch.testing.assert_close(delta.lora_B, layer.lora_B["default"].weight, atol=atol, rtol=rtol)


def test_lorafa_never_moves_a_and_matches_peft(monkeypatch):
    from peft.optimizers import create_lorafa_optimizer, lorafa

    monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)  # PEFT would round the projection to bf16

    model, x = _lora()
    twin = _peft_twin(model, x)
    before = {p: d.lora_A.clone() for p, d in _deltas(model).items()}
    _steps(model, x, build_optimizer(model, _spec("lorafa", lr=1e-3)), loss_scale=1e4)
    _steps(twin, x, create_lorafa_optimizer(twin, r=4, lora_alpha=8, lr=1e-3), loss_scale=1e4)
    for path, delta in _deltas(model).items():
        assert torch.equal(delta.lora_A, before[path]) and not delta.lora_A.requires_grad
    _same_factors(model, twin, atol=1e-5, rtol=1e-3)


def test_lorafa_projects_the_full_gradient_onto_a_row_space():
    g = torch.Generator().manual_seed(0)
    a, b, grad = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g), torch.randn(5, 7, generator=g)
    pair = lowrank_grads.Pair(torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone()), 2.0)
    pair.lora_b.grad = 2.0 * grad @ a.t()  # g_B = s·G·Aᵀ
    lowrank_grads.lorafa_transform([pair])
    projected = grad @ torch.linalg.pinv(a) @ a  # G·P_A
    torch.testing.assert_close(2.0 * pair.lora_b.grad @ a, projected, atol=1e-4, rtol=1e-4)


def test_riemannian_matches_peft():
    from peft.optimizers import create_riemannian_optimizer

    model, x = _lora()
    twin = _peft_twin(model, x)
    _steps(model, x, build_optimizer(model, _spec("riemannian", lr=1e-3, damping=1e-2)))
    _steps(twin, x, create_riemannian_optimizer(twin, torch.optim.AdamW, lr=1e-3, reg=1e-2, eps=1e-8,
                                                weight_decay=0.0))
    _same_factors(model, twin, atol=1e-6, rtol=1e-4)


def test_riemannian_update_is_invariant_to_rebalancing_the_factors():
    """Scaled GD moves B·A the same way whatever the split: (B·R, R⁻¹·A) gives the same first-order step."""
    g = torch.Generator().manual_seed(1)
    a, b, grad = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g), torch.randn(5, 7, generator=g)
    rebalance = torch.diag(torch.tensor([2.0, 0.5, 3.0]))
    steps = []
    for aa, bb in ((a, b), (torch.linalg.inv(rebalance) @ a, b @ rebalance)):
        pair = lowrank_grads.Pair(torch.nn.Parameter(aa.clone()), torch.nn.Parameter(bb.clone()), 1.0)
        pair.lora_a.grad, pair.lora_b.grad = bb.t() @ grad, grad @ aa.t()
        lowrank_grads.riemannian_transform([pair], damping=0.0)
        steps.append(bb @ pair.lora_a.grad + pair.lora_b.grad @ aa)
    torch.testing.assert_close(steps[0], steps[1], atol=1e-4, rtol=1e-4)


def test_lora_pro_equivalent_gradient_is_the_tangent_projection_of_the_full_gradient():
    model, x = _lora()
    delta = _deltas(model)["model.layers.0.mlp.down_proj"]
    module = dict(model.named_modules())["model.layers.0.mlp.down_proj"]
    module.weight.requires_grad_(True)
    model(x).logits.pow(2).mean().backward()
    full = module.weight.grad.clone()
    pair = lowrank_grads.Pair(delta.lora_A, delta.lora_B, delta.scaling)
    recovered = lowrank_grads.full_gradient(pair)
    a, b = pair.a(), pair.b()
    expected = lowrank_grads.tangent_projection(a, b, full)
    torch.testing.assert_close(lowrank_grads.tangent_projection(a, b, recovered), expected, atol=1e-6, rtol=1e-4)
    for use_sylvester in (False, True):
        g_a, g_b = lowrank_grads.lora_pro_gradients(a, b, pair.scaling, recovered, use_sylvester=use_sylvester)
        torch.testing.assert_close(pair.scaling * (b @ g_a + g_b @ a), expected, atol=1e-6, rtol=1e-4)


def test_sylvester_solution_solves_the_equation():
    g = torch.Generator().manual_seed(2)
    m1, m2, rhs = torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g), torch.randn(3, 3, generator=g)
    left, right = m1 @ m1.t() + torch.eye(3), m2 @ m2.t() + torch.eye(3)
    x = lowrank_grads.sylvester(left, right, rhs)
    torch.testing.assert_close(left @ x + x @ right, rhs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("adam", [True, False])
def test_lora_pro_trains_and_keeps_its_state_per_parameter(adam):
    model, x = _lora()
    optimizer = build_optimizer(model, _spec("lora_pro", lr=1e-3, adam=adam))
    before = run(model, x).pow(2).mean()
    _steps(model, x, optimizer, 5)
    assert run(model, x).pow(2).mean() < before
    state = optimizer.state_dict()["state"]
    assert all(torch.is_tensor(v) or isinstance(v, (int, float)) for entry in state.values() for v in entry.values())


def test_allora_scales_each_rows_gradient_by_its_inverse_norm():
    param = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    param.grad = torch.ones(2, 2)
    lowrank_grads.allora_transform([param], eta=2.0)
    torch.testing.assert_close(param.grad, torch.tensor([[1 / (25 + 0.25) ** 0.5] * 2, [2.0, 2.0]]))


def test_gor_adds_the_gradient_of_the_group_orthogonality_penalty():
    g = torch.Generator().manual_seed(3)
    a = torch.nn.Parameter(torch.randn(4, 6, generator=g))
    b = torch.nn.Parameter(torch.randn(5, 4, generator=g))
    a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
    lowrank_grads.gor_transform([lowrank_grads.Pair(a, b, 1.0)], weight=0.5, group_size=2)
    rows = a.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(0.5 * lowrank_grads.gor_penalty(rows, 2), rows)
    torch.testing.assert_close(a.grad, expected)
    orthonormal = torch.linalg.qr(torch.randn(6, 6, generator=g))[0][:4]
    assert float(lowrank_grads.gor_penalty(orthonormal, 2)) < 1e-10


@pytest.mark.parametrize("mode", ["galore", "flora"])
def test_projected_adam_keeps_its_moments_in_the_low_rank_space(mode):
    model, x = make("llama")
    deltatune.attach(model, deltatune.config("full", targets=["down_proj"]))
    optimizer = build_optimizer(model, _spec(mode, rank=2, update_every=3))
    params = deltatune.trainable_parameters(model)
    before = [p.detach().clone() for p in params]
    _steps(model, x, optimizer, 2)  # within one period: the update lies in the span of the projection
    for param, old in zip(params, before):
        state = optimizer.state[param]
        basis = state["projection"]
        m, n = param.shape
        assert state["exp_avg"].shape == ((2, n) if m <= n else (m, 2))
        change = (param - old).reshape(m, -1)
        residual = change - basis @ (basis.t() @ change) if m <= n else change - (change @ basis) @ basis.t()
        if mode == "galore":
            torch.testing.assert_close(basis.t() @ basis, torch.eye(2), atol=1e-5, rtol=0)
            assert residual.abs().max() < 1e-6 * max(1.0, change.abs().max())
    first = {id(p): optimizer.state[p]["projection"].clone() for p in params}
    _steps(model, x, optimizer, 2)  # a new period: a new basis
    assert any(not torch.allclose(first[id(p)], optimizer.state[p]["projection"]) for p in params)


def _layer_changes(model, before) -> set[int]:
    changed = set()
    for path, _, slot in slots_of(model):
        for name, p in slot["default"].named_parameters():
            if not torch.equal(p, before[(path, name)]):
                changed.add(layerwise.layer_index(path, None))
    return changed


@pytest.mark.parametrize("name", ["lisa", "owlore"])
def test_layerwise_sampling_only_moves_the_sampled_layers(name):
    model, x = _lora()
    optimizer = build_optimizer(model, _spec(name, layers=1, every=2, seed=3))
    seen = set()
    for draw in range(3):
        before = {(p, n): t.detach().clone() for p, _, s in slots_of(model) for n, t in s["default"].named_parameters()}
        chosen = optimizer.active_layers
        _steps(model, x, optimizer, 2)
        assert _layer_changes(model, before) == set(chosen)
        seen.update(chosen)
    again = build_optimizer(_lora()[0], _spec(name, layers=1, every=2, seed=3))
    assert again.active_layers == layerwise.LayerSampler(_lora()[0], 1, 3).chosen(0) or name == "owlore"
    state = optimizer.state_dict()
    resumed = build_optimizer(_lora()[0], _spec(name, layers=1, every=2, seed=3))
    resumed.load_state_dict(state)
    assert resumed.active_layers == optimizer.active_layers


def test_owlore_draws_layers_in_proportion_to_their_outlier_ratio():
    sampler = layerwise.LayerSampler(_lora()[0], 1, seed=0, weights={0: 0.9, 1: 0.1})
    draws = [sampler.chosen(i)[0] for i in range(400)]
    assert 0.8 < draws.count(0) / 400 < 0.97
    model, _ = _lora()
    with torch.no_grad():
        dict(model.named_modules())["model.layers.1.mlp.down_proj"].weight[:4, :] = 100.0
    ratios = layerwise.outlier_ratios(model, [0, 1], threshold=3.0)
    assert ratios[1] > ratios[0]


def test_bad_optimizer_options_and_models_are_refused():
    model, _ = _lora()
    with pytest.raises(DeltatuneError, match="unknown option"):
        build_optimizer(model, _spec("riemannian", dampening=1.0))
    with pytest.raises(DeltatuneError, match="damping must be a positive"):
        build_optimizer(model, _spec("riemannian", damping=-1.0))
    with pytest.raises(DeltatuneError, match="layers must be in 1..2"):
        build_optimizer(model, _spec("lisa", layers=5))
    vera, _ = make("llama")
    deltatune.attach(vera, deltatune.config("vera", r=2, targets=["q_proj"]))
    with pytest.raises(DeltatuneError, match="LoRA-family"):
        build_optimizer(vera, _spec("lorafa"))
