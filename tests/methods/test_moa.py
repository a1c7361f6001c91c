"""MoA: heterogeneous experts (sub-deltas of other methods) weighted by a sigmoid router, the sparse variant's
per-token threshold, expert roles and keys kept under the mixture, and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune
import deltatune.methods.moa  # noqa: F401
from deltatune import DeltatuneError
from deltatune.core.slot import Host
from toys import make, perturb, run

EXPERTS = [{"method": "lora", "r": 2, "init": "random"}, {"method": "loha", "r": 2, "init": "random"},
           {"method": "ia3"}]


def _layer(**fields):
    model = nn.Sequential(nn.Linear(12, 10))
    deltatune.attach(model, deltatune.config("moa", targets=["0"], **fields))
    module = model[0]
    return model, module.deltatune["default"], Host(module, module.deltatune), torch.randn(2, 5, 12)


def _expert_alone(layer: nn.Linear, method_fields: dict, delta_expert) -> nn.Module:
    """A copy of the layer with the expert attached as its own adapter, holding the same tensors."""
    model = nn.Sequential(nn.Linear(12, 10))
    model[0].load_state_dict({"weight": layer.weight, "bias": layer.bias})
    fields = {k: v for k, v in method_fields.items() if k != "method"}
    deltatune.attach(model, deltatune.config(method_fields["method"], targets=["0"], **fields))
    model[0].deltatune["default"].load_state_dict(delta_expert.state_dict())
    return model


def test_soft_moa_is_the_sigmoid_weighted_sum_of_heterogeneous_experts():
    model, delta, host, x = _layer(experts=EXPERTS, router_expansion=2)
    perturb(model, "default", seed=0)
    with torch.no_grad():
        y0 = F.linear(x, model[0].weight, model[0].bias)
        router = delta.router
        weights = torch.sigmoid(router["w2"](F.silu(router["w1"](x)) * router["w3"](x)))  # (2, 5, 3)
        expected = y0.clone()
        for e, (fields, expert) in enumerate(zip(EXPERTS, delta.experts)):
            alone = _expert_alone(model[0], fields, expert)
            expected += weights[..., e : e + 1] * (alone(x) - y0)
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(delta.last_routing.weights, weights)
    assert [type(e).__name__ for e in delta.experts] == ["LoraDelta", "LohaDelta", "Ia3Delta"]


def test_sparse_moa_drops_experts_below_the_token_threshold():
    model, delta, host, x = _layer(experts=EXPERTS[:2], variant="sparse", router_expansion=0, max_threshold=0.5)
    with torch.no_grad():
        delta.router.weight.zero_()
        delta.router.bias.copy_(torch.tensor([2.0, -2.0]))  # σ = 0.88 and 0.12 on every token
        delta.threshold.weight.zero_()
        delta.threshold.bias.fill_(10.0)  # Γ ≈ 0.5
        only_first = model(x)
        y0 = F.linear(x, model[0].weight, model[0].bias)
        lora = delta.experts[0]
        first = y0 + torch.sigmoid(torch.tensor(2.0)) * lora.scaling * x @ lora.lora_A.t() @ lora.lora_B.t()
    torch.testing.assert_close(only_first, first, atol=1e-6, rtol=1e-5)
    assert (delta.last_routing.weights[..., 1] == 0).all() and (delta.last_routing.weights[..., 0] > 0.8).all()


def test_identity_at_init_follows_the_experts():
    cls = deltatune.get_method("moa").delta
    assert cls.identity_for(deltatune.config("moa"))  # the default experts all start as the identity
    assert not cls.identity_for(deltatune.config("moa", experts=EXPERTS))
    model, x = make("llama")
    base = run(model, x)
    deltatune.attach(model, deltatune.config("moa", targets=["q_proj", "down_proj"]))
    torch.testing.assert_close(run(model, x), base, atol=0, rtol=0)


def test_expert_roles_keep_their_names_under_the_mixture():
    model, delta, _, _ = _layer(experts=[{"method": "lora", "r": 2}, {"method": "qr_lora", "r": 2}])
    assert "experts.0.lora_B" in delta.fast_parameters
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(f"deltatune.default.{name}" in " ".join(frozen) for name in delta.frozen_parameters)
    assert delta.frozen_parameters  # qr_lora freezes its B


def test_parameter_count_sums_the_experts_and_the_router():
    cls = deltatune.get_method("moa").delta
    info = deltatune.core.hosts.host_info(nn.Linear(576, 576))
    config = deltatune.config("moa", experts=[{"method": "lora", "r": 8}, {"method": "ia3"}], router_expansion=4)
    hidden = 2 * 4
    router = 2 * (576 * hidden + hidden) + hidden * 2 + 2
    assert cls.num_parameters(config, info, "x") == 8 * 1152 + 576 + router


@pytest.mark.parametrize("experts,match", [([], "experts is empty"), ([{"r": 2}], "'method' key"),
                                           ([{"method": "nope"}], "unknown method"),
                                           ([{"method": "vera", "r": 4}], "adapter-wide tensors"),
                                           ([{"method": "lora", "r": 0}], "r must be > 0")])
def test_bad_experts_are_refused_with_the_reason(experts, match):
    with pytest.raises(DeltatuneError, match=match):
        deltatune.config("moa", experts=experts)
